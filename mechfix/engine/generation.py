"""Text generation for several conversations at once, each continuing its own text.

A live episode grows turn by turn; prefilling the whole history again for
every turn would cost most of the run (a 24 × 380-token prefill of the
embedded model takes 16 s on two CPU cores). :class:`Writer` keeps one key/value
cache for a batch of conversations and feeds only what is new.

Exactness: every call tokenizes each full text exactly as scoring does and
compares it with the tokens already in the cache. Tokens that differ (a word
that tokenizes differently once more text follows, or the generated tokens of
the last turn beyond where the reply was cut) become holes: they stay in the
cache but are masked out, and positions count only real tokens. A model with
sliding-window attention measures its window in cache slots, holes included,
so the cache is rebuilt from the full texts before it could reach the window.
On full-attention models holes cost only memory; the cache is rebuilt when
they outnumber the real tokens.

Greedy decoding by default; with a temperature, every conversation samples
from its own seeded generator, so its text does not depend on which other
conversations share the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mechfix.engine.batches import cache_kwargs, returned_cache
from mechfix.engine.edits import check_plain_pass
from mechfix.models import LoadedModel


def row_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (a recipe seed, an item, a condition, a round), stable across runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run with dropout off, then put the model back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def generate_reply(lm: LoadedModel, prompt: str, max_tokens: int, stop: str = "\n") -> str:
    """Greedy continuation of ``prompt``, cut at the first ``stop`` (deterministic).

    Args:
        lm: The model.
        prompt: Text so far (the episode up to an opened turn).
        max_tokens: Most tokens to generate.
        stop: The reply ends before this text.
    """
    return Writer(lm, 1).generate([prompt], max_tokens, stop)[0]


@dataclass
class _Row:
    ids: list[int]  # real tokens in the cache, in order
    slots: list[int]  # their cache slots


class Writer:
    """Continues a fixed batch of texts; each call passes every row's full text so far.

    Args:
        lm: The model (a fix installed on it applies to generation too).
        n_rows: Conversations in the batch.
        temperature: 0 for greedy decoding, else sampling at this temperature.
        seeds: One seed per row (sampling only).
    """

    def __init__(self, lm: LoadedModel, n_rows: int, temperature: float = 0.0, seeds: Sequence[int] | None = None):
        self.lm = lm
        self.n = n_rows
        self.temperature = temperature
        self.generators = None
        if temperature > 0:
            seeds = list(seeds) if seeds is not None else list(range(n_rows))
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        cfg = lm.model.config
        # 0: no sliding window (a config may name one that no layer uses, as Qwen2's does).
        self.window = getattr(cfg, "sliding_window", None) or 0
        if getattr(cfg, "layer_types", None) and "sliding_attention" not in cfg.layer_types:
            self.window = 0
        self._reset()

    def _reset(self) -> None:
        self.cache = None
        self.mask = torch.zeros((self.n, 0), dtype=torch.long)
        self.rows = [_Row([], []) for _ in range(self.n)]

    @property
    def slots(self) -> int:
        return int(self.mask.shape[1])

    def generate(self, texts: Sequence[str], max_tokens: int, stop: str = "\n") -> list[str]:
        """Continue every row's text.

        Args:
            texts: Each row's full text so far (it must extend what the row had,
                or share a prefix with it; divergent tokens are masked out).
            max_tokens: Most tokens to write per row.
            stop: A row's reply ends before this text (and at the end-of-text token).

        Returns:
            Each row's reply, cut before ``stop``.
        """
        tok = self.lm.tokenizer
        return self.generate_ids([list(tok(t)["input_ids"]) for t in texts], max_tokens, stop)

    def generate_ids(self, seqs: Sequence[Sequence[int]], max_tokens: int, stop: str = "\n",
                     stop_ids: Sequence[int] = ()) -> list[str]:
        """Continue every row's token ids (a chat rendering, say): as :meth:`generate`, from tokens.

        Args:
            seqs: Each row's full token ids so far.
            max_tokens: Most tokens to write per row.
            stop: A row's reply ends before this text.
            stop_ids: Tokens that end a reply besides the end-of-text token (a chat template's end of turn).
        """
        if len(seqs) != self.n:
            raise ValueError(f"expected {self.n} texts, got {len(seqs)}")
        # Inference mode throughout: the mask is updated in place, and tensors made in inference mode stay so.
        with torch.inference_mode(), eval_mode(self.lm.model):
            return self._generate([list(x) for x in seqs], max_tokens, stop, set(stop_ids))

    def _generate(self, full: list[list[int]], max_tokens: int, stop: str, stop_ids: set[int]) -> list[str]:
        tok = self.lm.tokenizer
        if not all(full):
            raise ValueError("every text must have at least one token to continue from")
        longest = max(len(f) for f in full)
        pending = self._pending(full)
        width = max(len(p) for p in pending)
        too_long = self.window and self.slots + width + max_tokens >= self.window
        if self.cache is None or too_long or self.slots + width > 2 * longest + 64:
            self._reset()
            pending = [list(f) for f in full]
        eos = ({tok.eos_token_id} | stop_ids) - {None}
        replies: list[list[int]] = [[] for _ in range(self.n)]
        done = [False] * self.n
        logits = self._feed(pending)
        for step in range(max_tokens):
            nxt = self._pick(logits)
            for i, t in enumerate(nxt):
                if done[i]:
                    continue
                if t in eos:
                    done[i] = True
                    continue
                replies[i].append(t)
                if stop and stop in tok.decode(replies[i], skip_special_tokens=True):
                    done[i] = True
            if all(done) or step == max_tokens - 1:
                break
            # A finished row is fed a hole, so its cache stays as it was.
            logits = self._feed([[t] if not done[i] else [] for i, t in enumerate(nxt)], keep_width=1)
        out = []
        for r in replies:
            text = tok.decode(r, skip_special_tokens=True)
            out.append(text.split(stop)[0] if stop else text)
        return out

    def _pending(self, full: list[list[int]]) -> list[list[int]]:
        """Per row, the tokens to feed; a row's cached tokens past the common prefix become holes."""
        pending = []
        for i, (row, ids) in enumerate(zip(self.rows, full)):
            keep = 0
            for a, b in zip(row.ids, ids):
                if a != b:
                    break
                keep += 1
            # Something must be fed for every row: its next-token logits come from its last fed token.
            keep = min(keep, len(ids) - 1)
            if keep < len(row.ids):
                self.mask[i, row.slots[keep:]] = 0
                del row.ids[keep:], row.slots[keep:]
            pending.append(ids[keep:])
        return pending

    def _feed(self, pending: list[list[int]], keep_width: int | None = None) -> torch.Tensor:
        """Append one block (rows left-padded with holes) to the cache; returns the last slot's logits ``[B, V]``."""
        width = keep_width or max(len(p) for p in pending)
        pad = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((self.n, width), pad, dtype=torch.long)
        block_mask = torch.zeros((self.n, width), dtype=torch.long)
        pos = torch.zeros((self.n, width), dtype=torch.long)
        start = self.slots
        for i, (row, new) in enumerate(zip(self.rows, pending)):
            if not new:
                continue
            off = width - len(new)
            ids[i, off:] = torch.tensor(new)
            block_mask[i, off:] = 1
            pos[i, off:] = torch.arange(len(row.ids), len(row.ids) + len(new))
            row.slots += list(range(start + off, start + width))
            row.ids += new
        self.mask = torch.cat([self.mask, block_mask], dim=1)
        check_plain_pass(self.lm, "generating text (a live recipe, generate mode, or a replay)")
        dev = self.lm.device
        out = self.lm.model(
            input_ids=ids.to(dev),
            attention_mask=self.mask.to(dev),
            position_ids=pos.to(dev),
            **cache_kwargs(self.lm.model, self.cache),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = returned_cache(out)
        return out.logits[:, -1].float().cpu()

    def _pick(self, logits: torch.Tensor) -> list[int]:
        if self.generators is None:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, self.generators)]
