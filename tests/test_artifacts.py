"""Artifacts: round trip, refusals with a fix, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mechfix.artifacts as artifacts
from mechfix.artifacts import Artifact, check_same_model, load_artifact, new_manifest, read_header, save_artifact
from mechfix.errors import ArtifactError, BadInputError

IDENTITY = {"name": "m", "architecture": "llama", "config_hash": "c1", "weights_fingerprint": "w1"}


SHAPE = {"layers": 2, "heads": 2, "head_dim": 4, "hidden": 8}


def _artifact(kind="record", **tensors) -> Artifact:
    """A minimal complete record (three decisions, one condition, two options), with ``tensors`` added."""
    t = {"scores/pressure": torch.randn(3, 2), "split": torch.tensor([0, 1, 0], dtype=torch.int8),
         "tokens/pressure": torch.ones(3, 5, dtype=torch.int32), "lengths/pressure": torch.full((3,), 5, dtype=torch.int32),
         **tensors}
    manifest = new_manifest(kind, model=IDENTITY, params={"batch_size": 4}, recipe={"name": "r"}, conditions=["pressure"],
                            options=["aligned", "misaligned"], shape=dict(SHAPE), summary={}, positions="decision")
    return Artifact(kind=kind, manifest=manifest, tensors=t)


def test_artifact_round_trip_keeps_tensors_manifest_and_hash(tmp_path):
    a = _artifact()
    digest = save_artifact(tmp_path / "a.safetensors", a)
    b = load_artifact(tmp_path / "a.safetensors", expect="record")
    assert b.kind == "record" and b.sha256 == digest == a.sha256
    assert b.manifest["model"] == IDENTITY and b.manifest["params"] == {"batch_size": 4}
    assert b.manifest["schema"] == artifacts.SCHEMA_VERSION and "torch" in b.manifest["libraries"]
    for k, v in a.tensors.items():
        assert torch.equal(b.tensors[k], v) and b.tensors[k].dtype == v.dtype


def test_a_wrong_kind_is_refused_with_the_command_that_makes_the_right_one(tmp_path):
    save_artifact(tmp_path / "a.safetensors", _artifact("record"))
    with pytest.raises(ArtifactError, match=r"is a record artifact, but this command needs a fix artifact.*mechfix steer"):
        load_artifact(tmp_path / "a.safetensors", expect="fix")


def test_foreign_corrupt_missing_and_future_files_are_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="not a mechfix artifact"):
        load_artifact(tmp_path / "plain.safetensors")
    save_artifact(tmp_path / "a.safetensors", _artifact())
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_artifact(tmp_path / "cut.safetensors")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "future.safetensors"),
              metadata={"mechfix.kind": "record", "mechfix.schema": "99", "mechfix.manifest": "{}"})
    with pytest.raises(ArtifactError, match="uses artifact schema 99"):
        read_header(tmp_path / "future.safetensors")


def test_nans_in_an_artifact_are_refused(tmp_path):
    save_artifact(tmp_path / "a.safetensors", _artifact(**{"scores/pressure": torch.tensor([[1.0, float("nan")]] * 3)}))
    with pytest.raises(ArtifactError, match="non-finite values.*scores/pressure"):
        load_artifact(tmp_path / "a.safetensors")


def test_an_interrupted_write_leaves_nothing_on_disk(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "sha256_file", boom)  # after the bytes are written, before the rename
    with pytest.raises(KeyboardInterrupt):
        save_artifact(tmp_path / "a.safetensors", _artifact())
    assert list(tmp_path.iterdir()) == []


def test_an_existing_artifact_survives_a_failed_overwrite(tmp_path, monkeypatch):
    save_artifact(tmp_path / "a.safetensors", _artifact())
    before = (tmp_path / "a.safetensors").read_bytes()
    def disk_full(tensors, path, metadata):
        Path(path).write_bytes(b"half a file")  # the disk fills up half-way through the write
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "write_safetensors", disk_full)
    with pytest.raises(OSError):
        save_artifact(tmp_path / "a.safetensors", _artifact())
    assert (tmp_path / "a.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_unwritable_targets_are_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        artifacts.check_writable(tmp_path / "no" / "a.safetensors")
    with pytest.raises(BadInputError, match="is a folder"):
        artifacts.check_writable(tmp_path)


def test_an_artifact_from_another_model_is_refused():
    manifest = {"model": IDENTITY}
    check_same_model(manifest, dict(IDENTITY, name="a local copy"), "a.safetensors")
    with pytest.raises(ArtifactError, match="weights fingerprints differ.*--model"):
        check_same_model(manifest, dict(IDENTITY, weights_fingerprint="w2"), "a.safetensors")


def test_a_saved_artifact_gets_ordinary_file_permissions(tmp_path):
    import os

    path = tmp_path / "a.safetensors"
    save_artifact(path, Artifact(kind="record", manifest=new_manifest("record"), tensors={"x": torch.zeros(2)}))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(("change", "named"), [
    (lambda a: a.manifest.pop("conditions"), "manifest key 'conditions' is missing"),
    (lambda a: a.manifest.update(shape="wide"), "manifest key 'shape' is not a dict"),
    (lambda a: a.manifest["shape"].pop("hidden"), "manifest shape lacks hidden"),
    (lambda a: a.tensors.pop("tokens/pressure"), "tensor 'tokens/pressure' is missing"),
    (lambda a: a.tensors.update({"scores/pressure": torch.zeros(3, 3)}), "tensor 'scores/pressure' has shape [3, 3]"),
    (lambda a: a.tensors.update({"lengths/pressure": torch.zeros(4, dtype=torch.int32)}), "lengths/pressure' has shape [4]"),
    (lambda a: a.tensors.update({"acts/pressure/heads": torch.zeros(3, 2, 3, 4)}), "acts/pressure/heads' has shape [3, 2, 3, 4]"),
    (lambda a: a.tensors.update({"acts/pressure/resid": torch.zeros(3, 8)}), "has 2 dimensions, not 3"),
])
def test_an_artifact_missing_what_its_kind_needs_is_refused_naming_it(tmp_path, change, named):
    a = _artifact()
    change(a)
    save_artifact(tmp_path / "a.safetensors", a)
    with pytest.raises(ArtifactError, match="not a complete record artifact") as exc:
        load_artifact(tmp_path / "a.safetensors")
    assert named in str(exc.value) and "mechfix record" in str(exc.value)


def test_a_fix_whose_vectors_disagree_with_its_targets_or_model_is_refused(tmp_path):
    fix_block = {"kind": "heads", "op": "project"}
    good = {"vectors": torch.zeros(2, 4), "means": torch.zeros(2, 4), "layers": torch.tensor([0, 1], dtype=torch.int32),
            "heads": torch.tensor([1, 0], dtype=torch.int32)}
    for tensors, named in [
        (good, None),
        ({**good, "vectors": torch.zeros(3, 4)}, "tensor 'vectors' has shape [3, 4]"),
        ({**good, "means": torch.zeros(2, 8)}, "tensor 'means' has shape [2, 8]"),  # head width is 4
        ({k: v for k, v in good.items() if k != "heads"}, "tensor 'heads' is missing"),
    ]:
        art = Artifact(kind="fix", manifest=new_manifest("fix", model=IDENTITY, fix=fix_block, shape=SHAPE), tensors=tensors)
        save_artifact(tmp_path / "f.safetensors", art)
        if named is None:
            assert load_artifact(tmp_path / "f.safetensors", expect="fix").tensors["vectors"].shape == (2, 4)
            continue
        with pytest.raises(ArtifactError, match="not a complete fix artifact.*mechfix steer") as exc:
            load_artifact(tmp_path / "f.safetensors", expect="fix")
        assert named in str(exc.value)
