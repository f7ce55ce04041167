"""The nnsight backend: mechfix's forward passes as nnsight traces (``--backend nnsight``).

Every pass the stages build on has a twin here that runs the same computation
inside ``envoy.trace(...)``:

- :func:`request_pass`: a batch of :func:`mechfix.engine.forward.run_requests` (option scores and the
  captured sites), for record and for every scoring pass of steer and verify;
- :func:`encode_prefixes`, :func:`tail_pass`: the cached prefixes and tails of
  :mod:`mechfix.engine.patching` (patches at the decision position, activations, the
  gradient of the summed scores, the decision position's attention), for
  attribution patching and exact patching;
- :func:`full_pass`: whole sequences with gradients at every position.

They are the methods of :class:`NnsightBackend` (:mod:`mechfix.engine.backends.base`).
Scores, log-softmaxes and gradients are computed inside the trace, so only small
results leave it: the part that matters for NDIF (``--remote``), where only saved
values travel back.

Locally, tails run on cached prefixes as with hooks. A cache cannot outlive a
remote request, so there (and wherever ``lm.trace_prefixes`` is False) each
tail runs as a whole sequence, its prefix recomputed: the same trace code, which
the tests run locally against the hooks backend.

Gradients: a frozen model builds no graph, and a traced activation that is not
marked ``requires_grad`` gets no gradient (remotely: without an error). Every
site read for gradients is marked (:func:`_track`), and :func:`_check_grads`
refuses a pass whose gradients did not all come back. The weights are kept out
of the traced backward pass (:func:`_weights_frozen`), as with hooks.

Fixes: locally a fix's edits are PyTorch hooks, which run inside traces too.
On NDIF (``lm.edits_in_traces``) they are :class:`~mechfix.engine.edits.Edit` records
that every trace applies at their module in forward order (:func:`_visit`), and
KL on neutral text is computed in traces (:func:`kl_base`, :func:`kl_fixed`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from mechfix.architectures import get_path
from mechfix.errors import BadInputError, MechfixError
from mechfix.engine.backends.base import BatchOutput
from mechfix.engine.batches import SITES, Capture, Row, cache_kwargs, pad_batch, returned_cache, target_logprobs
from mechfix.engine.kl import keep_mask, kl_base_terms, kl_sum
from mechfix.models import LoadedModel
from mechfix.engine.tails import (
    Patch,
    Prefixes,
    Tail,
    TailOutput,
    attention_impl,
    decision_attention,
    prefix_inputs,
    score_rows,
    tail_inputs,
)

# The order a decoder layer computes its sites in: a trace must read them in forward order
# (and ask for their gradients in the reverse order).
_FORWARD_ORDER = ("heads", "mlp", "resid")
# The places in a layer where a fix's edits act, in forward order: the attention output projection's input
# (heads) and output (a LoRA fix), the MLP's output, the layer's output.
_SLOTS = ("heads", "attn_out", "mlp", "resid")


class MissingGradientError(MechfixError):
    """A traced backward pass did not return a gradient for every activation asked for (exit code 3)."""


class RemoteError(MechfixError):
    """A trace sent to NDIF failed there or on the way (exit code 3): the server's message, and nothing written."""


@contextmanager
def _remote_failures(lm: LoadedModel) -> Iterator[None]:
    """On a remote model, turn whatever the request raised into a :class:`RemoteError` carrying its message."""
    if not lm.remote:
        yield
        return
    try:
        yield
    except MechfixError:
        raise
    except Exception as exc:  # noqa: BLE001 - the server's and the network's failures come in many types
        raise RemoteError(
            f"the run on NDIF failed: {type(exc).__name__}: {str(exc).strip()[:500]}. Nothing was written. If NDIF "
            "is busy or the model was taken down, try again later (`python -c \"import nnsight; "
            "print(nnsight.ndif.status())\"` shows what it runs)."
        ) from exc


