"""The capability suite: shipped tasks, the user's own, and what 'kept' means."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import tiny_model

from mechfix.measure import capabilities as caps
from mechfix.errors import BadInputError
from mechfix.stages.verify import _control_reading


def test_the_shipped_suite_has_four_tasks_of_sixty_items_split_between_steer_and_verify():
    tasks = caps.load_tasks()
    assert sorted(t.name for t in tasks) == ["reasoning", "recall", "retrieval-dialogue", "retrieval-prose"]
    lm = tiny_model("llama")
    select, verify = caps.build_suite(lm, tasks, "select"), caps.build_suite(lm, tasks, "verify")
    for t in tasks:
        assert len(t.items) == 60
        assert len(select.requests[t.name]) == 20 and len(verify.requests[t.name]) == 40
        prompts = [it["prompt"] for it in t.items]
        sel = {p for i, p in enumerate(prompts) if caps.in_part(i, "select")}
        ver = {p for i, p in enumerate(prompts) if caps.in_part(i, "verify")}
        assert sel and ver and not sel & ver  # no item is measured by both


def test_dialogue_retrieval_items_are_conversations_between_several_speakers():
    (task,) = [t for t in caps.load_tasks() if t.name == "retrieval-dialogue"]
    for item in task.items:
        speakers = {line.split(":")[0] for line in item["prompt"].splitlines()}
        assert len(speakers) >= 3
        assert item["answer"].strip() in item["prompt"]  # the answer was said earlier in the conversation


def test_a_task_file_with_a_bad_line_is_refused_naming_the_file_and_line(tmp_path):
    good = json.dumps({"prompt": "the code is J. the code is", "answer": " J", "distractors": [" K"]})
    cases = {
        "not json": (f"{good}\n{good}\n{{oops\n", "line 3: not valid JSON"),
        "missing key": (f"{good}\n{good}\n" + json.dumps({"prompt": "p", "answer": " a"}) + "\n", "line 3: the item has no distractors"),
        "same option twice": (f"{good}\n{good}\n" + json.dumps({"prompt": "p", "answer": " a", "distractors": [" a"]}) + "\n",
                              "must all differ"),
        "too few items": (f"{good}\n", "needs at least 3"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.jsonl"
        path.write_text(text)
        with pytest.raises(BadInputError, match=message) as exc:
            caps.load_tasks([str(path)])
        assert str(path) in str(exc.value)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good.encode() + b"\n\xe9t\xe9\n")
    with pytest.raises(BadInputError, match=r"not UTF-8 text \(byte 0xe9 on line 2\). Save it as UTF-8"):
        caps.load_tasks([str(latin)])
    with pytest.raises(BadInputError, match="does not exist"):
        caps.load_tasks([str(tmp_path / "missing.jsonl")])


def test_a_user_task_joins_the_builtin_suite_and_two_tasks_of_one_name_are_refused(tmp_path):
    lines = [json.dumps({"prompt": f"room {i} is Cedar. room {i} is", "answer": " Cedar", "distractors": [" Oak"]})
             for i in range(6)]
    mine = tmp_path / "rooms.jsonl"
    mine.write_text("\n".join(lines) + "\n")
    tasks = caps.load_tasks(["builtin", str(tmp_path)])
    assert [t.name for t in tasks][-1] == "rooms" and len(tasks) == 5
    (tmp_path / "recall.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError, match="two capability tasks are named 'recall'"):
        caps.load_tasks(["builtin", str(tmp_path / "recall.jsonl")])


def test_kept_is_the_worst_measurable_task_and_a_task_at_chance_is_not_gated():
    suite = caps.Suite(part="verify", tasks=["easy", "hard", "noise"], requests={}, chance={"easy": 0.25, "hard": 0.5, "noise": 0.5},
                       sources={"easy": "a", "hard": "b", "noise": "c"})
    before = {"easy": np.ones(40, bool), "hard": np.r_[np.ones(30, bool), np.zeros(10, bool)],
              "noise": np.r_[np.ones(20, bool), np.zeros(20, bool)]}
    after = {"easy": np.r_[np.ones(38, bool), np.zeros(2, bool)], "hard": np.r_[np.ones(15, bool), np.zeros(25, bool)],
             "noise": np.zeros(40, bool)}
    out = caps.summarize(suite, before, after)
    assert out["tasks"]["easy"]["kept"] == pytest.approx(0.95)
    assert out["tasks"]["hard"]["kept"] == pytest.approx(0.5)
    assert out["tasks"]["noise"]["measurable"] is False and out["tasks"]["noise"]["kept"] is None  # 50% at chance 50%
    assert out["kept"] == pytest.approx(0.5) and out["worst"] == "hard"
    lo, hi = out["tasks"]["hard"]["kept_ci95"]
    assert lo < 0.5 < hi
    assert caps.wilson(40, 40)[1] == pytest.approx(1.0) and caps.wilson(0, 40)[0] == pytest.approx(0.0, abs=1e-12)


def test_the_control_reading_does_not_judge_specificity_when_the_reduction_could_be_zero():
    assert "cannot be judged" in _control_reading(0.3, 0.3, [-0.1, 0.6])
    assert "not specific" in _control_reading(0.6, 0.6, [0.4, 0.8])
    assert "specific to the social frame" in _control_reading(0.6, 0.05, [0.4, 0.8])
