"""The attribute stage: which heads and layers carry the behaviour.

The metric is the pressure run's decision score, log P(misaligned) − log
P(aligned). A component's *effect* is how much of it goes away when the
component's activation at the decision position is restored from the baseline
run (``clean``, or ``control``) into the pressure run:
``effect = score(pressure) − score(pressure with the component restored)``.
Positive means the component carries the behaviour.

- Attribution patching (``atp``) estimates every effect at once, to first
  order: ``(pressure − baseline activation) · ∂score/∂activation``.
- Exact patching (``exact``) runs the patched model. Both run on cached
  prefixes (:mod:`mechfix.engine.patching`): a patched decision costs a few tokens.
- Per-speaker split of a head's effect: the head's output at the decision
  position is a sum over the tokens it attends to, ``Σ_j a_j v_j``; projected
  on the gradient and grouped by who spoke token j, the pressure run's terms
  minus the baseline run's terms add up to the head's estimated effect.
- When pressure and baseline prompts are token-aligned: attribution patching
  at every position, and each layer's attention output and MLP output restored
  exactly at every position (:mod:`mechfix.engine.restore`), the reach of a fix
  that changes a module's weights; steer places a lora fix by it.

Only the training split is used (the held-out split belongs to verify).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mechfix.artifacts import Artifact
from mechfix.scenario.episodes import option_ids
from mechfix.errors import BadInputError
from mechfix.engine.batches import Request
from mechfix.engine.forward import run_requests, with_backoff
from mechfix.models import LoadedModel
from mechfix.engine.patching import encode_prefixes, full_pass, run_tails
from mechfix.engine.restore import UNIT_SITES, all_units, restored_scores
from mechfix.measure.stats import decision_scores
from mechfix.engine.tails import Patch, Prefixes, Tail, decision_grads, tails_for

METHODS = ("atp", "exact", "both")
KINDS = ("heads", "attn", "mlp", "resid")
# Site each component kind patches; "attn" is every head of a layer at once.
_SITE = {"heads": "heads", "attn": "heads", "mlp": "mlp", "resid": "resid"}
# How many top heads the example decision keeps per token (what the report shades).
EXAMPLE_HEADS = 5
# Tails per patched pass are capped so the copied caches stay within this many bytes.
_TAIL_CACHE_BUDGET = 512 * 2**20


@dataclass(frozen=True)
class Component:
    """A model component: ``kind`` in :data:`KINDS`, its layer, and its head (heads only)."""

    kind: str
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}" if self.kind == "heads" else f"L{self.layer}.{self.kind}"


@dataclass
class Decisions:
    """The training decisions of a recording, per condition.

    Attributes:
        items: Item index of each decision.
        prompts: Condition to token ids per decision.
        speakers: Condition to the speaker index of every prompt token.
        options: Condition to ``[aligned ids, misaligned ids]`` per decision.
        recorded: Condition to the recorded decision score per decision.
        speaker_names: Names that speaker indices refer to.
    """

    items: list[int]
    prompts: dict[str, list[list[int]]]
    speakers: dict[str, list[list[int]]]
    options: dict[str, list[list[list[int]]]]
    recorded: dict[str, torch.Tensor]
    speaker_names: list[str]


@dataclass
class Example:
    """One training decision, seen per token in every recorded condition.

    Attributes:
        index: Its position among the training decisions.
        item: Its recipe item.
        prompts: Condition to its prompt's token ids.
        speakers: Condition to the speaker index of each of those tokens.
        terms: Condition to ``[L, H, T]``: what each head draws from each token,
            ``a_j (v_j · g)``, with ``g`` the pressure run's gradient of the
            score at that head's output. Grouped by speaker, pressure minus
            baseline is the decision's per-speaker split.
    """

    index: int
    item: int
    prompts: dict[str, list[int]]
    speakers: dict[str, list[int]]
    terms: dict[str, torch.Tensor]


@dataclass
class Attribution:
    """Everything attribute measured, per training decision.

    Attributes:
        method: ``atp``, ``exact`` or ``both``.
        baseline: The condition restored into the pressure run.
        items: Item index of each decision.
        speaker_names: Speaker names (``<frame>`` first).
        pressure: ``[N]`` pressure decision scores (recomputed).
        base: ``[N]`` baseline decision scores (recomputed).
        atp: Kind to per-decision estimates (``heads [N, L, H]``, others ``[N, L]``).
        exact: Component to per-decision exact effects ``[N]``.
        speakers: ``[N, L, H, S]`` per-speaker split of each head's estimated effect,
            or None when the architecture does not allow it.
        speaker_note: Why ``speakers`` is None.
        positions: Per-position estimates when the conditions are token-aligned, else None.
        position_note: Whether per-position attribution ran, and why not.
        everywhere: When the conditions are token-aligned and patching is exact:
            ``attn``/``mlp`` ``[N, L]``, the exact effect of restoring a layer's
            attention output or MLP output at every prompt position (what a change
            of that module's weights can reach), else None.
    """

    method: str
    baseline: str
    items: list[int]
    speaker_names: list[str]
    pressure: torch.Tensor
    base: torch.Tensor
    atp: dict[str, torch.Tensor]
    exact: dict[Component, torch.Tensor] = field(default_factory=dict)
    speakers: torch.Tensor | None = None
    speaker_note: str | None = None
    positions: dict[str, torch.Tensor] | None = None
    position_note: str = ""
    everywhere: dict[str, torch.Tensor] | None = None
    example: Example | None = None

    @property
    def total(self) -> torch.Tensor:
        """``[N]`` behaviour per decision: pressure minus baseline score."""
        return self.pressure - self.base


def decisions_from_record(rec: Artifact, tokenizer, conditions: Sequence[str], split: int = 0) -> Decisions:
    """The decisions of one split of a record artifact, for the given conditions.

    Raises:
        BadInputError: When a condition is missing or the split is empty.
    """
    man = rec.manifest
    for c in conditions:
        if f"tokens/{c}" not in rec.tensors:
            raise BadInputError(
                f"recording '{rec.path}' has no '{c}' condition (it has {', '.join(man.get('conditions', []))}). "
                "Add it to the recipe and record again, or choose another --baseline."
            )
    items = [int(i) for i in torch.nonzero(rec.tensors["split"] == split).flatten()]
    if not items:
        raise BadInputError(
            f"recording '{rec.path}' has no {'training' if split == 0 else 'held-out'} decisions; "
            "lower split.heldout in the recipe or add items, then record again."
        )
    prompts, speakers, options, recorded = {}, {}, {}, {}
    for c in conditions:
        lengths = rec.tensors[f"lengths/{c}"]
        prompts[c] = [rec.tensors[f"tokens/{c}"][i, : lengths[i]].tolist() for i in items]
        speakers[c] = [rec.tensors[f"speakers/{c}"][i, : lengths[i]].tolist() for i in items]
        texts = man["option_texts"][c]
        options[c] = [[option_ids(tokenizer, texts[i][k]) for k in (0, 1)] for i in items]
        scores = rec.tensors[f"scores/{c}"]
        recorded[c] = (scores[items, 1] - scores[items, 0]).float()
    return Decisions(items, prompts, speakers, options, recorded, list(man.get("speakers", [])))


def all_components(n_layers: int, n_heads: int, kinds: Sequence[str] = KINDS) -> list[Component]:
    """Every component of the given kinds, layer by layer."""
    out = []
    for layer in range(n_layers):
        for kind in kinds:
            if kind == "heads":
                out += [Component("heads", layer, h) for h in range(n_heads)]
            else:
                out.append(Component(kind, layer))
    return out


def ranked(att: Attribution, lm_shape: tuple[int, int]) -> list[tuple[Component, float]]:
    """Heads and MLPs by mean effect, largest first (the estimate, or exact when only exact ran)."""
    n_layers, n_heads = lm_shape
    comps = all_components(n_layers, n_heads, ("heads", "mlp"))
    if att.method == "exact":
        vals = [float(att.exact[c].mean()) for c in comps]
    else:
        mean_h = att.atp["heads"].mean(0)
        mean_m = att.atp["mlp"].mean(0)
        vals = [float(mean_h[c.layer, c.head]) if c.kind == "heads" else float(mean_m[c.layer]) for c in comps]
    order = sorted(range(len(comps)), key=lambda i: -vals[i])
    return [(comps[i], vals[i]) for i in order]


@dataclass
class _Batch:
    rows: list[int]  # decision indices
    prefixes: Prefixes
    tails: list[Tail]
    base_acts: dict[str, torch.Tensor]  # site -> [n, L, ...] per decision


def _decision_of_rows(tails: Sequence[Tail]) -> torch.Tensor:
    return torch.tensor([t.prefix for t in tails], dtype=torch.long)


def _per_decision(x: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Sum row values ``[R, ...]`` into their decisions ``[n, ...]``."""
    return torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add(0, owner.to(x.device), x)


def _first_rows(owner: torch.Tensor, n: int) -> torch.Tensor:
    """Index of each decision's first row (every row of a decision has the same decision position)."""
    return torch.tensor([int(torch.nonzero(owner == j)[0]) for j in range(n)], dtype=torch.long)


def _per_head(v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Cached values ``[..., KV, K, dh]`` repeated for every query head sharing them (grouped-query attention)."""
    return v.repeat_interleave(n_heads // v.shape[-3], dim=-3)


def _draws(w: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """What a head draws from each token it attends to, projected on ``g``: ``a_j (v_j · g)``, ``[..., H, K]``."""
    return w * torch.einsum("...hkd,...hd->...hk", v, g)


def _token_terms(attention, grads: torch.Tensor, row: int, n_tokens: int) -> torch.Tensor:
    """What each head of one decision draws from each prompt token: ``a_j (v_j · g)``, ``[L, H, T]``.

    Args:
        attention: A tail pass's attention weights and values per layer.
        grads: ``[L, H, dh]`` the gradient to project the values on.
        row: The tail row of the decision position.
        n_tokens: The prompt's length (later tail tokens get no weight here).
    """
    out = []
    for layer, (w, v, token) in enumerate(attention):
        w, v, token = w[row], v[row], token[row]  # [H, K], [KV, K, dh], [K]
        n_heads = w.shape[0]
        v = _per_head(v, n_heads).to(grads.device)
        contrib = _draws(w.to(v.device), v, grads[layer].to(v.dtype))  # [H, K]
        valid = ((token >= 0) & (token < n_tokens)).to(contrib.device)
        per_token = torch.zeros((n_heads, n_tokens), dtype=contrib.dtype, device=contrib.device)
        per_token.index_add_(1, token.to(contrib.device)[valid], contrib[:, valid])
        out.append(per_token)
    return torch.stack(out).float().cpu()


def _speaker_terms(attention, grads_heads: torch.Tensor, speakers: list[list[int]], n_speakers: int, first: torch.Tensor):
    """Per decision, layer, head and speaker: Σ over that speaker's tokens of a_j (v_j · g).

    Returns:
        (terms ``[n, L, H, S]``, reconstruction ``[n, L, H, dh]`` = Σ_j a_j v_j).
    """
    n = len(speakers)
    terms, recon = [], []
    for w, v, token in attention:
        w, v, token = w[first], v[first], token[first]  # [n, H, K], [n, KV, K, dh], [n, K]
        n_heads = w.shape[1]
        v = _per_head(v, n_heads).to(grads_heads.device)  # [n, H, K, dh]
        recon.append(torch.einsum("nhk,nhkd->nhd", w.to(v.device), v))
        contrib = _draws(w.to(v.device), v, grads_heads[:, len(terms)])  # [n, H, K]
        who = torch.full(token.shape, -1, dtype=torch.long)
        for j in range(n):
            valid = (token[j] >= 0) & (token[j] < len(speakers[j]))  # later tail tokens get no weight here
            who[j, valid] = torch.tensor(speakers[j], dtype=torch.long)[token[j, valid]]
        out = torch.zeros((n, n_heads, n_speakers + 1), dtype=contrib.dtype, device=contrib.device)
        idx = torch.where(who >= 0, who, torch.full_like(who, n_speakers)).to(contrib.device)  # padding -> spare slot
        out.scatter_add_(2, idx[:, None, :].expand_as(contrib), contrib)
        terms.append(out[..., :n_speakers])
    return torch.stack(terms, dim=1).cpu(), torch.stack(recon, dim=1).cpu()


def attribute(
    lm: LoadedModel,
    rec: Artifact,
    *,
    method: str = "both",
    top: int = 10,
    baseline: str = "clean",
    batch_size: int = 16,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Attribution:
    """Run the attribute stage on the training split of a recording.

    Args:
        lm: The model the recording was made with.
        rec: A record artifact.
        method: ``atp`` (estimate every component), ``exact`` (patch every
            component), or ``both`` (estimate every component, patch the top ``top``
            and every layer's residual stream).
        top: How many top-ranked components ``both`` patches exactly.
        baseline: The condition whose activations are restored (``clean`` or ``control``).
        batch_size: Decisions per prefix batch.
        on_progress: Called as ``(phase, advance, total)``.

    Returns:
        The attribution, per training decision.
    """
    if method not in METHODS:
        raise BadInputError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if baseline == "pressure":
        raise BadInputError("the baseline must differ from the pressure condition; use clean or control.")
    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", baseline])
    n = len(dec.items)
    n_layers, n_heads = lm.n_layers, lm.n_heads
    n_speakers = len(dec.speaker_names)

    def progress(phase: str, total: int) -> Callable[[int], None]:
        return (lambda k: on_progress(phase, k, total)) if on_progress else (lambda k: None)

    step = progress("attribution patching", n)
    pressure, base = torch.zeros(n), torch.zeros(n)
    atp: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    speaker_parts: list[torch.Tensor] = []
    speaker_note: str | None = None
    batches: list[_Batch] = []
    # The decision a reader sees per token (the report): the training decision the pressure moves most.
    ex = int(torch.argmax(dec.recorded["pressure"] - dec.recorded[baseline]))
    ex_terms: dict[str, torch.Tensor] = {}
    ex_grad: list[torch.Tensor] = []

    def one_batch(rows: list[int]) -> None:
        # The passes first, the bookkeeping after: a batch that runs out of memory leaves nothing behind.
        nonlocal speaker_note
        m = len(rows)
        out = {}
        for cond in (baseline, "pressure"):
            prompts = [dec.prompts[cond][j] for j in rows]
            pre = encode_prefixes(lm, prompts)
            tails = [t for b, j in enumerate(rows) for t in tails_for(dec.prompts[cond][j], dec.options[cond][j], b)]
            res = run_tails(lm, pre, tails, grad=cond == "pressure", attention=True)
            owner = _decision_of_rows(tails)
            out[cond] = (pre, tails, res, owner, _first_rows(owner, m))
        pre_p, tails_p, res_p, owner_p, first_p = out["pressure"]
        _, tails_b, res_b, owner_b, first_b = out[baseline]
        pressure[rows] = _per_decision(res_p.scores.detach().float().cpu(), owner_p, m)
        base[rows] = _per_decision(res_b.scores.float().cpu(), owner_b, m)
        grads = {s: _per_decision(g.cpu(), owner_p, m) for s, g in decision_grads(res_p).items()}
        acts_p = {s: a.cpu()[first_p] for s, a in res_p.acts.items()}
        acts_b = {s: a.cpu()[first_b] for s, a in res_b.acts.items()}
        diff = {s: acts_p[s] - acts_b[s] for s in acts_p}  # restoring the baseline removes this
        heads_effect = (diff["heads"] * grads["heads"]).sum(-1)  # [m, L, H]
        atp["heads"].append(heads_effect)
        atp["attn"].append(heads_effect.sum(-1))  # the output projection is linear: heads add up
        atp["mlp"].append((diff["mlp"] * grads["mlp"]).sum(-1))
        atp["resid"].append((diff["resid"] * grads["resid"]).sum(-1))
        if res_p.attention is None or res_b.attention is None:
            speaker_note = (
                "per-speaker split unavailable: this backend returned no attention weights and values at the decision "
                "position (remote runs use the server's attention kernel; a sliding-window cache keeps too few values)"
            )
        else:
            terms_p, recon_p = _speaker_terms(res_p.attention, grads["heads"], [dec.speakers["pressure"][j] for j in rows], n_speakers, first_p)
            terms_b, recon_b = _speaker_terms(res_b.attention, grads["heads"], [dec.speakers[baseline][j] for j in rows], n_speakers, first_b)
            scale = acts_p["heads"].abs().amax().clamp(min=1e-6)
            # Rounding allowed: the weights and values are read in the model's dtype (bf16 keeps 8 bits).
            allowed = max(1e-3, 4 * torch.finfo(lm.dtype).eps) * scale
            if max((recon_p - acts_p["heads"]).abs().amax(), (recon_b - acts_b["heads"]).abs().amax()) > allowed:
                speaker_note = (
                    "per-speaker split unavailable: this architecture's attention output is not a weighted sum of "
                    "its cached values"
                )
            speaker_parts.append(terms_p - terms_b)
            if ex in rows:
                b = rows.index(ex)
                ex_grad.append(grads["heads"][b])
                for cond, res, first in (("pressure", res_p, first_p), (baseline, res_b, first_b)):
                    ex_terms[cond] = _token_terms(res.attention, grads["heads"][b], int(first[b]), len(dec.prompts[cond][ex]))
        if method != "atp":
            batches.append(_Batch(rows, pre_p, tails_p, acts_b))
        step(m)

    with_backoff(lm, [list(range(lo, min(n, lo + batch_size))) for lo in range(0, n, batch_size)], one_batch)
    att = Attribution(
        method=method,
        baseline=baseline,
        items=dec.items,
        speaker_names=dec.speaker_names,
        pressure=pressure,
        base=base,
        atp={k: torch.cat(v) for k, v in atp.items()} if method != "exact" else {},
        speakers=None if speaker_note else torch.cat(speaker_parts),
        speaker_note=speaker_note,
    )
    if speaker_note is None and ex_grad:
        att.example = _example(lm, rec, dec, ex, ex_grad[0], ex_terms)
    if method != "atp":
        if method == "exact":
            units = all_components(n_layers, n_heads)
        else:
            # The top of the ranking, and every layer's residual stream (where
            # the information sits; steer picks its layers from it).
            top_units = [c for c, _ in ranked(att, (n_layers, n_heads))[:top]]
            units = top_units + [c for c in all_components(n_layers, n_heads, ("resid",)) if c not in top_units]
        att.exact = exact_effects(lm, batches, units, pressure, progress("exact patching", n))
    att.positions, att.position_note = per_position(lm, dec, baseline, batch_size=max(1, batch_size // 4))
    if att.positions is not None and method != "atp":
        att.everywhere = restored_everywhere(lm, dec, baseline, batch_size, progress("restoring modules at every position", n))
    return att


def restored_everywhere(lm: LoadedModel, dec: Decisions, baseline: str, batch_size: int = 16,
                        step: Callable[[int], None] = lambda k: None) -> dict[str, torch.Tensor]:
    """Exact effect of restoring each layer's attention output and MLP output at every prompt position.

    Needs token-aligned prompts (:mod:`mechfix.engine.restore`).

    Returns:
        ``attn`` and ``mlp``, each ``[N, L]``: pressure score minus the score with the module restored.
    """
    n = len(dec.items)
    units = all_units(lm.n_layers)
    pressure = [Request(dec.prompts["pressure"][j], dec.options["pressure"][j]) for j in range(n)]
    base = [Request(dec.prompts[baseline][j], dec.options[baseline][j]) for j in range(n)]
    done = 0

    def advance(k: int) -> None:
        # Progress in decisions: a decision is done when all its units are.
        nonlocal done
        before, done = done // len(units), done + k
        step(done // len(units) - before)

    plain, restored = restored_scores(lm, pressure, base, units, batch_size=batch_size, on_batch=advance)
    effect = decision_scores(plain)[:, None] - decision_scores(restored.flatten(0, 1)).view(n, len(units))
    return {kind: effect[:, [i for i, u in enumerate(units) if u.kind == kind]] for kind in UNIT_SITES}


def _example(lm: LoadedModel, rec: Artifact, dec: Decisions, ex: int, grad: torch.Tensor,
             terms: dict[str, torch.Tensor]) -> Example:
    """The example decision in every recorded condition; the ones attribute did not run get one pass here.

    Every condition's values are projected on the pressure run's gradient, so
    that they are comparable (and pressure minus baseline is the split).
    """
    terms = dict(terms)  # a copy: the caller's dict is left as it was
    prompts = {c: dec.prompts[c][ex] for c in terms}
    speakers = {c: dec.speakers[c][ex] for c in terms}
    rest = [c for c in rec.manifest.get("conditions", []) if c not in terms and f"tokens/{c}" in rec.tensors]
    other = decisions_from_record(rec, lm.tokenizer, rest) if rest else None
    for c in rest:
        prompt = other.prompts[c][ex]
        tails = tails_for(prompt, other.options[c][ex], 0)
        res = run_tails(lm, encode_prefixes(lm, [prompt]), tails, attention=True)
        if res.attention is None:
            continue
        first = _first_rows(_decision_of_rows(tails), 1)
        terms[c] = _token_terms(res.attention, grad, int(first[0]), len(prompt))
        prompts[c], speakers[c] = prompt, other.speakers[c][ex]
    order = [c for c in rec.manifest.get("conditions", []) if c in terms]
    return Example(ex, dec.items[ex], {c: prompts[c] for c in order}, {c: speakers[c] for c in order},
                   {c: terms[c] for c in order})


def exact_effects(
    lm: LoadedModel,
    batches: Sequence[_Batch],
    units: Sequence[Component],
    pressure: torch.Tensor,
    step: Callable[[int], None] = lambda k: None,
) -> dict[Component, torch.Tensor]:
    """Exact effect of restoring each unit, per decision: pressure score minus patched score.

    Every (decision, unit) pair reruns only that decision's tail on its cached prefix.
    """
    effects = {u: torch.zeros(len(pressure)) for u in units}
    for batch in batches:
        owner = _decision_of_rows(batch.tails)
        per_decision_rows = [torch.nonzero(owner == b).flatten().tolist() for b in range(len(batch.rows))]
        jobs = [(b, u) for b in range(len(batch.rows)) for u in units]  # one patched decision each
        rows_per_job = max(1, max(len(r) for r in per_decision_rows))
        chunk = max(1, min(1024, _TAIL_CACHE_BUDGET // max(1, batch.prefixes.row_bytes() * rows_per_job)))
        for lo in range(0, len(jobs), chunk):
            part = jobs[lo : lo + chunk]
            tails: list[Tail] = []
            owners: list[int] = []
            groups: dict[tuple[str, int, bool], list[tuple[int, torch.Tensor, int | None]]] = {}
            for jid, (b, u) in enumerate(part):
                value = batch.base_acts[_SITE[u.kind]][b, u.layer]
                if u.kind == "heads":
                    value = value[u.head]
                for r in per_decision_rows[b]:
                    groups.setdefault((_SITE[u.kind], u.layer, u.kind == "heads"), []).append((len(tails), value, u.head))
                    tails.append(batch.tails[r])
                    owners.append(jid)
            patches = [
                Patch(
                    site=site,
                    layer=layer,
                    rows=torch.tensor([g[0] for g in items]),
                    values=torch.stack([g[1] for g in items]),
                    heads=torch.tensor([g[2] for g in items]) if one_head else None,
                )
                for (site, layer, one_head), items in groups.items()
            ]
            res = run_tails(lm, batch.prefixes, tails, patches=patches, sites=())
            patched = _per_decision(res.scores.float().cpu(), torch.tensor(owners), len(part))
            for jid, (b, u) in enumerate(part):
                j = batch.rows[b]
                effects[u][j] = pressure[j] - patched[jid]
        step(len(batch.rows))
    return effects


def per_position(lm: LoadedModel, dec: Decisions, baseline: str, batch_size: int = 4) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Attribution patching at every prompt position, when pressure and baseline are token-aligned.

    Returns:
        (tensors or None, a note saying what ran). Tensors: ``heads [N, T, L, H]``,
        ``mlp``/``resid`` ``[N, T, L]``, ``lengths [N]``, ``speakers [N, T]`` (padded with 0 / -1).
    """
    press, base = dec.prompts["pressure"], dec.prompts[baseline]
    misaligned = sum(1 for a, b in zip(press, base) if len(a) != len(b))
    if misaligned:
        return None, (
            f"pressure and {baseline} are not token-aligned ({misaligned} of {len(press)} training decisions differ "
            "in length), so attribution is at the decision position only. Conditions that swap words of equal "
            "token length instead of adding turns give per-position maps."
        )
    n = len(press)
    width = max(len(p) for p in press)
    out = {
        "heads": torch.zeros((n, width, lm.n_layers, lm.n_heads)),
        "mlp": torch.zeros((n, width, lm.n_layers)),
        "resid": torch.zeros((n, width, lm.n_layers)),
    }
    base_results = run_requests(
        lm, [Request(base[j], dec.options[baseline][j]) for j in range(n)], batch_size=batch_size, all_positions=True
    )
    for lo in range(0, n, batch_size):
        rows = list(range(lo, min(n, lo + batch_size)))
        tails = []
        for b, j in enumerate(rows):
            for t in tails_for(press[j], dec.options["pressure"][j], b):
                # A full row: the whole prompt, then the tail's option tokens.
                shift = len(press[j]) - 1
                tails.append(Tail(b, press[j][:-1] + t.ids, 0, [(s, p + shift, tok) for s, p, tok in t.targets]))
        res = full_pass(lm, tails)
        grads = decision_grads(res, position=None)  # site -> [R, L, T, ...]
        owner = _decision_of_rows(tails)
        for b, j in enumerate(rows):
            mine = torch.nonzero(owner == b).flatten()
            t_len = len(press[j])
            for site in ("heads", "mlp", "resid"):
                g = grads[site][mine][:, :, :t_len].sum(0).cpu()  # [L, T, ...]
                act_p = res.seq_acts[site][int(mine[0]), :, :t_len].cpu()
                if site == "heads":
                    act_p = act_p.reshape(*act_p.shape[:2], lm.n_heads, lm.head_dim)
                act_b = base_results[j].acts[site].transpose(0, 1)  # [L, T, ...]
                eff = ((act_p - act_b) * g).sum(-1)  # [L, T, (H)]
                out[site][j, :t_len] = eff.transpose(0, 1)
    out["lengths"] = torch.tensor([len(p) for p in press], dtype=torch.int32)
    spk = torch.full((n, width), -1, dtype=torch.int16)
    for j, s in enumerate(dec.speakers["pressure"]):
        spk[j, : len(s)] = torch.tensor(s, dtype=torch.int16)
    out["speakers"] = spk
    return out, f"pressure and {baseline} are token-aligned: attribution ran at every position."










