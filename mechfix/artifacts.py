"""Self-describing artifacts: one ``.safetensors`` file per stage.

Tensors hold numbers; ``__metadata__`` (string to string) holds the kind, the
schema version and a JSON manifest (model identity, resolved recipe,
parameters, library versions, and the sha256 of every input artifact).
Writes are atomic: a temporary file in the target folder, then a rename.

A LoRA fix is a folder instead, a PEFT adapter (``adapter_config.json`` and
``adapter_model.safetensors``); its safetensors file carries the same
metadata, so every function here takes either the file or the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mechfix.errors import ArtifactError, BadInputError
from mechfix.textio import atomic_target, publish_mode
from mechfix.untrusted import visible

SCHEMA_VERSION = 1
KINDS = ("record", "attribution", "fix")
# What to run to make each kind, for error messages.
MAKE_KIND = {
    "record": "mechfix record RECIPE",
    "attribution": "mechfix attribute REC.safetensors",
    "fix": "mechfix steer ATTR.safetensors",
}
_META_KIND = "mechfix.kind"
_META_SCHEMA = "mechfix.schema"
_META_MANIFEST = "mechfix.manifest"
_LIBRARIES = ("mechfix", "torch", "transformers", "nnsight", "safetensors", "numpy")
# The files of an artifact that is a folder (a PEFT adapter).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The file that marks a merged checkpoint mechfix wrote (`export --format hf`), listing the files saved with it.
HF_MARKER = "mechfix_export.json"


@dataclass
class Artifact:
    """An artifact in memory: its kind, manifest and tensors."""

    kind: str
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's numbers."""
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def created_at() -> str:
    """When an artifact is made, for its manifest: ``SOURCE_DATE_EPOCH`` when set, else now (UTC).

    With ``SOURCE_DATE_EPOCH`` fixed, the same inputs, seed and library versions
    give byte-identical artifacts, so a CI job can compare them by hash.

    Raises:
        BadInputError: When ``SOURCE_DATE_EPOCH`` is not a whole number of seconds.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None or not epoch.strip():
        return datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        raise BadInputError(
            f"SOURCE_DATE_EPOCH is '{epoch}'; it must be whole seconds since 1970-01-01 UTC (e.g. $(git log -1 --format=%ct))."
        ) from None


def new_manifest(kind: str, **fields: Any) -> dict[str, Any]:
    """A manifest with the fields every artifact carries, plus ``fields``."""
    return {
        "kind": kind,
        "schema": SCHEMA_VERSION,
        "created": created_at(),
        "libraries": library_versions(),
        **fields,
    }


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(path: str | Path) -> Path:
    """Fail early, before any work, if ``path`` cannot be written.

    Raises:
        BadInputError: When the folder is missing or not writable, or path is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"output '{path}' is a folder; give a file name such as {path / 'out.safetensors'}.")
    return _check_parent(path)


def _check_parent(path: Path) -> Path:
    """``path``, once its folder is known to exist and be writable."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BadInputError(f"cannot write '{path}': the folder '{parent}' does not exist. Create it or choose another --out.")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write '{path}': the folder '{parent}' is not writable. Choose another --out.")
    return path


def _lora_files(folder: Path) -> set[str]:
    """The files of an earlier LoRA fix: its two, when its weights carry mechfix's manifest."""
    try:
        read_header(folder / ADAPTER_WEIGHTS)
    except ArtifactError:  # someone else's adapter (or no adapter): none of it is mechfix's
        return set()
    return {ADAPTER_CONFIG, ADAPTER_WEIGHTS}


def _export_files(folder: Path) -> set[str]:
    """The files of an earlier merged checkpoint: those its marker lists as saved with it, and the marker."""
    from mechfix.textio import load_json, read_text

    try:
        record = load_json(read_text(folder / HF_MARKER, "export record", 2**20))
    except (BadInputError, json.JSONDecodeError):
        return set()
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list):
        return set()
    return {f for f in files if isinstance(f, str) and Path(f).name == f} | {HF_MARKER}


@dataclass(frozen=True)
class FolderKind:
    """A folder mechfix writes and replaces whole, and how to tell the files it wrote in an earlier one.

    Attributes:
        what: What the folder is, for messages.
        suffix: The ending of a folder name to suggest.
        owned: The names of the files in an existing folder that mechfix wrote (empty: none).
    """

    what: str
    suffix: str
    owned: Callable[[Path], set[str]]


