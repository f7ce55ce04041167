"""Scores and activation sites, on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_CONFIGS, tiny_model

from mechfix.architectures import get_path
from mechfix.engine.batches import Request
from mechfix.engine.forward import run_requests


def _requests(tok) -> list[Request]:
    """Decisions of different lengths, with single- and multi-token options."""
    prompts = ["Host: Capital of France?\nSam:", "Q?\nSam:", "A much longer conversation, with many turns.\nAna: Lyon.\nSam:"]
    opts = [" Paris", " Lyon", " x"]
    return [
        Request(prompt=tok(p)["input_ids"], options=[tok(o, add_special_tokens=False)["input_ids"] for o in opts])
        for p in prompts
    ]


def _full_forward_scores(lm, req: Request) -> torch.Tensor:
    """Reference: one plain forward per option through the model's own forward, full logits."""
    out = []
    for opt in req.options:
        ids = torch.tensor([req.prompt + opt])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
        start = len(req.prompt) - 1
        out.append(sum(logp[start + j, t] for j, t in enumerate(opt)))
    return torch.stack(out)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_scores_equal_the_models_own_forward_for_every_family(arch):
    lm = tiny_model(arch)
    reqs = _requests(lm.tokenizer)
    results = run_requests(lm, reqs, batch_size=8)
    for req, res in zip(reqs, results):
        torch.testing.assert_close(res.scores, _full_forward_scores(lm, req).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_activation_shapes_per_architecture(arch):
    lm = tiny_model(arch)
    reqs = _requests(lm.tokenizer)
    (res, *_) = run_requests(lm, reqs, batch_size=8)
    L, H, dh, d = lm.n_layers, lm.n_heads, lm.head_dim, lm.hidden
    assert (L, H) == (3, 4)
    assert res.acts["resid"].shape == (L, d)
    assert res.acts["heads"].shape == (L, H, dh)
    assert res.acts["mlp"].shape == (L, d)
    (res_all, *_) = run_requests(lm, reqs, batch_size=8, all_positions=True)
    T = len(reqs[0].prompt)
    assert res_all.acts["resid"].shape == (T, L, d)
    assert res_all.acts["heads"].shape == (T, L, H, dh)
    # The decision position is the last prompt position.
    torch.testing.assert_close(res_all.acts["heads"][-1], res.acts["heads"])


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_sites_are_what_they_claim_to_be(arch):
    """resid = decoder layer output (HF hidden_states), heads = input of the output projection, mlp = MLP output."""
    lm = tiny_model(arch)
    req = _requests(lm.tokenizer)[0]
    (res,) = run_requests(lm, [req], batch_size=1, all_positions=True)
    ids = torch.tensor([req.prompt])
    attn_parent = lm.spec.attn_out.rsplit(".", 1)[0]
    seen: dict[str, list[torch.Tensor]] = {"attn": [], "mlp": []}
    hooks = []
    for layer in lm.layers:
        hooks.append(get_path(layer, attn_parent).register_forward_hook(
            lambda m, a, o: seen["attn"].append(o[0] if isinstance(o, tuple) else o)))
        hooks.append(get_path(layer, lm.spec.mlp).register_forward_hook(lambda m, a, o: seen["mlp"].append(o)))
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    for i in range(lm.n_layers - 1):  # HF's last hidden state is after the final norm
        torch.testing.assert_close(res.acts["resid"][:, i], hs[i + 1][0], atol=1e-5, rtol=1e-4)
    for i in range(lm.n_layers):
        torch.testing.assert_close(res.acts["mlp"][:, i], seen["mlp"][i][0], atol=1e-5, rtol=1e-4)
        heads = res.acts["heads"][:, i].reshape(len(req.prompt), -1)
        with torch.no_grad():
            projected = lm.attn_out(i)(heads)
        torch.testing.assert_close(projected, seen["attn"][i][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "gpt_neox"])
def test_batched_scores_and_activations_equal_unbatched(arch):
    lm = tiny_model(arch)
    reqs = _requests(lm.tokenizer) * 2
    one = run_requests(lm, reqs, batch_size=1)
    many = run_requests(lm, reqs, batch_size=6)
    for a, b in zip(one, many):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
        for site in a.acts:
            torch.testing.assert_close(a.acts[site], b.acts[site], atol=1e-4, rtol=1e-4)


def test_padding_does_not_change_scores_even_beside_a_much_longer_row(tiny_llama):
    tok = tiny_llama.tokenizer
    short = Request(prompt=tok("Q?\nSam:")["input_ids"], options=[tok(" Paris", add_special_tokens=False)["input_ids"]])
    long = Request(prompt=tok("x" * 300)["input_ids"], options=[[40]])
    alone = run_requests(tiny_llama, [short], batch_size=1)[0].scores
    padded = run_requests(tiny_llama, [short, long], batch_size=2)[0].scores
    torch.testing.assert_close(alone, padded, atol=1e-4, rtol=0)


def test_run_requests_rejects_empty_options_and_unknown_sites(tiny_llama):
    with pytest.raises(ValueError, match="no tokens"):
        run_requests(tiny_llama, [Request(prompt=[1, 2], options=[[]])])
    with pytest.raises(ValueError, match="unknown sites"):
        run_requests(tiny_llama, [Request(prompt=[1, 2], options=[[3]])], sites=("attn_pattern",))


def test_cached_passes_use_the_current_cache_keyword_and_raise_no_deprecation_warning():
    import warnings

    from mechfix.engine.generation import Writer
    from mechfix.engine.patching import encode_prefixes, run_tails
    from mechfix.engine.tails import tails_for

    lm = tiny_model("llama")
    prompts = [lm.tokenizer("Ana: Lyon. Sam:").input_ids, lm.tokenizer("Ben: Paris, then Rome. Sam:").input_ids]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefixes = encode_prefixes(lm, prompts)
        tails = [t for i, p in enumerate(prompts) for t in tails_for(p, [[70], [71]], i)]
        run_tails(lm, prefixes, tails, sites=())
        Writer(lm, 2).generate(["Ana: hello. Sam:", "Ben: hi. Sam:"], max_tokens=3)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_a_batch_that_runs_out_of_memory_is_split_and_the_scores_are_the_same(tiny_llama, monkeypatch):
    import mechfix.engine.backends.hooks as hooks_backend
    import mechfix.engine.forward as fw
    from conftest import MINI_RECIPE
    from test_attribute import _loaded

    from mechfix.stages.record import decision_requests

    lm = tiny_llama
    reqs = [r for rs in decision_requests(lm, _loaded(MINI_RECIPE).recipe).requests.values() for r in rs]
    plain = fw.run_requests(lm, reqs, batch_size=8, sites=("resid",))
    real, sizes = hooks_backend.final_hidden, []

    def small_memory(lm_, ids, mask):  # an accelerator that holds at most 3 sequences
        sizes.append(len(ids))
        if len(ids) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(lm_, ids, mask)

    monkeypatch.setattr(hooks_backend, "final_hidden", small_memory)
    split = fw.run_requests(lm, reqs, batch_size=8, sites=("resid",))
    # 8 and then 4 run out of memory; from then on every batch, later ones included, is at most 2.
    assert sizes[:2] == [8, 4] and max(sizes[2:]) == 2
    for a, b in zip(plain, split):
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.acts["resid"], b.acts["resid"], atol=1e-5, rtol=1e-5)

    def no_memory(lm_, ids, mask):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(hooks_backend, "final_hidden", no_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        fw.run_requests(lm, reqs[:2], batch_size=2, sites=())

    def broken(lm_, ids, mask):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(hooks_backend, "final_hidden", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not retried
        fw.run_requests(lm, reqs[:4], batch_size=4, sites=())


_PASSAGES = [("The river rose slowly through the night, and by morning the low fields were under water. " * (1 + i % 3))[: 40 + 9 * i]
             for i in range(11)]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2 soft-caps its logits: KL then compares full distributions
def test_kl_on_neutral_text_splits_a_batch_that_runs_out_of_memory_and_measures_the_same_positions(arch, monkeypatch):
    import mechfix.engine.kl as kl
    import mechfix.measure.evaluate as ev
    from mechfix.fixes.fix import Fix

    lm = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    fix = Fix(op="scale", layers=[1, 2], heads=[0, 3], vectors=torch.randn(2, lm.head_dim, generator=g),
              means=torch.zeros(2, lm.head_dim), strength=1.0)
    monkeypatch.setattr(ev, "KL_CHUNK", 200)  # batches of several passages each
    monkeypatch.setattr(kl, "KL_CHUNK", 200)
    want = ev.neutral_kl(lm, fix, [0.5, 1.0], ev.neutral_set(lm, _PASSAGES, stride=3), reuse=True)
    neutral = ev.neutral_set(lm, _PASSAGES, stride=3)
    assert max(len(ids) for ids, _ in neutral.batches) > 2
    real, sizes = kl.final_hidden, []

    def small_memory(lm_, ids, mask):  # an accelerator that holds at most 2 passages
        sizes.append(len(ids))
        if len(ids) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(lm_, ids, mask)

    monkeypatch.setattr(kl, "final_hidden", small_memory)
    got = ev.neutral_kl(lm, fix, [0.5, 1.0], neutral, reuse=True)
    assert any(n > 2 for n in sizes) and max(len(ids) for ids, _ in neutral.batches) <= 2
    # The halves measure exactly the positions the whole batches did (the stride counts on across a split).
    counts = [int(kl.keep_mask(m).sum()) for _, m in neutral.batches]
    assert sum(len(range(f, n, 3)) for f, n in zip(neutral.firsts, counts)) == neutral.n_tokens
    assert got == pytest.approx(want, rel=1e-5, abs=1e-9) and min(want) > 0
    # The smaller batches are kept: a later call runs no batch that fails.
    sizes.clear()
    assert ev.neutral_kl(lm, fix, [1.0], neutral) == pytest.approx(want[1:], rel=1e-5) and max(sizes) <= 2

    def broken(lm_, ids, mask):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(kl, "final_hidden", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not retried
        ev.neutral_kl(lm, fix, [1.0], ev.neutral_set(lm, _PASSAGES))


def test_reading_a_probe_layer_retries_halves_after_running_out_of_memory_and_keeps_nothing_from_the_failed_pass():
    from mechfix.engine.batches import pad_batch
    from mechfix.fixes.gate import layer_acts

    lm = tiny_model("qwen3")
    seqs = [lm.tokenizer(p).input_ids for p in _PASSAGES]
    batches = [pad_batch(lm, seqs[:5]), pad_batch(lm, seqs[5:])]
    want = layer_acts(lm, [0, 1], batches)
    refused = []

    def small_memory(module, args):  # layer 1 runs out of memory on more than one passage, after layer 0 was read
        if args[0].shape[0] > 1:
            refused.append(args[0].shape[0])
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")

    handle = lm.layers[1].register_forward_pre_hook(small_memory)
    try:
        got = layer_acts(lm, [0, 1], batches)
    finally:
        handle.remove()
    assert refused[:2] == [5, 3]  # 5, then its first half, ran out of memory
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
