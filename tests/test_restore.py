"""Restoring whole modules at every position: exact against a plain patched forward pass, and where lora fixes go."""

from __future__ import annotations

import pytest
import torch
from conftest import MINI_RECIPE
from test_attribute import PLANT_RECIPE, PLANTED, _planted_model, _recording
from test_steer import PLANT_MORE, planted_setup
from tiny import tiny_model

from mechfix.artifacts import Artifact
from mechfix.errors import BadInputError
from mechfix.stages.attribute import attribute, decisions_from_record
from mechfix.stages.attribution import summarize, to_artifact
from mechfix.stages.lora import LoraSettings
from mechfix.stages.steer import LORA_SHARE, pick_lora_targets, steer
from mechfix.stages.sweep import Budget


def _logprob_of(model, seq: list[int], start: int) -> float:
    """Summed log-probability of ``seq[start:]`` after ``seq[:start]``, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[p - 1, seq[p]] for p in range(start, len(seq))))


def _score(model, prompt: list[int], options: list[list[int]]) -> float:
    aligned, misaligned = (_logprob_of(model, prompt + o, len(prompt)) for o in options)
    return misaligned - aligned


def _by_hand(lm, dec, j: int, kind: str, layer: int) -> float:
    """The pressure score minus the score with one module's activations set to the clean run's at every prompt
    position: PyTorch hooks on the module, whole sequences, nothing of mechfix's passes."""
    module = lm.attn_out(layer) if kind == "attn" else lm.mlp(layer)
    clean, press = dec.prompts["clean"][j], dec.prompts["pressure"][j]
    kept = []
    h = module.register_forward_hook(lambda m, a, out: kept.append(out.detach().clone()))
    _score(lm.model, clean, dec.options["clean"][j])
    h.remove()
    saved = kept[0][0, : len(clean)]  # the prompt's positions (the same before every option)

    def restore(m, a, out):
        out = out.clone()
        out[0, : len(press)] = saved
        return out

    before = _score(lm.model, press, dec.options["pressure"][j])
    h = module.register_forward_hook(restore)
    after = _score(lm.model, press, dec.options["pressure"][j])
    h.remove()
    return before - after


def test_restoring_a_module_at_every_position_is_what_a_patched_forward_pass_gives():
    lm = _planted_model()
    rec = _recording(lm, PLANT_RECIPE)
    att = attribute(lm, rec, method="both", top=5)
    dec = decisions_from_record(rec, lm.tokenizer, ["pressure", "clean"])
    assert att.everywhere is not None and att.everywhere["attn"].shape == (len(dec.items), lm.n_layers)
    for j in (0, len(dec.items) - 1):
        for kind in ("attn", "mlp"):
            for layer in range(lm.n_layers):
                want = _by_hand(lm, dec, j, kind, layer)
                assert float(att.everywhere[kind][j, layer]) == pytest.approx(want, abs=1e-4, rel=1e-4), (j, kind, layer)


def test_restoring_at_every_position_puts_the_planted_layer_first_and_its_effect_is_the_whole_behaviour():
    lm = _planted_model()
    att = attribute(lm, _recording(lm, PLANT_RECIPE), method="both", top=5)
    per_layer = att.everywhere["attn"].mean(0)
    assert int(per_layer.argmax()) == PLANTED[0]
    # The planted head is the only path from the peers' letters to the answer: restoring its layer removes it all.
    assert float(per_layer[PLANTED[0]]) == pytest.approx(float(att.total.mean()), rel=0.05)
    summary = summarize(att, (lm.n_layers, lm.n_heads), top=5)
    assert summary["everywhere"]["top"][0]["module"] == f"L{PLANTED[0]}.attn"


def test_restoring_at_every_position_runs_only_on_token_aligned_conditions_with_exact_patching():
    lm = tiny_model("llama")
    assert attribute(lm, _recording(lm, MINI_RECIPE), method="both", top=3).everywhere is None
    assert attribute(lm, _recording(lm, PLANT_RECIPE), method="atp").everywhere is None
    art = to_artifact(attribute(lm, _recording(lm, PLANT_RECIPE), method="both", top=3), lm,
                      _recording(lm, PLANT_RECIPE), {}, top=3)
    assert art.tensors["everywhere/attn"].shape[1] == lm.n_layers and "everywhere/mlp" in art.tensors


def _with_map(att: Artifact, attn: torch.Tensor | None) -> Artifact:
    """The attribution with its every-position attention effects replaced (None: without them)."""
    tensors = {k: v for k, v in att.tensors.items() if k != "everywhere/attn"}
    if attn is not None:
        tensors["everywhere/attn"] = attn
    return Artifact(kind=att.kind, manifest=att.manifest, tensors=tensors, path=att.path, sha256=att.sha256)


def _with_effects(att: Artifact, attn: list[float]) -> Artifact:
    return _with_map(att, torch.tensor([attn, attn]))


@pytest.fixture(scope="module")
def planted():
    return planted_setup(_planted_model(), PLANT_MORE)


def test_a_lora_fix_goes_on_the_layers_whose_whole_attention_output_carries_the_behaviour(planted):
    _, _, att, _ = planted
    layers, heads, why, whole = pick_lora_targets(att)
    assert whole and set(layers) == {PLANTED[0]} and sorted(heads) == list(range(4)) and "every position" in why
    # Every layer within LORA_SHARE of the largest, the largest first in the reason.
    layers, _, why, _ = pick_lora_targets(_with_effects(att, [2.0 * LORA_SHARE - 0.01, 2.0, 2.0 * LORA_SHARE]))
    assert sorted(set(layers)) == [1, 2] and why.index("L1") < why.index("L2") and "L0" not in why


def test_a_lora_fix_falls_back_to_the_top_heads_layers_without_every_position_effects_or_with_layers_given(planted):
    _, _, att, _ = planted
    layers, heads, why, whole = pick_lora_targets(_with_map(att, None), top=1)
    assert not whole and (layers, heads) == ([PLANTED[0]], [PLANTED[1]]) and "top 1 heads" in why
    assert not pick_lora_targets(att, top=1, layers=[0])[3]
    layers, _, why, whole = pick_lora_targets(_with_effects(att, [-1.0, -2.0, -0.5]), top=1)
    assert not whole and layers == [PLANTED[0]] and "no attention output carries" in why


def test_steer_trains_a_lora_fix_on_the_whole_module_it_found(planted):
    lm, rec, att, neutral = planted
    st = steer(lm, att, rec, neutral, kind="lora", budget=Budget(max_kl=5.0, min_clean_agreement=0.95),
               lora=LoraSettings(rank=2, steps=3, batch=4, kl_positions=4, neutral_per_step=1))
    assert [m.layer for m in st.modules] == [PLANTED[0]] and st.modules[0].heads is None
    assert st.training.settings.scope == "modules" and "every position" in st.why


@pytest.mark.parametrize("bad", [torch.zeros(2, 7), torch.full((2, 3), float("nan")), torch.zeros(3)])
def test_a_malformed_every_position_tensor_is_refused_with_a_clear_error(planted, bad):
    _, _, att, _ = planted
    with pytest.raises(BadInputError, match="everywhere/attn"):
        pick_lora_targets(_with_map(att, bad))
