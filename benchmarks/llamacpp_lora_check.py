"""Does llama.cpp apply an exported heads fix as mechfix does? (The llama.cpp route of `mechfix export --format peft`.)

Two steps, because mechfix and llama-cpp-python may live in different environments:

    # 1. mechfix's logits with and without the fix, on two probe texts (writes ours.npz)
    python benchmarks/llamacpp_lora_check.py ours FIX --out ours.npz
    # 2. the adapter converted for llama.cpp, then llama.cpp's logits without and with it
    mechfix export FIX --format peft --out adapter
    python llama.cpp/convert_lora_to_gguf.py adapter --base MODEL_HF_FOLDER --outtype f32 --outfile lora.gguf
    python llama.cpp/convert_hf_to_gguf.py MODEL_HF_FOLDER --outtype f32 --outfile base-f32.gguf
    python benchmarks/llamacpp_lora_check.py theirs ours.npz --base base-f32.gguf --lora lora.gguf

Step 2 prints, per text, how far llama.cpp's unfixed logits are from mechfix's,
and how its change of the logits with the adapter compares with mechfix's
change with the fix (largest and RMS difference, correlation, slope).
"""

from __future__ import annotations

import argparse

import numpy as np

TEXTS = ["neutral", "Host: What is the capital of Italy?\nAna: Milan.\nBen: Milan.\nSam:"]


def ours(fix_path: str, out: str, model: str | None) -> None:
    import torch

    from mechfix import apply_fix, load_fix, load_model
    from mechfix.measure.evaluate import neutral_passages

    lm = load_model(model) if model else load_model()
    fix = load_fix(fix_path)
    saved = {}
    for i, text in enumerate(neutral_passages()[0] if t == "neutral" else t for t in TEXTS):
        ids = lm.tokenizer(text).input_ids
        with torch.no_grad():
            saved[f"t0_{i}"] = lm.model(torch.tensor([ids])).logits[0].float().numpy()
            with apply_fix(lm, fix):
                saved[f"t1_{i}"] = lm.model(torch.tensor([ids])).logits[0].float().numpy()
        saved[f"ids{i}"] = np.array(ids)
    np.savez(out, **saved)
    print(f"wrote {out}: {[len(saved[f'ids{i}']) for i in range(len(TEXTS))]} tokens")


def theirs(npz: str, base: str, lora: str) -> None:
    from llama_cpp import Llama

    d = np.load(npz)

    def logits(ids: np.ndarray, lora_path: str | None) -> np.ndarray:
        m = Llama(model_path=base, logits_all=True, n_ctx=512, n_threads=2, verbose=False,
                  **({"lora_path": lora_path} if lora_path else {}))
        m.reset()
        m.eval([int(x) for x in ids])  # the same token ids (BOS included), no re-tokenising
        return np.array(m.scores[: len(ids)], dtype=np.float64)

    for i in range(len(TEXTS)):
        ids = d[f"ids{i}"]
        l0, l1 = logits(ids, None), logits(ids, lora)
        t0, t1 = d[f"t0_{i}"].astype(np.float64), d[f"t1_{i}"].astype(np.float64)
        dl, dt = l1 - l0, t1 - t0
        print(f"text {i} ({len(ids)} tokens): unfixed logits, llama.cpp vs mechfix: max |diff| {np.abs(l0 - t0).max():.4f}; "
              f"fix effect: mechfix max {np.abs(dt).max():.4f}, llama.cpp max {np.abs(dl).max():.4f}; effect difference "
              f"max {np.abs(dl - dt).max():.4f}, rms {np.sqrt(((dl - dt) ** 2).mean()):.5f} (effect rms "
              f"{np.sqrt((dt ** 2).mean()):.4f}); correlation {np.corrcoef(dl.ravel(), dt.ravel())[0, 1]:.5f}, "
              f"slope {float((dl * dt).sum() / (dt * dt).sum()):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    a = sub.add_parser("ours", help="mechfix's logits with and without the fix")
    a.add_argument("fix")
    a.add_argument("--out", default="ours.npz")
    a.add_argument("--model", default=None, help="default: the embedded Gemma 3 270M")
    b = sub.add_parser("theirs", help="llama.cpp's logits without and with the converted adapter, compared")
    b.add_argument("npz")
    b.add_argument("--base", required=True, help="the base model as GGUF (F32 for an exact comparison)")
    b.add_argument("--lora", required=True, help="the adapter converted by convert_lora_to_gguf.py")
    args = ap.parse_args()
    if args.step == "ours":
        ours(args.fix, args.out, args.model)
    else:
        theirs(args.npz, args.base, args.lora)


if __name__ == "__main__":
    main()
