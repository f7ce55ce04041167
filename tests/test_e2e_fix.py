"""The fix stages end to end on the real embedded model: `mechfix run` on conformity, then a LoRA fix beside it.

The slowest tests of the suite (minutes each on a CPU), kept in one file so that
a parallel test run gives them a worker of their own from the start
(see ``conftest.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mechfix.cli import main

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> tuple[int, str]:
    """Run the CLI in-process (for module-scoped fixtures, which cannot take monkeypatch or capsys)."""
    import contextlib
    import io

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(sys, "argv", ["mechfix", *args])
        with pytest.raises(SystemExit) as exc:
            main()
    return exc.value.code, out.getvalue()


# The two retrieval tasks of the built-in capability suite (the ones a conformity fix endangers most) instead of
# all four, for the same reason: the README's run measures the whole suite.
_CAPS = Path(__file__).parents[1] / "mechfix" / "data" / "capabilities"
RETRIEVAL = ("--capabilities", str(_CAPS / "retrieval-prose.jsonl"), "--capabilities", str(_CAPS / "retrieval-dialogue.jsonl"))


@pytest.fixture(scope="module")
def conformity_run(tmp_path_factory):
    """`mechfix run` on the built-in conformity recipe, the README's main command with one operation (`--op project`)."""
    from mechfix.measure.evaluate import neutral_passages

    out = tmp_path_factory.mktemp("run") / "run"
    # A fifth of the verification set keeps the KL passes (the output head's 262k words dominate them) within
    # the suite's time; the README's run measures the whole shipped sets.
    neutral = out.parent / "neutral.txt"
    neutral.write_text("\n\n".join(neutral_passages(part="verify")[:14]) + "\n")
    code, stdout = _cli("run", "recipes/conformity.yaml", "--out", str(out), "--op", "project", "--neutral", str(neutral),
                        *RETRIEVAL, "--json")
    return code, json.loads(stdout), out


def test_run_on_the_embedded_model_chooses_by_carry_over_and_checks_every_gate_held_out(conformity_run):
    """steer chooses on cross-validated numbers; verify measures every gate, and the verdict and exit code follow them."""
    code, summary, out = conformity_run
    v = summary["verify"]
    assert code == (0 if summary["passed"] else 1)
    assert summary["passed"] == all(g["passed"] for g in v["gates"])
    gates = {g["metric"]: g for g in v["gates"]}
    assert set(gates) == {"reduction", "kl", "clean_agreement", "capability_kept", "helpful_loss", "clean_margin_kept",
                          "overshoot"}
    assert not any(g["error"] for g in gates.values())  # every gate was measured on this model
    chosen = summary["steer"]["chosen"]
    assert summary["steer"]["by"] == "cross-validated reduction" and chosen["cv_reduction"] > 0
    assert chosen["cv_reduction"] < chosen["reduction"]  # the training fit flatters the fix: folds say so
    assert v["before"]["effect"]["mean"] > 1 and v["after"]["effect"]["mean"] < v["before"]["effect"]["mean"]
    assert summary["capabilities_kept"] is not None and v["helpful"]["before"] > 0
    # Harm and help split the held-out decisions by what the model answers alone: together they are all of them.
    assert v["harm"]["decisions"] + v["help"]["decisions"] == v["before"]["effect"]["n"]
    assert v["harm"]["before"]["flips"]["count"] >= v["harm"]["after"]["flips"]["count"]
    assert v["overshoot"]["value"] is not None and v["overshoot"]["past_clean"]["n"] == v["before"]["effect"]["n"]
    assert summary["fix"]["kind"] == "heads" and 1 <= len(summary["fix"]["targets"]) <= 5
    for path in summary["artifacts"].values():
        assert (out / path.split("/")[-1]).is_file()


def test_run_on_the_embedded_model_writes_its_report_page_and_it_opens_clean(conformity_run):
    """The page beside the artifacts: every section, Gemma 3 270M's 18 layers x 4 heads, the verdict, no request."""
    from browser import open_page

    code, summary, out = conformity_run
    page_path = out / "conformity.report.html"
    assert summary["artifacts"]["report"] == str(page_path) and page_path.is_file()
    page = open_page(page_path)
    assert page["console"] == [] and len(page["requests"]) == 1
    assert page["heads"] == [18, 4] and page["layers"] == [18, 3]
    assert page["verdict"] == ("PASS" if summary["passed"] else "FAIL")
    assert page["episodes"] == ["pressure", "clean", "control", "helpful"]
    assert all(f["drawn"] for f in page["figures"].values()) and "fig-sweep" in page["figures"]