FOLDER_KINDS: dict[str, FolderKind] = {
    "lora": FolderKind("a LoRA fix", ".lora", _lora_files),  # also `export --format peft`: the same folder
    "hf": FolderKind("a merged checkpoint", "-fixed", _export_files),
}


def check_writable_dir(path: str | Path, kind: str = "lora") -> Path:
    """Fail early if a folder artifact cannot be written at ``path``.

    The folder may be missing, empty, or an earlier folder of the same kind
    that holds nothing but what mechfix wrote there (it is replaced); a folder
    with any other file in it is refused, naming those files, rather than deleted.

    Args:
        path: The folder.
        kind: A key of :data:`FOLDER_KINDS`.

    Raises:
        BadInputError: When the parent folder is missing or not writable, or ``path`` holds something else.
    """
    path, spec = Path(path), FOLDER_KINDS[kind]
    if path.exists() and not path.is_dir():
        raise BadInputError(f"output '{path}' is a file, but {spec.what} is a folder. Give a folder name such as {path.with_suffix('')}{spec.suffix}.")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        owned = spec.owned(path) if entries else set()
        foreign = [e for e in entries if e not in owned or not (path / e).is_file() or (path / e).is_symlink()]
        if foreign:
            shown = ", ".join(visible(e) for e in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BadInputError(
                f"output folder '{path}' holds files mechfix did not write as {spec.what} ({shown}); mechfix will not "
                "replace the folder, which would delete them. Choose another --out, or move those files away.")
    return _check_parent(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write into; it takes ``path``'s place only if the block succeeds.

    An earlier folder at ``path`` is moved aside first and deleted once the new
    one is in place, so a reader sees either the old folder or the new one.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    old: Path | None = None
    try:
        yield tmp
        publish_mode(tmp, 0o777)
        for f in tmp.iterdir():
            publish_mode(f)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def artifact_metadata(artifact: Artifact) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an artifact: kind, schema and manifest."""
    return {
        "format": "pt",  # what transformers and PEFT expect of a PyTorch safetensors file
        _META_KIND: artifact.kind,
        _META_SCHEMA: str(SCHEMA_VERSION),
        # Unsorted: insertion order keeps conditions as pressure, clean, control.
        _META_MANIFEST: json.dumps(artifact.manifest, allow_nan=False),
    }


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
# Bytes written per slice when streaming a tensor to the file.
_WRITE_SLICE = 64 * 2**20


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file, streaming each tensor in slices, with the header's keys in one fixed order.

    The format is an 8-byte header length, a JSON header (each tensor's dtype,
    shape and byte range; the metadata) padded with spaces to 8 bytes, then the
    tensors' bytes. Writing it here rather than through ``safetensors.torch.save_file``
    keeps memory flat however large the tensors are (activations at every position
    live in disk-backed tensors: :mod:`mechfix.engine.actstore`), and sorted keys make
    the file's bytes depend on its content only.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            flat = tensors[name].detach().reshape(-1)
            step = max(1, _WRITE_SLICE // max(1, flat.element_size()))
            for lo in range(0, flat.numel(), step):
                f.write(flat[lo: lo + step].contiguous().view(torch.uint8).numpy().tobytes())


def artifact_file(path: str | Path) -> Path:
    """The safetensors file of an artifact: the path itself, or an adapter folder's weights file.

    Raises:
        ArtifactError: For a folder that is not an adapter.
    """
    path = Path(path)
    if path.is_dir():
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise ArtifactError(
                f"'{path}' is a folder without {ADAPTER_WEIGHTS}, so it is not a LoRA fix. Give a .safetensors "
                "artifact, or a folder written by `mechfix steer --kind lora`."
            )
        return weights
    return path


def save_artifact(path: str | Path, artifact: Artifact) -> str:
    """Write an artifact atomically and return the file's sha256.

    Args:
        path: Target file; its folder must exist.
        artifact: Kind, manifest and tensors. Tensors are moved to the CPU and
            made contiguous; the manifest must be JSON-serialisable.

    Returns:
        The sha256 of the written file.
    """
    if artifact.kind not in KINDS:
        raise ValueError(f"unknown artifact kind {artifact.kind!r}")
    path = check_writable(path)
    metadata_ = artifact_metadata(artifact)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in artifact.tensors.items()}
    with atomic_target(path) as tmp:
        write_safetensors(tensors, tmp, metadata_)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
    artifact.path, artifact.sha256 = str(path), digest
    return digest


def read_header(path: str | Path) -> tuple[str, dict[str, Any], dict[str, tuple[str, list[int]]]]:
    """Read kind, manifest and tensor table (dtype, shape) without loading tensors.

    Raises:
        ArtifactError: For a missing, corrupt or foreign file, or an unknown schema.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact '{path}' does not exist. Check the path, or make it with `mechfix record`.")
    path = artifact_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            table = {}
            for k in f.keys():
                sl = f.get_slice(k)
                table[k] = (str(sl.get_dtype()), list(sl.get_shape()))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"'{path}' is not a readable safetensors file ({exc}). It may be truncated or corrupt; make it again."
        ) from None
    kind = meta.get(_META_KIND)
    if kind is None:
        raise ArtifactError(
            f"'{path}' is a safetensors file but not a mechfix artifact (no '{_META_KIND}' in its metadata). "
            "Give a file written by mechfix."
        )
    schema = meta.get(_META_SCHEMA)
    if schema != str(SCHEMA_VERSION):
        raise ArtifactError(
            f"'{path}' uses artifact schema {schema}, and this mechfix reads schema {SCHEMA_VERSION}. "
            f"Make it again with this version ({MAKE_KIND.get(kind, 'the stage that made it')}), "
            "or use the mechfix version that wrote it."
        )
    try:
        manifest = json.loads(meta.get(_META_MANIFEST, ""))
    except json.JSONDecodeError:
        raise ArtifactError(f"'{path}' has a corrupt manifest. Make the artifact again.") from None
    return kind, manifest, table


def load_artifact(path: str | Path, expect: str | None = None, skip: tuple[str, ...] = ()) -> Artifact:
    """Load an artifact, checking its kind.

    Args:
        path: The ``.safetensors`` file, or a LoRA fix's folder.
        expect: The kind the caller needs, or None for any.
        skip: Name prefixes of tensors not to read (a recording's activations, when only its scores are needed).

    Raises:
        ArtifactError: For a missing/corrupt file, a wrong kind or schema, a manifest key or tensor
            its kind needs missing or of a shape the manifest does not allow (:mod:`mechfix.schema`), or NaNs.
    """
    kind, manifest, table = read_header(path)
    if expect is not None and kind != expect:
        raise ArtifactError(
            f"'{path}' is a{'n' if kind[0] in 'aeiou' else ''} {kind} artifact, but this command needs "
            f"a{'n' if expect[0] in 'aeiou' else ''} {expect} artifact. "
            f"Make one with `{MAKE_KIND[expect]}`."
        )
    if kind in KINDS:
        from mechfix.schema import check_artifact

        check_artifact(kind, manifest, table, str(path))
    tensors: dict[str, torch.Tensor] = {}
    file = artifact_file(path)
    with safe_open(str(file), framework="pt") as f:
        for k in f.keys():
            if k.startswith(skip):
                continue
            t = f.get_tensor(k)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ArtifactError(
                    f"'{path}' holds non-finite values (NaN or inf) in tensor '{k}'. "
                    "The run that made it went wrong (often fp16 overflow); make it again, e.g. with --dtype float32."
                )
            tensors[k] = t
    return Artifact(kind=kind, manifest=manifest, tensors=tensors, path=str(path), sha256=sha256_file(file))


def model_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """The first identity key on which two models differ, or None for the same model.

    The config hash and weight fingerprint decide; the name may differ (a local
    copy of the same model is the same model). A model on NDIF has no
    fingerprint: its hub id and revision stand in for it.
    """
    keys = ["architecture", "config_hash", "weights_fingerprint"]
    if a.get("weights_fingerprint") is None or b.get("weights_fingerprint") is None:
        keys = ["architecture", "config_hash", "name", "revision"]
    return next((k for k in keys if a.get(k) != b.get(k)), None)


def check_same_model(manifest: Mapping[str, Any], identity: Mapping[str, Any], path: str | Path) -> None:
    """Refuse an artifact made with another model than ``identity`` (see :func:`model_difference`).

    Raises:
        ArtifactError: Naming both models and what to run instead.
    """
    theirs = manifest.get("model", {})
    key = model_difference(theirs, identity)
    if key is not None:
        raise ArtifactError(
            f"'{path}' was made with model '{theirs.get('name')}' ({theirs.get('architecture')}), "
            f"but the model given is '{identity.get('name')}' ({identity.get('architecture')}); "
            f"their {key.replace('_', ' ')}s differ. Pass the recorded model with --model, "
            "or record again with this model."
        )


