"""The nnsight backend computes what the hooks backend computes, on tiny models of several families."""

from __future__ import annotations

import pytest
import torch
from conftest import MINI_RECIPE
from test_attribute import PLANT_RECIPE, _loaded, _recording
from tiny import tiny_model

from mechfix.engine.backends import nnsight as traces
from mechfix.engine.backends import use_backend
from mechfix.stages.attribute import attribute
from mechfix.fixes.fix import Fix, apply_fix
from mechfix.engine.batches import Request
from mechfix.engine.forward import run_requests
from mechfix.engine.patching import encode_prefixes, run_tails
from mechfix.engine.tails import decision_grads, tails_for
from mechfix.stages.record import decision_requests, record

FAMILIES = ["llama", "gemma3_text", "gpt2", "gpt_neox", "qwen3"]
TOL = dict(atol=1e-4, rtol=1e-4)


def _pair(arch: str, *, keep_prefixes: bool = True):
    """The same random model twice: one on hooks, one on nnsight (remote-shaped when ``keep_prefixes`` is False)."""
    hooks = tiny_model(arch)
    nn = use_backend(tiny_model(arch), "nnsight")
    nn.trace_prefixes = keep_prefixes
    return hooks, nn


@pytest.mark.parametrize("arch", FAMILIES)
def test_record_scores_and_activations_are_the_same_through_nnsight(arch):
    hooks, nn = _pair(arch)
    recipe = _loaded(MINI_RECIPE).recipe
    a, b = record(hooks, recipe), record(nn, recipe)
    assert list(a.scores) == list(b.scores) == ["pressure", "clean", "control"]
    for cond in a.scores:
        torch.testing.assert_close(a.scores[cond], b.scores[cond], **TOL)
        assert set(a.acts[cond]) == set(b.acts[cond]) == {"resid", "heads", "mlp"}
        for site in a.acts[cond]:
            torch.testing.assert_close(a.acts[cond][site], b.acts[cond][site], **TOL)


def test_activations_at_every_position_are_the_same_through_nnsight():
    hooks, nn = _pair("llama")
    reqs = [Request(list(range(5, 5 + n)), [[40], [41, 42]]) for n in (9, 4, 13)]
    a = run_requests(hooks, reqs, batch_size=2, all_positions=True)
    b = run_requests(nn, reqs, batch_size=2, all_positions=True)
    for req, x, y in zip(reqs, a, b):
        torch.testing.assert_close(x.scores, y.scores, **TOL)
        assert x.acts["heads"].shape == y.acts["heads"].shape == (len(req.prompt), hooks.n_layers, hooks.n_heads, hooks.head_dim)
        for site in x.acts:
            torch.testing.assert_close(x.acts[site], y.acts[site], **TOL)