def test_lora_fix_on_the_embedded_model_is_verified_beside_the_heads_fix_and_peft_reads_it_unchanged(
    conformity_run, gemma, tmp_path
):
    """A LoRA fix on the found heads' output projections: trained, verified beside the heads fix, loaded by PEFT."""
    import copy

    from peft import PeftModel

    from mechfix.fixes.fix import apply_fix, load_fix

    _, summary, out = conformity_run
    folder = tmp_path / "conformity.lora"
    # Only KL and clean agreement bound the sweep here: what is tested is training, the adapter and verify's table.
    # 12 optimiser steps instead of 40, and one adapter instead of one per fold (--folds 0), keep training (most of
    # this test's time) to a few minutes; the adapter still removes most of the behaviour at a fraction of its
    # strength. Cross-validated adapters are tested on tiny models (test_labelled.py, test_lora.py).
    neutral = str(out.parent / "neutral.txt")
    code, stdout = _cli("steer", str(out / "conformity.attr.safetensors"), "--kind", "lora", "--out", str(folder),
                        "--steps", "12", "--folds", "0", "--min-capability", "0", "--max-helpful-loss", "1", "--min-clean-margin", "0",
                        "--neutral", neutral, *RETRIEVAL, "--json")
    steer = json.loads(stdout)
    assert code == 0 and steer["kind"] == "lora" and len(steer["targets"]) >= 1
    assert all(t.split(".")[1].startswith("o_proj[") for t in steer["targets"])
    assert steer["selection"]["folds"] == 0 and any("--folds 0" in n for n in steer["selection"]["notes"])
    code, stdout = _cli("verify", "recipes/conformity.yaml", "--fix", str(folder), "--compare",
                        str(out / "conformity.fix.safetensors"), "--neutral", neutral, *RETRIEVAL, "--json")
    report = json.loads(stdout)
    assert code == (0 if report["passed"] else 1)
    assert report["reduction"]["value"] > 0.3 and report["clean_agreement"]["value"] >= 0.95
    lora_row, heads_row = report["comparison"]
    assert (lora_row["kind"], heads_row["kind"]) == ("lora", "heads")
    assert heads_row["reduction"] == pytest.approx(summary["verify"]["reduction"]["value"])
    assert lora_row["capability_kept"] is not None and lora_row["helpful_loss"] is not None

    fix = load_fix(folder)
    ids = torch.tensor([gemma.tokenizer("Ana: Rome. Ben: Rome. Sam: The capital of Italy is").input_ids])
    with torch.no_grad(), apply_fix(gemma, fix):
        ours = gemma.model(input_ids=ids).logits
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(copy.deepcopy(gemma.model), str(folder))(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_a_linear_heads_fix_on_the_embedded_model_exports_as_an_adapter_and_a_checkpoint_that_give_its_logits(
    conformity_run, gemma, tmp_path
):
    """The run's heads and strength with the linear operation: PEFT and transformers reproduce mechfix's logits."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mechfix.artifacts import load_artifact, save_artifact
    from mechfix.fixes.fix import apply_fix, load_fix

    _, summary, out = conformity_run
    project = out / "conformity.fix.safetensors"
    # The rectified operation the run chose cannot be written as weights: refused, nothing written.
    code, _ = _cli("export", str(project), "--format", "peft", "--out", str(tmp_path / "refused"))
    assert code == 2 and not (tmp_path / "refused").exists()
    art = load_artifact(project, expect="fix")
    art.manifest["fix"]["op"] = "ablate"
    ablate = tmp_path / "ablate.fix.safetensors"
    save_artifact(ablate, art)
    fix = load_fix(ablate)

    adapter, checkpoint = tmp_path / "adapter", tmp_path / "checkpoint"
    code, stdout = _cli("export", str(ablate), "--format", "peft", "--out", str(adapter), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["rank"] == max(fix.layers.count(n) for n in set(fix.layers))
    code, stdout = _cli("export", str(ablate), "--format", "hf", "--out", str(checkpoint), "--json")
    assert code == 0 and json.loads(stdout)["config_changed"] == {}

    ids = torch.tensor([gemma.tokenizer("Ana: Rome. Ben: Rome. Sam: The capital of Italy is").input_ids])
    with torch.no_grad():
        base = gemma.model(input_ids=ids).logits
        with apply_fix(gemma, fix):
            ours = gemma.model(input_ids=ids).logits
        assert (ours - base).abs().max() > 0.05  # the fix moves the logits
        peft_model = PeftModel.from_pretrained(copy.deepcopy(gemma.model), str(adapter))
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(peft_model.merge_and_unload()(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-4)
        reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours, rtol=1e-5, atol=1e-4)
