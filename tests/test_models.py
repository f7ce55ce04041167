from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from mechfix.errors import BadInputError, ModelLoadError
from mechfix.models import load_model, model_identity, resolve_device_dtype


def test_device_and_dtype_default_to_cpu_fp32_without_a_gpu_and_can_be_overridden():
    if not torch.cuda.is_available():
        assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(BadInputError, match="unknown dtype 'fp8'"):
        resolve_device_dtype("cpu", "fp8")


def test_identity_is_stable_across_dtypes_and_changes_with_the_weights():
    lm = tiny_model("llama", seed=0)
    a = lm.identity
    assert model_identity(lm.model.to(torch.bfloat16), a["name"], None)["weights_fingerprint"] == a["weights_fingerprint"]
    other = tiny_model("llama", seed=1).identity
    assert other["config_hash"] == a["config_hash"]
    assert other["weights_fingerprint"] != a["weights_fingerprint"]
    assert tiny_model("gpt2").identity["config_hash"] != a["config_hash"]


def test_missing_model_paths_are_bad_input_that_says_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*leave out --model"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="model file .* does not exist"):
        load_model(str(tmp_path / "nowhere.gguf"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_a_saved_folder_loads_as_the_same_model(tiny_model_dir):
    lm = load_model(str(tiny_model_dir))
    ref = tiny_model("llama")
    assert lm.identity["weights_fingerprint"] == ref.identity["weights_fingerprint"]
    assert lm.identity["config_hash"] == ref.identity["config_hash"]


def test_two_processes_preparing_the_same_gguf_convert_it_once(monkeypatch, tmp_path):
    """Two loads started together wait on the cache's lock: one converts, the other finds its folder."""
    import threading
    import time

    from mechfix import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(64))
    calls: list[str] = []

    def slow_convert(path, out, status=None):
        calls.append(threading.current_thread().name)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one converts
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(models, "convert_gguf", slow_convert)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(models._checkpoint_for_gguf(gguf_file, None)), name=f"t{i}")
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1] and (got[0] / "config.json").is_file()