class _Head:
    """The output head read inside a trace, with :class:`LoadedModel`'s ``logits`` and ``token_logits``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, cap: float | None):
        self.weight, self.bias, self.cap = weight, bias, cap

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._softcap(torch.nn.functional.linear(hidden.contiguous(), self.weight, self.bias))

    def token_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("rd,rkd->rk", hidden, self.weight[tokens])
        if self.bias is not None:
            out = out + self.bias[tokens]
        return self._softcap(out)


def _head_path(lm: LoadedModel) -> str:
    head = lm.model.get_output_embeddings()
    return next(name for name, module in lm.model.named_modules() if module is head)


def _head(lm: LoadedModel) -> _Head:
    """The output head, from inside a trace (its weights are the server's on a remote run)."""
    module = get_path(lm.envoy, _head_path(lm))
    cap = getattr(lm.model.config, lm.spec.logit_softcap, None) if lm.spec.logit_softcap else None
    return _Head(module.weight, getattr(module, "bias", None), cap)


def _edit_slots(lm: LoadedModel) -> dict[tuple[int, str], list[Any]]:
    """The pending edits (:mod:`mechfix.engine.edits`) by ``(layer, slot)``, in the order they were put on.

    Raises:
        BadInputError: For an edit on a module traces do not visit.
    """
    if not lm.edits:
        return {}
    where: dict[int, tuple[int, str]] = {}
    for i, layer in enumerate(lm.layers):
        where[id(layer)] = (i, "resid")
        where[id(lm.mlp(i))] = (i, "mlp")
        where[id(lm.attn_out(i))] = (i, "attn_out")
    out: dict[tuple[int, str], list[Any]] = {}
    for e in lm.edits:
        if id(e.module) not in where:
            raise BadInputError(f"a fix edits {type(e.module).__name__}, which nnsight traces here do not reach; "
                                "apply it where the weights are.")
        layer, slot = where[id(e.module)]
        out.setdefault((layer, "heads" if e.pre else slot), []).append(e)
    return out


def _slots_to_visit(lm: LoadedModel, wanted: set[tuple[int, str]], edits: dict[tuple[int, str], list[Any]]):
    """``(layer, slot)`` pairs a trace visits, in forward order: the sites it reads or patches, and its edits' slots."""
    return [(i, s) for i in range(lm.n_layers) for s in _SLOTS if (i, s) in wanted or (i, s) in edits]


def _visit(lm: LoadedModel, layer: int, slot: str, edits: Sequence[Any], seen: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Inside a trace: apply the edits at one slot, and return its site's activation ``[B, T, ...]`` (None for attn_out).

    ``seen`` keeps each layer's attention-projection input once read (a hook point is read once per pass).
    """
    envoy = get_path(lm.envoy, lm.spec.layers)[layer]
    proj = get_path(envoy, lm.spec.attn_out)
    if slot == "heads":
        x = proj.input
        for e in edits:
            new = e.hook(None, (x,))
            if new is not None:
                x = new[0]
                proj.input = x
        seen[layer] = x
        return x
    module = {"attn_out": proj, "mlp": get_path(envoy, lm.spec.mlp), "resid": envoy}[slot]
    args = ()
    if slot == "attn_out":
        args = (seen[layer] if layer in seen else proj.input,)  # its input comes before its output
    out = module.output
    for e in edits:
        new = e.hook(None, args, out)
        if new is not None:
            out = new
            module.output = out
    if slot == "attn_out":
        return None
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _weights_frozen(lm: LoadedModel, grad: bool) -> Iterator[None]:
    """Keep the weights out of a traced backward pass: only the marked activations get gradients, as with hooks.

    A backward inside a trace is ``loss.backward()``, which would also compute and
    keep a gradient for every weight that requires one (most loaded models' do):
    twice the work, and a ``.grad`` left on every weight. A remote model's weights are the server's.
    """
    params = [] if lm.remote or not grad else [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _track(x: torch.Tensor) -> None:
    """Mark a traced activation for gradients (a frozen model's activations are not)."""
    x.requires_grad_(True)


def _patch(lm: LoadedModel, x: torch.Tensor, p: Patch, offsets: torch.Tensor) -> None:
    """Write a patch into a site's activation at each patched row's decision position (in place)."""
    rows = p.rows.to(x.device)
    at = offsets.to(x.device)[rows]
    vals = p.values.to(device=x.device, dtype=x.dtype)
    if p.site != "heads":
        x[rows, at] = vals
    elif p.heads is None:
        x[rows, at] = vals.reshape(len(rows), -1)
    else:
        cols = p.heads.to(x.device)[:, None] * lm.head_dim + torch.arange(lm.head_dim, device=x.device)[None, :]
        x[rows[:, None], at[:, None], cols] = vals


def _trace_kwargs(lm: LoadedModel) -> dict[str, Any]:
    if lm.remote:
        import nnsight

        import mechfix

        # The trace body calls mechfix's own functions: the server has no mechfix, so they travel by value.
        nnsight.register(mechfix)
    # The model's own output head runs on no position (an empty index): mechfix runs the head on the rows it
    # scores, inside the trace. (``logits_to_keep=1`` would still cost a head row per sequence, through the slow
    # path a non-contiguous [B, 1, d] input takes with frozen weights.)
    return {"remote": lm.remote, "logits_to_keep": torch.zeros(0, dtype=torch.long)}


def _input_device(lm: LoadedModel) -> torch.device:
    return torch.device("cpu") if lm.remote else lm.device


def _check_grads(grads: Sequence[Any], expected: int, shape: Sequence[torch.Size]) -> None:
    """Refuse a traced backward pass whose gradients did not all come back.

    Raises:
        MissingGradientError: Naming how many were missing.
    """
    bad = [i for i, g in enumerate(grads) if not isinstance(g, torch.Tensor)]
    bad += [i for i, (g, s) in enumerate(zip(grads, shape)) if isinstance(g, torch.Tensor) and g.shape != s]
    if len(grads) != expected or bad:
        raise MissingGradientError(
            f"the traced backward pass returned {len(grads) - len(bad)} of {expected} gradients. An activation read "
            "in an nnsight trace gets a gradient only when it is marked requires_grad before the loss is built "
            "(remote runs otherwise return nothing, without an error). This is a bug in mechfix: please report it; "
            "--backend hooks runs the same computation."
        )


def _run(
    lm: LoadedModel,
    inputs: dict[str, Any],
    offsets: Sequence[int],
    tails: Sequence[Tail],
    *,
    patches: Sequence[Patch] = (),
    sites: Sequence[str] = SITES,
    grad: bool = False,
    every_position: bool = False,
    attention: str = "none",
) -> dict[str, Any]:
    """One trace: patch, capture, score and differentiate a batch of rows.

    Args:
        lm: The model (nnsight backend).
        inputs: Forward arguments (ids, masks, positions, cache).
        offsets: Per row, the sequence position of its tail's first token (the decision position).
        tails: The rows; target positions count from the row's offset.
        patches: Written at each row's offset.
        sites: Captured at the offsets (or at every position).
        grad: Also the gradient of the summed scores at each captured site.
        every_position: Capture (and differentiate) every position instead of the offsets.
        attention: ``none``; ``output`` (return the model's attention weights, for a cached
            prefix); ``decision`` (the decision position's weights and the cached values, whole sequences).

    Returns:
        ``scores [R]``, ``acts`` (site to per-layer ``[R, ...]`` or ``[R, T, ...]``), ``grads``
        (same, or None) and ``attention`` (or None).
    """
    import nnsight

    n = len(tails)
    off = torch.tensor(list(offsets), dtype=torch.long)
    rows = torch.arange(n)
    shifted = [Tail(t.prefix, t.ids, t.start, [(s, o + j, tok) for s, j, tok in t.targets]) for t, o in zip(tails, offsets)]
    by_site: dict[tuple[str, int], list[Patch]] = {}
    for p in patches:
        by_site.setdefault((p.site, p.layer), []).append(p)
    edits = _edit_slots(lm)
    order = _slots_to_visit(lm, {(i, s) for i in range(lm.n_layers) for s in _FORWARD_ORDER
                                 if s in sites or (s, i) in by_site}, edits)
    kept_sites = [(i, s) for i, s in order if s in sites]
    dev = _input_device(lm)
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    context = torch.enable_grad() if grad else torch.no_grad()
    try:
        with _remote_failures(lm), _weights_frozen(lm, grad), torch.inference_mode(False), context, \
                lm.envoy.trace(**inputs, **_trace_kwargs(lm)):
            live, seen = [], {}
            acts = nnsight.save([])
            for i, site in order:
                x = _visit(lm, i, site, edits.get((i, site), ()), seen)
                if x is None:
                    continue
                for p in by_site.get((site, i), ()):
                    _patch(lm, x, p, off)
                if site in sites:
                    if grad:
                        _track(x)
                    live.append(x)
                    acts.append((x if every_position else x[rows.to(x.device), off.to(x.device)]).detach().float())
            head = _head(lm)
            hidden = get_path(lm.envoy, lm.spec.backbone).output[0]
            scores = score_rows(head, hidden, shifted)
            saved = scores.detach().save()
            grads = nnsight.save([])
            if grad:
                with scores.sum().backward():
                    for x in reversed(live):
                        g = x.grad
                        grads.append((g if every_position else g[rows.to(g.device), off.to(g.device)]).float())
            att = nnsight.save([])
            if attention == "output":
                att.append(lm.envoy.output.attentions)
            elif attention == "decision":
                cache = returned_cache(lm.envoy.output)
                for i, w in enumerate(lm.envoy.output.attentions):
                    att.append((w[rows.to(w.device), :, off.to(w.device)].float(), cache.layers[i].values.float()))
    except NotImplementedError as exc:
        if grad and "require grad" in str(exc):
            _check_grads([], len(kept_sites), [])
        raise
    if grad:
        grads = list(reversed(list(grads)))
        _check_grads(grads, len(kept_sites), [a.shape for a in acts])
    return {
        "scores": saved,
        "acts": _by_site(lm, kept_sites, list(acts), sites),
        "grads": _by_site(lm, kept_sites, grads, sites) if grad else None,
        "attention": list(att) if attention != "none" else None,
    }


def _by_site(lm: LoadedModel, kept: Sequence[tuple[int, str]], values: Sequence[torch.Tensor], sites: Sequence[str]) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {s: [None] * lm.n_layers for s in sites}  # type: ignore[misc]
    for (i, s), v in zip(kept, values):
        out[s][i] = v.cpu()
    return out


def _stack(lm: LoadedModel, per_layer: dict[str, list[torch.Tensor]], split_heads: bool) -> dict[str, torch.Tensor]:
    """Site to ``[R, L, ...]`` (layers stacked on dim 1), heads split into ``[H, dh]`` if asked."""
    out = {}
    for s, xs in per_layer.items():
        x = torch.stack(xs, dim=1)
        out[s] = x.reshape(*x.shape[:-1], lm.n_heads, lm.head_dim) if s == "heads" and split_heads else x
    return out


def request_pass(lm: LoadedModel, batch: Sequence[Row], ids: torch.Tensor, mask: torch.Tensor, capture: Capture):
    """A batch pass of :func:`mechfix.engine.forward.run_requests` as one trace (same return values as its hooks pass)."""
    import nnsight

    sites = capture.sites
    edits = _edit_slots(lm)
    order = _slots_to_visit(lm, {(i, s) for i in range(lm.n_layers) for s in sites}, edits)
    kept_sites = [(i, s) for i, s in order if s in sites]
    dev = _input_device(lm)
    with _remote_failures(lm), lm.envoy.trace(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False,
                                              **_trace_kwargs(lm)):
        kept, seen = nnsight.save([]), {}
        for i, site in order:
            x = _visit(lm, i, site, edits.get((i, site), ()), seen)
            if site not in sites:
                continue
            if capture.lengths is None:
                kept.append(x[capture.rows.to(x.device), capture.pos.to(x.device)].float())
            else:
                for r, length in zip(capture.rows.tolist(), capture.lengths):
                    kept.append(x[r, :length].float())
        hidden = get_path(lm.envoy, lm.spec.backbone).output[0]
        picked = target_logprobs(_head(lm), hidden, batch)[1].save()
    # Only saved values leave a trace: which (row, option) each score is, again out here.
    where = [(b, k) for b, r in enumerate(batch) for k, _, _ in r.targets]
    got: dict[str, object] = {}
    if capture.lengths is None:
        per = _by_site(lm, kept_sites, kept, sites)
        got = dict(_stack(lm, per, split_heads=True))
    else:
        width = len(capture.lengths)
        for s in sites:
            layers = [[x.cpu() for x in kept[j * width: (j + 1) * width]]
                      for j, (_, site) in enumerate(kept_sites) if site == s]
            rows = [torch.stack([layer[r] for layer in layers], dim=1) for r in range(width)]  # [n, L, ...]
            got[s] = [x.reshape(*x.shape[:-1], lm.n_heads, lm.head_dim) if s == "heads" else x for x in rows]
    return where, picked, got


def encode_prefixes(lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> Prefixes:
    """:func:`mechfix.engine.patching.encode_prefixes` as a trace, or (remote) the prompts alone for whole-sequence tails."""
    lengths = [len(p) - 1 for p in prompts]
    width = max(lengths)
    kept = [list(p) for p in prompts]
    if not lm.trace_prefixes:
        # Each tail reruns its prefix: a row costs about what a cache row would.
        row_cost = 2 * lm.n_layers * lm.hidden * (width + 1) * torch.finfo(lm.dtype).bits // 8
        return Prefixes(cache=None, mask=None, lengths=lengths, width=width, prompts=kept, row_cost=row_cost)
    ids, mask, position = prefix_inputs(lm, prompts)
    dev = _input_device(lm)
    edits = _edit_slots(lm)
    with torch.inference_mode(False), torch.no_grad(), lm.envoy.trace(
        input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=position.to(dev), use_cache=True,
        **_trace_kwargs(lm),
    ):
        seen = {}
        for i, slot in _slots_to_visit(lm, set(), edits):
            _visit(lm, i, slot, edits[(i, slot)], seen)
        cache = returned_cache(lm.envoy.output).save()
    return Prefixes(cache=cache, mask=mask, lengths=lengths, width=width, prompts=kept)


def tail_pass(
    lm: LoadedModel,
    prefixes: Prefixes,
    tails: Sequence[Tail],
    *,
    patches: Sequence[Patch] = (),
    sites: Sequence[str] = SITES,
    grad: bool = False,
    attention: bool = False,
) -> TailOutput:
    """:func:`mechfix.engine.patching.run_tails` as one trace (gradients computed in it; see :class:`TailOutput`)."""
    # Remote traces run the server's attention kernel: no weights to return.
    attention = attention and not lm.remote
    if prefixes.cache is None:
        seqs = [prefixes.prompts[t.prefix][:-1] + list(t.ids) for t in tails]  # type: ignore[index]
        ids, mask = pad_batch(lm, seqs)
        offsets = [len(prefixes.prompts[t.prefix]) - 1 for t in tails]  # type: ignore[index]
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": attention}
        mode = "decision" if attention else "none"
        cache = before = rows = None
    else:
        rows, ids, position, mask, cache = tail_inputs(lm, prefixes, tails)
        before = [(layer.keys.shape[-2], layer.values) for layer in cache.layers] if attention else None
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position, **cache_kwargs(lm.model, cache),
                  "use_cache": True}
        offsets = [0] * len(tails)
        mode = "output" if attention else "none"
    if attention:
        inputs["output_attentions"] = True
    with attention_impl(lm, "eager" if attention else None):
        res = _run(lm, inputs, offsets, tails, patches=patches, sites=sites, grad=grad, attention=mode)
    out = TailOutput(scores=res["scores"].float().cpu(), acts=_stack(lm, res["acts"], split_heads=True) if sites else {})
    if grad:
        out.grads = _stack(lm, res["grads"], split_heads=True)
    if mode == "output":
        out.attention = decision_attention(res["attention"][0], before, cache, prefixes, tails, rows)
    elif mode == "decision":
        out.attention = _whole_sequence_attention(res["attention"], mask)
    return out


def _whole_sequence_attention(per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor):
    """The decision position's weights, the values and each key's prompt index, for whole-sequence rows.

    None when a layer's cache kept fewer values than the sequence has keys (a sliding window).
    """
    width = mask.shape[1]
    token = torch.where(mask.bool(), torch.arange(width)[None, :], torch.full_like(mask, -1))
    out = []
    for w, v in per_layer:
        if v.shape[-2] != width:
            return None
        out.append((w.cpu(), v.cpu(), token))
    return out


def full_pass(lm: LoadedModel, rows: Sequence[Tail], sites: Sequence[str] = SITES) -> TailOutput:
    """:func:`mechfix.engine.patching.full_pass` as one trace: every position's activations and gradients."""
    ids, mask = pad_batch(lm, [t.ids for t in rows])
    res = _run(lm, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, [0] * len(rows), rows,
               sites=sites, grad=True, every_position=True)
    seq = _stack(lm, res["acts"], split_heads=False)  # [R, L, T, ...]
    acts = {s: x[:, :, 0] for s, x in seq.items()}
    acts = {s: (x.reshape(*x.shape[:-1], lm.n_heads, lm.head_dim) if s == "heads" else x) for s, x in acts.items()}
    return TailOutput(scores=res["scores"].float().cpu(), acts=acts, grads=_stack(lm, res["grads"], split_heads=True),
                      seq_acts=seq)


def _kept(lm: LoadedModel, mask: torch.Tensor, pick: slice) -> torch.Tensor:
    """Inside a trace: the final hidden states ``[P, d]`` at the ``pick`` of the positions with a next token."""
    hidden = get_path(lm.envoy, lm.spec.backbone).output[0]
    return hidden[keep_mask(mask).to(hidden.device)][pick]


def kl_base(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfixed model's KL terms of one neutral batch (:func:`mechfix.engine.kl.kl_base_terms`), in one trace."""
    import nnsight

    dev = _input_device(lm)
    with _remote_failures(lm), torch.inference_mode(False), torch.no_grad(), lm.envoy.trace(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, **_trace_kwargs(lm)):
        head = _head(lm)
        terms = nnsight.save(kl_base_terms(head.logits, head.weight, head.bias, _kept(lm, mask, pick)))
    return terms[0].cpu(), terms[1].cpu()


def kl_fixed(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice, c: torch.Tensor, e: torch.Tensor) -> float:
    """Summed KL over one neutral batch with the pending edits applied (:func:`mechfix.engine.kl.kl_sum`), in one
    trace that returns one number."""
    edits = _edit_slots(lm)
    dev = _input_device(lm)
    with _remote_failures(lm), torch.inference_mode(False), torch.no_grad(), lm.envoy.trace(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False, **_trace_kwargs(lm)):
        seen = {}
        for i, slot in _slots_to_visit(lm, set(), edits):
            _visit(lm, i, slot, edits[(i, slot)], seen)
        head = _head(lm)
        total = kl_sum(head.logits, _kept(lm, mask, pick), c, e).save()
    return float(total)


class NnsightBackend:
    """nnsight traces, locally or on NDIF (see the module's docstring)."""

    name = "nnsight"
    # Only the cached KL terms travel back from a trace, so KL is always computed from them.
    kl_terms_only = True

    def attach(self, lm: LoadedModel) -> None:
        """Wrap the model for tracing (a remote model comes wrapped already)."""
        if lm.envoy is None:
            import nnsight

            lm.envoy = nnsight.TransformersModel(lm.model, tokenizer=lm.tokenizer)

    def request_pass(self, lm: LoadedModel, batch: Sequence[Row], ids: torch.Tensor, mask: torch.Tensor,
                     capture: Capture) -> BatchOutput:
        """:func:`request_pass`."""
        return request_pass(lm, batch, ids, mask, capture)

    def encode_prefixes(self, lm: LoadedModel, prompts: Sequence[Sequence[int]]) -> Prefixes:
        """:func:`encode_prefixes`."""
        return encode_prefixes(lm, prompts)

    def run_tails(self, lm: LoadedModel, prefixes: Prefixes, tails: Sequence[Tail], *, patches: Sequence[Patch],
                  sites: Sequence[str], grad: bool, attention: bool) -> TailOutput:
        """:func:`tail_pass`."""
        return tail_pass(lm, prefixes, tails, patches=patches, sites=sites, grad=grad, attention=attention)

    def full_pass(self, lm: LoadedModel, rows: Sequence[Tail], sites: Sequence[str]) -> TailOutput:
        """:func:`full_pass`."""
        return full_pass(lm, rows, sites)

    def kl_base(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`kl_base`."""
        return kl_base(lm, ids, mask, pick)

    def kl_fixed(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pick: slice, c: torch.Tensor,
                 e: torch.Tensor) -> float:
        """:func:`kl_fixed`."""
        return kl_fixed(lm, ids, mask, pick, c, e)
