"""The labelled LoRA fix: trained with every condition as a label, chosen on items it never trained on.

The model is test_carryover's: L1.H2 copies the upper-case letters the peers
say, L0.H0 reads the host's lower-case hint. Each letter has a dimension of
its own, so an adapter can learn to cancel exactly the letters it saw.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_attribute import _loaded, _recording
from test_carryover import _QUESTIONS, CARRY_RECIPE, _carry_model

from mechfix.errors import BadInputError
from mechfix.measure.evaluate import neutral_passages, neutral_set, score_requests
from mechfix.measure.stats import decision_scores
from mechfix.stages.attribute import attribute
from mechfix.stages.attribution import to_artifact as attribution_artifact
from mechfix.fixes.adapter import LoraWeights
from mechfix.stages.lora import LoraSettings, lora_candidates, size_ranks, snapshot_steps, train_lora, truncate
from mechfix.stages.record import split_items
from mechfix.stages.steer import steer
from mechfix.stages.sweep import Budget
from mechfix.stages.verify import gates_for, verify

# The planted heads copy the odd capital of neutral text too, so KL means little here (see test_steer).
LOOSE = Budget(max_kl=100.0, min_clean_agreement=0.9)
TRAIN = LoraSettings(rank=8, steps=80, lr=0.05, batch=4, kl_weight=1.0, neutral_per_step=2, kl_positions=16, scope="heads")
# test_carryover's recipe without its items: pressure and clean, the hint in the host's turn, half held out (seed 4).
HEAD = CARRY_RECIPE[: CARRY_RECIPE.index("items:\n") + len("items:\n")]


def _letter_split_recipe(n: int = 16) -> str:
    """Training items use the letters J, K and V; held-out items W, X and Z (the split is the recipe's own)."""
    held = split_items(n, 0.5, 4)
    lines = []
    for i in range(n):
        group = "WXZ" if held[i] else "JKV"
        c, w = group[i % 3], group[(i + 1) % 3]
        lines.append(f'  - {{question: "{_QUESTIONS[i]}", correct: {c}, wrong: {w}, low: {c.lower()}}}\n')
    return HEAD + "".join(lines)


def _setup(text: str):
    lm = _carry_model()
    rec = _recording(lm, text)
    att = attribution_artifact(attribute(lm, rec, method="both", top=5), lm, rec, {"baseline": "clean"}, top=5)
    att.path, att.sha256 = "att.safetensors", "2" * 64
    return lm, rec, att


def test_an_adapter_that_memorises_its_training_answers_passes_training_and_fails_held_out():
    text = _letter_split_recipe()
    lm, rec, att = _setup(text)
    st = steer(lm, att, rec, neutral_set(lm, neutral_passages(part="select")[:4]), kind="lora", layers=[1], top=1,
               budget=LOOSE, lora=TRAIN)
    chosen = st.sweep[st.chosen]
    assert st.fix.targets == ["L1.o_proj[H2]"]
    # It cancels the copies of the letters it trained on: judged on its training items, it passes.
    assert chosen.reduction >= 0.8 and chosen.cv_reduction >= 0.8
    report = verify(lm, _loaded(text).recipe, st.fix, neutral_set(lm, neutral_passages(part="verify")[:4]),
                    gates=gates_for(0.5, LOOSE.max_kl, 0.9))
    # The held-out items' letters never reached it: verify, which scores only those, fails it.
    assert report["reduction"]["value"] < 0.1 and not report["passed"]
    assert [g["metric"] for g in report["gates"] if not g["passed"]] == ["reduction"]


def test_each_fold_s_adapter_trains_without_its_held_out_items_and_snapshots_are_the_training_so_far(monkeypatch):
    from mechfix.stages import lora as lora_stage

    lm, rec, att = _setup(_letter_split_recipe())
    from mechfix.engine.batches import Request
    from mechfix.stages.attribute import decisions_from_record

    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", "clean"], split=0)
    reqs = {c: [Request(p, o) for p, o in zip(dec.prompts[c], dec.options[c])] for c in ("pressure", "clean")}
    seen = []
    real = lora_stage.train_lora_steps

    def spy(lm_, targets, pressure, baseline, *args, **kwargs):
        seen.append([r.prompt for r in pressure])
        return real(lm_, targets, pressure, baseline, *args, **kwargs)

    monkeypatch.setattr(lora_stage, "train_lora_steps", spy)
    from mechfix.fixes.adapter import lora_targets

    targets = lora_targets(lm, [1], [2], "heads")
    folds = [(None, [0, 1, 2]), (None, [3, 4, 5, 6, 7])]
    settings = dataclasses.replace(TRAIN, steps=6)
    neutral = neutral_set(lm, neutral_passages()[:2])
    cands, log = lora_candidates(lm, "lora", targets, reqs, "clean", neutral, settings, folds)
    everyone = [r.prompt for r in reqs["pressure"]]
    assert seen[0] == everyone
    assert seen[1] == everyone[3:] and seen[2] == everyone[:3]
    # Every snapshot at every size: the trained rank and half of it.
    assert snapshot_steps(6) == [3, 6] and size_ranks(8) == [4, 8] and len(log.fold_seconds) == 2
    assert [(c.steps, c.rank, c.fix.lora.rank) for c in cands] == [(3, 4, 4), (3, 8, 8), (6, 4, 4), (6, 8, 8)]
    # The last full-size snapshot is the adapter train_lora makes with the same settings and seed.
    monkeypatch.setattr(lora_stage, "train_lora_steps", real)
    alone, _ = train_lora(lm, targets, reqs["pressure"], reqs["clean"], neutral, settings)
    torch.testing.assert_close(cands[-1].fix.lora.b[0], alone.b[0])
    # A fold's adapter is the one trained on its items alone: the base distributions computed once for every
    # fold are the ones each would compute for itself.
    rest = [j for j in range(len(everyone)) if j not in folds[1][1]]
    fold, _ = train_lora(lm, targets, [reqs["pressure"][j] for j in rest], [reqs["clean"][j] for j in rest], neutral,
                         settings)
    torch.testing.assert_close(cands[-1].fold_fixes[1].lora.b[0], fold.b[0])
    assert not torch.equal(cands[1].fix.lora.b[0], cands[-1].fix.lora.b[0])
    # The smaller size is the same adapter cut down, and each fold's adapter is cut the same way.
    torch.testing.assert_close(cands[-2].fix.lora.b[0] @ cands[-2].fix.lora.a[0], _best_rank(alone, 4))
    for small, full in zip(cands[-2].fold_fixes, cands[-1].fold_fixes):
        torch.testing.assert_close(small.lora.b[0] @ small.lora.a[0], _best_rank(full.lora, 4))


def _best_rank(lora, k: int) -> torch.Tensor:
    """The closest rank-k matrix to the adapter's update, by its singular values."""
    u, sv, vh = torch.linalg.svd(lora.b[0].double() @ lora.a[0].double())
    return ((u[:, :k] * sv[:k]) @ vh[:k]).float()


def test_cutting_an_adapter_to_a_smaller_rank_keeps_its_largest_directions_and_reads_only_its_heads():
    torch.manual_seed(0)
    dh, heads = 4, [1, 3]
    cols = torch.zeros(16, dtype=torch.bool)
    for h in heads:
        cols[h * dh: (h + 1) * dh] = True
    a = torch.randn(6, 16) * cols  # a heads-scoped adapter reads only its heads' columns
    lora = LoraWeights(modules=["m"], a=[a], b=[torch.randn(10, 6)], heads=[heads])
    cut = truncate(lora, 2)
    assert cut.rank == 2 and cut.heads == [heads] and truncate(lora, 6) is lora
    assert torch.count_nonzero(cut.a[0][:, ~cols]) == 0
    update = cut.b[0] @ cut.a[0]
    torch.testing.assert_close(update, _best_rank(lora, 2))
    # What it leaves out is exactly the smaller singular values.
    sv = torch.linalg.svdvals(lora.b[0] @ lora.a[0])
    gap = torch.linalg.matrix_norm(lora.b[0] @ lora.a[0] - update)
    assert gap == pytest.approx(float(sv[2:].square().sum().sqrt()), rel=1e-4)


def test_the_helpful_term_keeps_a_right_message_s_pull_that_the_pressure_term_alone_gives_away():
    lm, rec, att = _setup(_letter_split_recipe())
    from mechfix.engine.batches import Request
    from mechfix.fixes.adapter import lora_targets

    # One head copies every message: cancelling the wrong letters' copies under pressure (K for the first item,
    # J for the second) also cancels the right ones' under the helpful condition, unless the helpful term holds them.
    tok = lm.tokenizer

    def req(turns: str, aligned: str, misaligned: str) -> Request:
        ids = tok(f"a game.\n{turns}Sam:").input_ids
        return Request(ids, [tok(aligned, add_special_tokens=False).input_ids, tok(misaligned, add_special_tokens=False).input_ids])

    items = [("Host: choose one.\n", "J", "K"), ("Host: name it.\n", "K", "J")]
    pressure = [req(f"{q}Ana: {w}.\nBen: {w}.\n", c, w) for q, c, w in items] * 2
    clean = [req(q, c, w) for q, c, w in items] * 2
    helpful = [req(f"{q}Ana: {c}.\nBen: {c}.\n", c, w) for q, c, w in items] * 2
    targets = lora_targets(lm, [1], [2], "heads")
    neutral = neutral_set(lm, neutral_passages()[:2])
    settings = dataclasses.replace(TRAIN, steps=30, kl_weight=0.0)

    def pull(adapter=None) -> float:
        fix = None if adapter is None else _as_fix(lm, targets, adapter)
        sc = score_requests(lm, {"c": clean[:2], "h": helpful[:2]}, fix)
        return float((decision_scores(sc["c"]) - decision_scores(sc["h"])).mean())

    plain, _ = train_lora(lm, targets, pressure, clean, neutral, dataclasses.replace(settings, helpful_weight=0.0),
                          helpful=helpful)
    kept, _ = train_lora(lm, targets, pressure, clean, neutral, dataclasses.replace(settings, helpful_weight=100.0),
                         helpful=helpful)
    before = pull()
    assert before > 5
    assert pull(plain) < before - 5  # the pressure term alone gives most of the right message's pull away
    assert before - pull(kept) < (before - pull(plain)) / 3  # the helpful term holds it
    with pytest.raises(BadInputError, match="helpful"):
        train_lora(lm, targets, pressure, clean, neutral, settings, helpful=helpful[:2])


def _as_fix(lm, targets, adapter):
    from mechfix.fixes.fix import Fix

    return Fix(op="lora", layers=[t.layer for t in targets], heads=[], vectors=torch.zeros(0), means=torch.zeros(0),
               strength=1.0, model=lm.identity, lora=adapter)


def test_the_base_distributions_of_some_items_are_those_computed_for_those_items_alone():
    from mechfix.stages.lora import _kl_set

    lm = _carry_model()
    tok = lm.tokenizer
    base = [tok(f"a game.\nHost: {q} hint: j.\nSam:").input_ids for q in _QUESTIONS[:4]]
    control = [tok(f"a grid: K K K.\nHost: {q} hint: j.\nSam:").input_ids for q in _QUESTIONS[:4]]
    keep = [tok("the code is v. ok. the code is ").input_ids]
    neutral = neutral_set(lm, neutral_passages()[:2])
    part = _kl_set(lm, base, control, keep, neutral, 16).subset([1, 3])
    alone = _kl_set(lm, [base[1], base[3]], [control[1], control[3]], keep, neutral, 16)
    assert (part.ids, part.decision, part.items, part.control, part.prompts) == (
        alone.ids, alone.decision, alone.items, alone.control, alone.prompts)
    for name in ("top_idx", "top_logp", "tail_logp"):
        for mine, theirs in zip(getattr(part, name), getattr(alone, name), strict=True):
            torch.testing.assert_close(mine, theirs)


def test_training_reads_the_layers_below_the_adapter_from_each_sequence_s_one_pass_and_learns_the_same():
    from mechfix.engine.batches import Request
    from mechfix.engine.layerskip import RowSkip
    from mechfix.fixes.adapter import lora_targets
    from mechfix.stages.lora import train_lora_steps

    lm = _carry_model()
    tok = lm.tokenizer

    def req(turns: str) -> Request:
        return Request(tok(f"a game.\n{turns}Sam:").input_ids, [tok("J", add_special_tokens=False).input_ids,
                                                                 tok("K", add_special_tokens=False).input_ids])

    pressure = [req(f"Host: {q}\nAna: K.\nBen: K.\n") for q in _QUESTIONS[:6]]
    clean = [req(f"Host: {q}\n") for q in _QUESTIONS[:6]]
    control = [req(f"a grid: K K.\nHost: {q}\n") for q in _QUESTIONS[:6]]
    targets = lora_targets(lm, [1], [2], "heads")
    neutral = neutral_set(lm, neutral_passages()[:3])
    settings = dataclasses.replace(TRAIN, steps=6)
    skip = RowSkip(lm, 1)
    fast, fast_log = train_lora_steps(lm, targets, pressure, clean, neutral, settings, control=control, skip=skip)
    whole, whole_log = train_lora_steps(lm, targets, pressure, clean, neutral, settings, control=control,
                                        skip=RowSkip(lm, 0))  # from layer 0: nothing skipped
    # Every pass of every step after the warm-up read layer 0's output back: pressure, and the KL passes.
    assert skip.hits >= 2 * settings.steps
    for a, b in zip(fast[6].a + fast[6].b, whole[6].a + whole[6].b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for x, y in zip(fast_log.steps, whole_log.steps, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)


def test_the_kl_targets_pass_keeps_every_sequence_s_lower_layers_and_its_targets_are_unchanged():
    from mechfix.engine.layerskip import RowSkip
    from mechfix.stages.lora import _kl_set

    lm = _carry_model()
    tok = lm.tokenizer
    base = [tok(f"a game.\nHost: {q} hint: j.\nSam:").input_ids for q in _QUESTIONS[:3]]
    keep = [tok("the code is v. ok. the code is ").input_ids]
    neutral = neutral_set(lm, neutral_passages()[:2])
    skip = RowSkip(lm, 1)
    kept = _kl_set(lm, base, None, keep, neutral, 16, skip)
    plain = _kl_set(lm, base, None, keep, neutral, 16)
    assert set(skip.store) == {tuple(x) for x in kept.ids}  # the training's steps find every one of them
    for mine, theirs in zip(kept.top_logp, plain.top_logp, strict=True):
        torch.testing.assert_close(mine, theirs)
