"""The hooks backend (the default): mechfix's passes as plain forward calls with PyTorch hooks.

Activations are captured and patched by forward hooks on the decoder layers,
the attention output projections and the MLPs (:class:`~mechfix.engine.batches.SiteCapture`,
:class:`~mechfix.engine.tails.TailHooks`); a fix's edits are hooks too. Tails run on
the prefixes' key/value cache; gradients come from one autograd call after the
pass (:func:`mechfix.engine.tails.decision_grads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechfix.engine.backends.base import BatchOutput
from mechfix.engine.batches import Capture, Row, SiteCapture, cache_kwargs, final_hidden, pad_batch, returned_cache, target_logprobs
from mechfix.engine.kl import kept_hidden, kl_base_terms, kl_sum
from mechfix.engine.tails import (
    Patch,
    Prefixes,
    Tail,
    TailHooks,
    TailOutput,
    attention_impl,
    decision_attention,
    prefix_inputs,
    score_rows,
    tail_inputs,
)
from mechfix.models import LoadedModel


class HooksBackend:
    """PyTorch hooks on the local model (see the module's docstring)."""

    name = "hooks"
    kl_terms_only = False

    def attach(self, lm: LoadedModel) -> None:
        """Nothing to build: the hooks go on the model itself."""

    def request_pass(self, lm: LoadedModel, batch: Sequence[Row], ids: torch.Tensor, mask: torch.Tensor,
                     capture: Capture) -> BatchOutput:
        """One padded batch: option log-probabilities from the final hidden states, sites kept by hooks."""
        with SiteCapture(lm, capture.sites) as cap:
            cap.rows, cap.pos, cap.lengths = capture.rows, capture.pos, capture.lengths
            hidden = final_hidden(lm, ids, mask)
            where, picked = target_logprobs(lm, hidden, batch)
            got = cap.take() if capture.sites else {}
        return where, picked, got

    def encode_prefixes(self, lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> Prefixes:
        """One pass over the left-padded prefixes, keeping the key/value cache."""
        lengths = [len(p) - 1 for p in prompts]
        ids, mask, position = prefix_inputs(lm, prompts)
        dev = lm.device
        with torch.inference_mode(False), torch.no_grad():
            out = lm.backbone(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=position.to(dev), use_cache=True
            )
        return Prefixes(cache=returned_cache(out), mask=mask, lengths=lengths, width=max(lengths))

    def run_tails(self, lm: LoadedModel, prefixes: Prefixes, tails: Sequence[Tail], *, patches: Sequence[Patch],
                  sites: Sequence[str], grad: bool, attention: bool) -> TailOutput:
        """Tails on a copy of the prefixes' cache, patched and captured by hooks at the decision position."""
        dev = lm.device
        rows, ids, position, mask, cache = tail_inputs(lm, prefixes, tails)
        before = [(layer.keys.shape[-2], layer.values) for layer in cache.layers] if attention else None
        hooks = TailHooks(lm, sites, patches, keep_graph=grad)
        context = torch.enable_grad() if grad else torch.no_grad()
        with torch.inference_mode(False), context, hooks, attention_impl(lm, "eager" if attention else None):
            out = lm.backbone(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position.to(dev),
                **cache_kwargs(lm.backbone, cache),
                use_cache=True,
                output_attentions=attention,
            )
            scores = score_rows(lm, out.last_hidden_state, tails)
        acts = {s: torch.stack(hooks.acts[s], dim=1) for s in sites}  # type: ignore[arg-type]
        result = TailOutput(scores=scores if grad else scores.detach(), acts=acts)
        if grad:
            result.live = {s: list(hooks.live[s]) for s in sites}  # type: ignore[arg-type]
        if attention:
            result.attention = decision_attention(out.attentions, before, cache, prefixes, tails, rows)
        return result

    def full_pass(self, lm: LoadedModel, rows: Sequence[Tail], sites: Sequence[str]) -> TailOutput:
        """Right-padded whole sequences, no cache, the graph kept at every position."""
        dev = lm.device
        ids, mask = pad_batch(lm, [t.ids for t in rows])
        hooks = TailHooks(lm, sites, (), keep_graph=True)
        with torch.inference_mode(False), torch.enable_grad(), hooks:
            out = lm.backbone(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
            scores = score_rows(lm, out.last_hidden_state, rows)
        acts = {s: torch.stack(hooks.acts[s], dim=1) for s in sites}  # type: ignore[arg-type]
        live = {s: list(hooks.live[s]) for s in sites}
        seq_acts = {s: torch.stack([x.detach().float() for x in live[s]], dim=1) for s in sites}  # type: ignore[union-attr]
        return TailOutput(scores=scores, acts=acts, live=live, seq_acts=seq_acts)  # type: ignore[arg-type]

    def kl_base(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfixed terms from one plain pass."""
        head = lm.model.get_output_embeddings()
        return kl_base_terms(lm.logits, head.weight, getattr(head, "bias", None), kept_hidden(lm, ids, mask, pick))

    def kl_fixed(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice, c: torch.Tensor,
                 e: torch.Tensor) -> float:
        """One plain pass with the fix's hooks on."""
        return float(kl_sum(lm.logits, kept_hidden(lm, ids, mask, pick), c, e))