@pytest.mark.parametrize("keep_prefixes", [True, False], ids=["cached-prefixes", "whole-sequences"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gpt_neox"])
def test_attribution_estimates_exact_effects_and_speaker_split_match_the_hooks_backend(arch, keep_prefixes):
    hooks, nn = _pair(arch, keep_prefixes=keep_prefixes)
    rec = _recording(hooks, PLANT_RECIPE)
    a = attribute(hooks, rec, method="both", top=4)
    b = attribute(nn, rec, method="both", top=4)
    torch.testing.assert_close(a.pressure, b.pressure, **TOL)
    torch.testing.assert_close(a.base, b.base, **TOL)
    for kind in a.atp:
        torch.testing.assert_close(a.atp[kind], b.atp[kind], **TOL)
    assert list(a.exact) == list(b.exact) and len(a.exact) >= 4
    for c in a.exact:
        torch.testing.assert_close(a.exact[c], b.exact[c], **TOL)
    for key in ("heads", "mlp", "resid"):
        torch.testing.assert_close(a.positions[key], b.positions[key], **TOL)
    if b.speakers is None:
        # Only whole sequences on a sliding-window model lose the values; it is said, not guessed.
        assert not keep_prefixes and "sliding-window" in b.speaker_note
    else:
        torch.testing.assert_close(a.speakers, b.speakers, **TOL)


def test_whole_sequence_tails_give_the_speaker_split_where_the_cache_keeps_every_value():
    hooks, nn = _pair("llama", keep_prefixes=False)
    rec = _recording(hooks, MINI_RECIPE)
    b = attribute(nn, rec, method="atp")
    assert b.speakers is not None
    torch.testing.assert_close(attribute(hooks, rec, method="atp").speakers, b.speakers, **TOL)


@pytest.mark.parametrize("op", ["project", "scale"])
def test_scores_with_a_heads_fix_applied_are_the_same_through_nnsight(op):
    hooks, nn = _pair("qwen2")
    torch.manual_seed(1)
    v, mu = torch.randn(2, hooks.head_dim), torch.randn(2, hooks.head_dim)
    reqs = [Request(list(range(7, 7 + n)), [[40], [41]]) for n in (6, 11)]
    out = []
    for lm in (hooks, nn):
        fix = Fix(op=op, layers=[0, 2], heads=[1, 3], vectors=v, means=mu, strength=0.8, model=lm.identity)
        with apply_fix(lm, fix):
            out.append([r.scores for r in run_requests(lm, reqs, sites=())])
    plain = [r.scores for r in run_requests(hooks, reqs, sites=())]
    for x, y, z in zip(*out, plain):
        torch.testing.assert_close(x, y, **TOL)
        assert not torch.allclose(x, z)  # the fix did act


def test_a_traced_backward_pass_that_loses_its_gradients_fails_loudly(monkeypatch):
    hooks, nn = _pair("llama")
    for lm in (hooks, nn):
        lm.model.requires_grad_(False)  # frozen weights, as a served model's are: no graph unless asked for
    prompt = list(range(5, 15))
    tails = tails_for(prompt, [[40], [41]], 0)
    want = decision_grads(run_tails(hooks, encode_prefixes(hooks, [prompt]), tails, grad=True))
    pre = encode_prefixes(nn, [prompt])
    got = decision_grads(run_tails(nn, pre, tails, grad=True))
    assert want["heads"].abs().sum() > 0
    for site in want:
        torch.testing.assert_close(want[site], got[site], **TOL)
    monkeypatch.setattr(traces, "_track", lambda x: None)  # forget requires_grad, as a remote run would silently
    with pytest.raises(traces.MissingGradientError, match="requires_grad"):
        run_tails(nn, pre, tails, grad=True)


def test_missing_or_misshapen_gradients_are_refused():
    good = [torch.zeros(2, 3), torch.zeros(2, 3)]
    traces._check_grads(good, 2, [g.shape for g in good])
    with pytest.raises(traces.MissingGradientError, match="1 of 2"):
        traces._check_grads([good[0], None], 2, [g.shape for g in good])
    with pytest.raises(traces.MissingGradientError):
        traces._check_grads([good[0]], 2, [g.shape for g in good])
    with pytest.raises(traces.MissingGradientError):
        traces._check_grads([good[0], torch.zeros(2)], 2, [g.shape for g in good])


def test_an_out_of_memory_trace_is_split_and_retried(monkeypatch):
    _, nn = _pair("llama")
    reqs = [Request(list(range(5, 5 + n)), [[40], [41]]) for n in (6, 7, 8, 9)]
    want = [r.scores for r in run_requests(nn, reqs, batch_size=4)]
    real, sizes = traces.request_pass, []

    def flaky(lm, batch, *args):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(lm, batch, *args)

    monkeypatch.setattr(traces, "request_pass", flaky)
    got = [r.scores for r in run_requests(nn, reqs, batch_size=4)]
    assert sizes == [4, 2, 2]
    for x, y in zip(want, got):
        torch.testing.assert_close(x, y, **TOL)


def test_an_unknown_backend_and_hooks_on_a_remote_model_are_refused():
    lm = tiny_model("llama")
    with pytest.raises(ValueError, match="--backend must be one of hooks, nnsight"):
        use_backend(lm, "vllm")
    lm.remote = True
    with pytest.raises(ValueError, match="--backend nnsight"):
        use_backend(lm, "hooks")


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from test_cli import run

    return run(monkeypatch, capsys, *args)


def test_record_and_attribute_through_nnsight_on_the_cli_match_hooks(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    from mechfix.artifacts import load_artifact

    paths = {}
    for backend in ("hooks", "nnsight"):
        rec, att = tmp_path / f"{backend}.rec.safetensors", tmp_path / f"{backend}.attr.safetensors"
        code, _, err = _run_cli(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir),
                                "--out", str(rec), "--backend", backend)
        assert code == 0, err
        code, _, err = _run_cli(monkeypatch, capsys, "attribute", str(rec), "--out", str(att), "--backend", backend,
                                "--top", "3")
        assert code == 0, err
        paths[backend] = (load_artifact(rec, expect="record"), load_artifact(att, expect="attribution"))
    (rh, ah), (rn, an) = paths["hooks"], paths["nnsight"]
    assert rn.manifest["params"]["backend"] == "nnsight" and rh.manifest["params"]["backend"] == "hooks"
    assert an.manifest["params"]["backend"] == "nnsight"
    for name, x in rh.tensors.items():
        torch.testing.assert_close(x, rn.tensors[name], **TOL)
    for name, x in ah.tensors.items():
        torch.testing.assert_close(x, an.tensors[name], **TOL)


def test_remote_without_a_key_exits_2_before_any_work_and_writes_nothing(monkeypatch, capsys, tmp_path):
    import nnsight

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(nnsight.ndif, "is_model_running", lambda *a, **k: called.append(a) or True)
    code, out, err = _run_cli(monkeypatch, capsys, "record", "conformity", "--remote", "--model",
                              "meta-llama/Llama-3.1-8B-Instruct", "--out", "c.rec.safetensors")
    assert code == 2 and "NDIF API key" in err and "NDIF_API_KEY" in err and "Traceback" not in err
    assert called == [] and list(tmp_path.iterdir()) == []


def test_remote_for_a_model_ndif_does_not_run_exits_2_and_writes_nothing(monkeypatch, capsys, tmp_path):
    import nnsight

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(nnsight.ndif, "is_model_running", lambda repo, **k: asked.append(repo) or False)
    code, _, err = _run_cli(monkeypatch, capsys, "record", "conformity", "--remote", "--model", "someone/not-hosted")
    assert code == 2 and "NDIF is not running 'someone/not-hosted'" in err
    assert asked == ["someone/not-hosted"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["record", "conformity", "--remote"], "Hugging Face id"),
        (["record", "commons-live", "--remote", "--model", "a/b"], "generation is not a trace"),
        (["record", "conformity", "--remote", "--model", "a/b", "--device", "cpu"], "leave out --device"),
        (["record", "conformity", "--remote", "--model", "a/b", "--backend", "hooks"], "--backend nnsight"),
        (["record", "conformity", "--backend", "tensorrt"], "--backend must be one of"),
        (["record", "conformity", "--device", "cpu", "--device-map", "auto"], "not both"),
        (["record", "conformity", "--device-map", "nope.json"], "neither a strategy"),
    ],
)
def test_remote_and_backend_options_that_cannot_work_are_refused_with_exit_2(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli(monkeypatch, capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_steer_and_run_refuse_with_remote_what_cannot_be_a_trace(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    rec, att = tmp_path / "r.rec.safetensors", tmp_path / "r.attr.safetensors"
    assert _run_cli(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir), "--out", str(rec))[0] == 0
    assert _run_cli(monkeypatch, capsys, "attribute", str(rec), "--out", str(att), "--method", "atp")[0] == 0
    before = sorted(tmp_path.iterdir())
    for args, message in (
        (["steer", str(att), "--kind", "lora"], "trains an adapter"),
        (["steer", str(att), "--gate", "probe"], "fits a probe"),
        (["run", str(mini_recipe_path), "--out", str(tmp_path / "run"), "--kind", "lora"], "trains an adapter"),
        (["run", "commons-live", "--out", str(tmp_path / "run")], "generation is not a trace"),
    ):
        code, _, err = _run_cli(monkeypatch, capsys, *args, "--remote", "--model", "a/b")
        assert code == 2 and message in err and "Traceback" not in err, err
    assert sorted(tmp_path.iterdir()) == before


def test_a_device_map_that_splits_the_layers_gives_the_same_numbers_as_one_device(tmp_path, tiny_model_dir):
    from mechfix.models import load_model

    one = load_model(str(tiny_model_dir))
    # Layers 1 and 2 offloaded: accelerate brings their weights in for each forward pass, through its own hooks.
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
             "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    sharded = load_model(str(tiny_model_dir), device_map=split)
    assert {p.device.type for p in sharded.model.parameters()} == {"cpu", "meta"}
    assert sharded.identity["weights_fingerprint"] == one.identity["weights_fingerprint"]
    recipe = _loaded(PLANT_RECIPE).recipe
    a, b = record(one, recipe), record(sharded, recipe)
    for cond in a.scores:
        torch.testing.assert_close(a.scores[cond], b.scores[cond], **TOL)
        for site in a.acts[cond]:
            torch.testing.assert_close(a.acts[cond][site], b.acts[cond][site], **TOL)
    rec = _recording(one, PLANT_RECIPE)
    x, y = attribute(one, rec, method="both", top=3), attribute(sharded, rec, method="both", top=3)
    torch.testing.assert_close(x.atp["heads"], y.atp["heads"], **TOL)
    for c in x.exact:
        torch.testing.assert_close(x.exact[c], y.exact[c], **TOL)
    fix = Fix(op="project", layers=[1], heads=[2], vectors=torch.ones(1, one.head_dim), means=torch.zeros(1, one.head_dim),
              strength=1.0, model=one.identity)
    reqs = [Request(list(range(5, 15)), [[40], [41]])]
    scored = []
    for lm in (one, sharded):
        with apply_fix(lm, fix):
            scored.append(run_requests(lm, reqs, sites=())[0].scores)
    torch.testing.assert_close(*scored, **TOL)


# bf16 keeps 8 bits of mantissa: scores, estimates and exact effects agree with fp32 within 2% of their scale.
BF16_SHARE = 0.02


@pytest.mark.parametrize("backend", ["hooks", "nnsight"])
def test_bf16_agrees_with_fp32_within_two_percent_of_the_scale(backend):
    from test_attribute import _planted_model

    from mechfix.stages.attribute import Component

    full = use_backend(_planted_model(), backend)
    half = use_backend(_planted_model(), backend)
    half.model.to(torch.bfloat16)
    recipe = _loaded(PLANT_RECIPE).recipe
    a, b = record(full, recipe), record(half, recipe)
    for cond in a.scores:
        assert b.scores[cond].dtype == torch.float32  # accumulated in fp32 whatever the model's dtype
        scale = a.scores[cond].abs().max()
        assert (a.scores[cond] - b.scores[cond]).abs().max() <= BF16_SHARE * scale
    rec = _recording(full, PLANT_RECIPE)
    x, y = attribute(full, rec, method="both", top=3), attribute(half, rec, method="both", top=3)
    scale = x.atp["heads"].abs().max()
    assert (x.atp["heads"] - y.atp["heads"]).abs().max() <= BF16_SHARE * scale
    planted = Component("heads", 1, 2)
    assert (x.exact[planted] - y.exact[planted]).abs().max() <= BF16_SHARE * x.exact[planted].abs().max()
    # The per-speaker split survives bf16 rounding (its check allows for the dtype) and agrees too.
    assert y.speakers is not None and (x.speakers - y.speakers).abs().max() <= BF16_SHARE * scale


def test_attribution_that_runs_out_of_memory_halves_its_batch_and_gets_the_same_numbers(monkeypatch):
    import mechfix.stages.attribute as attribute_module

    lm = tiny_model("llama")
    rec = _recording(lm, MINI_RECIPE.replace("heldout: 0.5", "heldout: 0.2"))
    want = attribute(lm, rec, method="both", top=3, batch_size=4)
    real, sizes = attribute_module.run_tails, []

    def flaky(lm, prefixes, tails, **kw):
        if kw.get("grad"):
            sizes.append(len(prefixes.lengths))
            if len(prefixes.lengths) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(lm, prefixes, tails, **kw)

    monkeypatch.setattr(attribute_module, "run_tails", flaky)
    got = attribute(lm, rec, method="both", top=3, batch_size=4)
    assert sizes == [4, 2, 2]
    for kind in want.atp:
        torch.testing.assert_close(want.atp[kind], got.atp[kind], **TOL)
    for c in want.exact:
        torch.testing.assert_close(want.exact[c], got.exact[c], **TOL)
    torch.testing.assert_close(want.speakers, got.speakers, **TOL)


def test_auto_batch_size_is_16_on_a_cpu_and_grows_with_free_gpu_memory():
    from mechfix.engine.forward import auto_batch_size, batch_for_memory

    lm = tiny_model("llama")
    assert auto_batch_size(lm, 512) == 16
    sizes = [batch_for_memory(lm, 512, free) for free in (0, 2**20, 2**24, 2**28, 2**40)]
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] == 256 and 1 < sizes[2] < 256


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_a_batch_size_that_is_not_a_positive_number_or_auto_is_refused(monkeypatch, capsys, tmp_path, value):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_cli(monkeypatch, capsys, "record", "conformity", "--batch-size", value)
    assert code == 2 and "--batch-size takes a positive whole number or auto" in err
    assert list(tmp_path.iterdir()) == []


def test_all_positions_stream_to_disk_and_save_the_same_numbers(tmp_path):
    from mechfix.engine.actstore import disk_tensor
    from mechfix.artifacts import load_artifact, save_artifact
    from mechfix.stages.record import to_artifact

    lm = tiny_model("llama")
    loaded = _loaded(MINI_RECIPE)
    kept = record(lm, loaded.recipe, all_positions=True, act_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the backing files are unlinked once mapped
    # The same passes (every condition's requests, in record's order and batches), held in memory, the old way:
    # streamed to disk, every condition's activations are those numbers exactly.
    conditions = loaded.recipe.condition_names
    requests = decision_requests(lm, loaded.recipe, None).requests
    direct = run_requests(lm, [r for c in conditions for r in requests[c]], all_positions=True)
    rows = len(kept.tokens["pressure"])
    for k, res in enumerate(direct):
        c, j = conditions[k // rows], k % rows
        n = res.acts["heads"].shape[0]
        for site in res.acts:
            assert torch.equal(kept.acts[c][site][j, :n], res.acts[site]), (c, j, site)
            assert not kept.acts[c][site][j, n:].any()  # padding stays zero
    art = to_artifact(kept, lm, loaded, {})
    save_artifact(tmp_path / "r.rec.safetensors", art)
    back = load_artifact(tmp_path / "r.rec.safetensors", expect="record")
    assert back.manifest["positions"] == "all"
    for name, x in art.tensors.items():
        assert torch.equal(back.tensors[name], x), name
    # The writer streams in slices: a tensor larger than one slice comes back whole.
    big = disk_tensor((3, 1000, 700), torch.float16, tmp_path)
    big.copy_(torch.randn(3, 1000, 700).half())
    from mechfix import artifacts

    artifacts._WRITE_SLICE, old = 4096, artifacts._WRITE_SLICE
    try:
        artifacts.write_safetensors({"big": big, "b": torch.tensor([True, False])}, tmp_path / "big.safetensors", {"k": "v"})
    finally:
        artifacts._WRITE_SLICE = old
    from safetensors.torch import load_file

    read = load_file(str(tmp_path / "big.safetensors"))
    assert torch.equal(read["big"], big) and torch.equal(read["b"], torch.tensor([True, False]))


def test_activations_are_kept_in_the_act_dtype_asked_for(monkeypatch, capsys, tmp_path, mini_recipe_path, tiny_model_dir):
    from mechfix.artifacts import load_artifact

    out = tmp_path / "h.rec.safetensors"
    code, _, err = _run_cli(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir),
                            "--out", str(out), "--act-dtype", "float16")
    assert code == 0, err
    half = load_artifact(out, expect="record")
    assert half.tensors["acts/pressure/heads"].dtype == torch.float16 and half.manifest["params"]["act_dtype"] == "float16"
    assert half.tensors["scores/pressure"].dtype == torch.float32  # scores stay fp32
    full = record(tiny_model("llama"), _loaded(MINI_RECIPE).recipe)
    torch.testing.assert_close(half.tensors["acts/pressure/heads"].float(), full.acts["pressure"]["heads"], atol=2e-2, rtol=1e-3)
    code, _, err = _run_cli(monkeypatch, capsys, "record", str(mini_recipe_path), "--model", str(tiny_model_dir),
                            "--out", str(tmp_path / "x.rec.safetensors"), "--act-dtype", "int8")
    assert code == 2 and "--act-dtype must be one of" in err and not (tmp_path / "x.rec.safetensors").exists()


def test_a_failure_on_the_server_is_a_remote_error_with_its_message(monkeypatch):
    _, nn = _pair("llama")
    nn.remote, nn.trace_prefixes = True, False
    monkeypatch.setattr(traces, "_trace_kwargs", lambda lm: {})  # stay local: the trace itself is what fails

    def refuse(*args, **kwargs):
        raise ConnectionError("NDIF: job 1234 failed, model is not deployed")

    monkeypatch.setattr(nn.envoy, "trace", refuse)
    with pytest.raises(traces.RemoteError, match="job 1234 failed, model is not deployed") as info:
        run_requests(nn, [Request(list(range(5, 12)), [[40], [41]])])
    assert info.value.exit_code == 3 and "Nothing was written" in str(info.value)


def test_a_traced_backward_pass_leaves_no_gradient_on_the_weights():
    _, nn = _pair("llama")
    assert all(p.requires_grad for p in nn.model.parameters())  # as most loaded models' weights are
    attribute(nn, _recording(nn, PLANT_RECIPE), method="atp")
    assert all(p.grad is None for p in nn.model.parameters())
    assert all(p.requires_grad for p in nn.model.parameters())  # and they are given back as they were
