"""The baselines beside every fix: a prompt remedy and a protocol remedy, measured by verify like a fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MINI_RECIPE
from test_attribute import _loaded
from test_cli import run
from test_cli_fix import LOOSE, pipeline, planted_dir  # noqa: F401 - fixtures

from mechfix.errors import BadInputError
from mechfix.measure import capabilities as caps
from mechfix.measure.verdict import comparison_cells, comparison_rows
from mechfix.measure.evaluate import carried_kl, neutral_passages, neutral_set, prefix_ids, prefixed, score_requests
from mechfix.stages.record import decision_requests
from mechfix.stages.remedies import (
    OWN_ANSWER,
    baselines,
    instruction_text,
    own_answers,
    prompt_remedy,
    protocol_point,
    protocol_remedy,
)
from mechfix.stages.verify import gates_for, verify_fixes

# The pressure comes with the first turn: there is no point before it for the protocol.
NO_POINT = MINI_RECIPE.replace(
    '  - {speaker: Host, text: "{question}"}\n',
    '  - {speaker: Host, text: "{question}", when: [clean, control]}\n'
    '  - {speaker: Host, text: "Everyone says {wrong}. {question}", when: [pressure]}\n',
)
HELD = [0, 1, 2, 3, 4]


def _texts(lm, recipe, condition: str) -> list[str]:
    return [ep.text for ep in decision_requests(lm, recipe, HELD).episodes[condition]]


def test_the_prompt_remedy_puts_the_instruction_literally_in_the_target_s_own_text(tiny_llama):
    recipe = _loaded(MINI_RECIPE).recipe
    fixed = prompt_remedy("Dear {target}: think {for} yourself.").build(recipe, {})
    for condition in recipe.condition_names:
        for before, after in zip(_texts(tiny_llama, recipe, condition), _texts(tiny_llama, fixed, condition)):
            # Braces in a user's instruction are text, not placeholders; {target} names the decision agent.
            assert after == before.replace("A quiz.\n", "A quiz.\nDear Sam: think {for} yourself.\n\n", 1)
    chat = recipe.model_copy(update={"format": recipe.format.model_copy(update={"system": "You are {agent}."})})
    assert prompt_remedy("Be {target}.").build(chat, {}).format.system == "You are {agent}.\n\nBe {{Sam}}.".replace("{{Sam}}", "Sam")


def test_the_protocol_has_the_target_state_its_own_clean_answer_before_the_peers_speak(tiny_llama):
    recipe = _loaded(MINI_RECIPE).recipe
    assert protocol_point(recipe) == (1, None)
    rendered = decision_requests(tiny_llama, recipe, HELD)
    clean = score_requests(tiny_llama, {"clean": rendered.requests["clean"]})["clean"]
    own = own_answers(rendered.rows, clean)
    fixed = protocol_remedy().build(recipe, own)
    assert OWN_ANSWER not in recipe.items[0]  # the recipe itself is left alone
    for i, text in zip(HELD, _texts(tiny_llama, fixed, "pressure")):
        said = rendered.episodes["clean"][i].options[own[i]].strip()
        question = recipe.items[i]["question"]
        assert f"Host: {question}\nSam: {said}\nAna: {recipe.items[i]['wrong']}." in text
        assert text.endswith("Sam:")  # and it decides again after the others
    assert protocol_point(_loaded(NO_POINT).recipe)[0] is None
    assert "first turn" in protocol_point(_loaded(NO_POINT).recipe)[1]


def test_the_carried_instruction_s_kl_is_the_divergence_of_plain_forward_passes_on_each_passage(tiny_llama):
    lm = tiny_llama
    passages = neutral_passages()[:2]
    prefix = prefix_ids(lm, "Think for yourself.")
    got = carried_kl(lm, prefix, neutral_set(lm, passages))
    total, count = 0.0, 0
    with torch.no_grad():
        for p in passages:
            ids = lm.tokenizer(p).input_ids
            plain = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            longer = prefixed(ids, prefix, lm.tokenizer.bos_token_id)
            after = torch.log_softmax(lm.model(torch.tensor([longer])).logits[0, len(prefix):-1].float(), -1)
            total += float((plain.exp() * (plain - after)).sum())
            count += len(ids) - 1
    assert got == pytest.approx(total / count, rel=1e-4) and got > 0


def test_verify_measures_each_remedy_like_a_fix_on_the_same_decisions(tiny_llama, tmp_path):
    lm = tiny_llama
    recipe = _loaded(MINI_RECIPE).recipe
    neutral = neutral_set(lm, neutral_passages()[:2])
    task = tmp_path / "copy.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"say {c}: ", "answer": c, "distractors": ["x", "y"]}) + "\n"
                            for c in "abcdefghi"))
    suite = caps.build_suite(lm, caps.load_tasks([str(task)]), "verify")
    gates = gates_for(0.5, 0.1, 0.9, 0.0, 0.25, 0.8, 0.25)
    prompt, protocol = verify_fixes(lm, recipe, [], neutral, gates=gates, items=HELD, capabilities=suite,
                                    remedies=baselines("Think for yourself, {target}."))
    assert prompt["remedy"]["applies"] and protocol["remedy"]["applies"]
    assert [g["metric"] for g in prompt["gates"]] == [g.metric for g in gates if g.metric != "helpful_loss"]
    # The prompt remedy's "after" is the model as it is on the changed recipe's decisions.
    changed = decision_requests(lm, prompt_remedy("Think for yourself, {target}.").build(recipe, {}), HELD).requests
    direct = score_requests(lm, changed)
    assert np.allclose(prompt["per_item"]["scores"]["pressure"]["after"], (direct["pressure"][:, 1] - direct["pressure"][:, 0]).tolist(), atol=1e-5)
    assert prompt["kl"]["value"] == pytest.approx(carried_kl(lm, prefix_ids(lm, "Think for yourself, Sam."), neutral), rel=1e-5)
    assert prompt["parameters"] == 0 and prompt["remedy"]["carried"] == "Think for yourself, Sam."
    # The protocol changes nothing outside its conversations: no KL, every capability as it was.
    assert protocol["kl"]["value"] == 0.0 and protocol["remedy"]["carried"] is None
    assert all(t["after"] == t["before"] for t in protocol["capabilities"]["tasks"].values())
    assert protocol["per_item"]["scores"]["clean"]["before"] == prompt["per_item"]["scores"]["clean"]["before"]
    assert protocol["per_item"]["scores"]["clean"]["after"] != protocol["per_item"]["scores"]["clean"]["before"]


def test_a_remedy_the_recipe_does_not_allow_says_why_and_measures_nothing(tiny_llama):
    recipe = _loaded(NO_POINT).recipe
    prompt, protocol = verify_fixes(tiny_llama, recipe, [], neutral_set(tiny_llama, neutral_passages()[:1]),
                                    gates=gates_for(0.5, 0.1, 0.9), items=HELD, remedies=baselines())
    assert protocol["remedy"]["applies"] is False and "first turn" in protocol["remedy"]["why"]
    assert protocol["gates"] == [] and protocol["passed"] is False and "reduction" not in protocol
    cells = dict(comparison_cells(comparison_rows([prompt, protocol])))
    assert cells["gates"][1] == "n/a" and cells["reduction"][1] == "-"
    assert "first turn" in cells["not applicable because"][1] and cells["not applicable because"][0] == ""


def test_an_instruction_file_that_is_empty_or_too_long_is_refused(tmp_path):
    assert "{target}" in instruction_text()
    empty, long = tmp_path / "empty.txt", tmp_path / "long.txt"
    empty.write_text("  \n")
    long.write_text("x" * 2001)
    for path in (empty, long, tmp_path / "missing.txt"):
        with pytest.raises(BadInputError):
            instruction_text(str(path))


def test_verify_baselines_puts_the_remedies_beside_the_fix_and_a_bad_prompt_file_exits_2(monkeypatch, capsys, tmp_path,
                                                                                          pipeline, planted_dir):  # noqa: F811
    recipe, rec, att = pipeline
    fix = tmp_path / "plant.fix.safetensors"
    assert run(monkeypatch, capsys, "steer", str(att), "--out", str(fix), "--op", "scale", "--top-heads", "1", *LOOSE)[0] == 0
    code, stdout, _ = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--model", str(planted_dir),
                          "--baselines", *LOOSE, "--json")
    report = json.loads(stdout)
    assert code == (0 if report["passed"] else 1)  # the fix's gates alone decide
    assert [b["remedy"]["name"] for b in report["baselines"]] == ["prompt", "protocol"]
    assert [r["fix"] for r in report["comparison"]] == [str(fix), "prompt remedy", "protocol remedy"]
    # The planted recipe's conditions differ in what the peers say (a condition's vars): the protocol goes before them.
    assert report["baselines"][1]["remedy"]["applies"] is True and report["baselines"][1]["kl"]["value"] == 0.0
    assert report["comparison"][1]["reduction"] == report["baselines"][0]["reduction"]["value"]
    bad = tmp_path / "empty.txt"
    bad.write_text("")
    junit = tmp_path / "v.xml"
    code, _, stderr = run(monkeypatch, capsys, "verify", str(recipe), "--fix", str(fix), "--model", str(planted_dir),
                          "--prompt-fix", str(bad), "--junit", str(junit))
    assert code == 2 and "--prompt-fix" in stderr and "Traceback" not in stderr and not junit.exists()


def _run_with_baselines(monkeypatch, capsys, tmp_path, model, text: str):
    """`mechfix run --baselines --json` on the planted model: its exit code, summary and folder."""
    recipe = tmp_path / "plant.yaml"
    recipe.write_text(text)
    out = tmp_path / "run"
    code, stdout, stderr = run(monkeypatch, capsys, "run", str(recipe), "--out", str(out), "--model", str(model),
                               "--top-heads", "1", "--op", "scale", "--baselines", *LOOSE, "--json")
    summary = json.loads(stdout)
    assert code == (0 if summary["passed"] else 1), stderr
    return summary, out


def test_run_baselines_puts_the_remedies_in_its_summary_and_verify_file(monkeypatch, capsys, tmp_path,
                                                                        planted_dir):  # noqa: F811
    from test_steer import PLANT_MORE

    summary, out = _run_with_baselines(monkeypatch, capsys, tmp_path, planted_dir, PLANT_MORE)
    saved = json.loads((out / "plant.verify.json").read_text())
    assert [r["fix"] for r in summary["verify"]["comparison"]] == [str(out / "plant.fix.safetensors"), "prompt remedy",
                                                                   "protocol remedy"]
    assert saved["comparison"] == summary["verify"]["comparison"] and len(saved["baselines"]) == 2
    assert summary["verify"]["harm"] == saved["harm"] and "overshoot" in summary["verify"]


def test_a_run_whose_recipe_allows_no_protocol_writes_its_page_with_the_column_saying_why(monkeypatch, capsys, tmp_path,
                                                                                           planted_dir):  # noqa: F811
    from test_steer import PLANT_MORE

    # The host's question carries the pressure (the wrong letter in brackets), so nothing comes before it.
    text = PLANT_MORE.replace('  - {speaker: Host, text: "{question}"}\n', '  - {speaker: Host, text: "{question} ({said})"}\n')
    assert text != PLANT_MORE
    summary, out = _run_with_baselines(monkeypatch, capsys, tmp_path, planted_dir, text)
    protocol = summary["verify"]["comparison"][2]
    assert protocol["fix"] == "protocol remedy" and "first turn" in protocol["not_applicable"]
    assert (out / "plant.report.html").is_file() and "not applicable because" in (out / "plant.report.html").read_text()
