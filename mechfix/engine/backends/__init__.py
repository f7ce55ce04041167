"""The backends that run mechfix's passes, chosen when a model is loaded.

:data:`BACKENDS` maps each ``--backend`` name to its implementation of
:class:`~mechfix.engine.backends.base.Backend`; a model carries the name of its
own (``LoadedModel.backend``), and :func:`backend_of` looks it up. Code outside
this package calls the backend's methods and never compares its name.
"""

from __future__ import annotations

from mechfix.engine.backends.base import Backend
from mechfix.engine.backends.hooks import HooksBackend
from mechfix.engine.backends.nnsight import NnsightBackend
from mechfix.errors import BadInputError
from mechfix.models import LoadedModel

BACKENDS: dict[str, Backend] = {b.name: b for b in (HooksBackend(), NnsightBackend())}
# The one backend a model on NDIF can run on: its weights are not here to hook.
REMOTE_BACKEND = "nnsight"


def check_backend(backend: str | None, remote: bool) -> None:
    """Refuse an unknown backend, or one that cannot run a model on NDIF (None: the default, always fine).

    Raises:
        BadInputError: Naming the backends, or the one a remote model needs.
    """
    if backend is not None and backend not in BACKENDS:
        raise BadInputError(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'.")
    if remote and backend not in (None, REMOTE_BACKEND):
        raise BadInputError(f"--remote runs through nnsight traces: use --backend {REMOTE_BACKEND} (or leave --backend out).")


def use_backend(lm: LoadedModel, backend: str | None = None) -> LoadedModel:
    """Run the model's passes with ``backend`` (a name in :data:`BACKENDS`; None: the model's default); returns ``lm``.

    Raises:
        BadInputError: For an unknown backend, or one that cannot run a remote model.
    """
    name = backend or (REMOTE_BACKEND if lm.remote else lm.backend)
    check_backend(name, lm.remote)
    lm.backend = name
    BACKENDS[name].attach(lm)
    return lm


def backend_of(lm: LoadedModel) -> Backend:
    """The backend that runs ``lm``'s passes."""
    return BACKENDS[lm.backend]


def simulate_remote(lm: LoadedModel) -> LoadedModel:
    """Run ``lm`` as ``--remote`` runs a model on NDIF, but here; returns ``lm``.

    Every trace is serialized exactly as for NDIF (mechfix's own code by value),
    deserialized with local modules hidden, and run on this model (nnsight's
    ``remote="local"``). As on NDIF, a fix's edits travel inside the traces and
    each tail reruns its prompt. The offline test of the ``--remote`` path.
    """
    use_backend(lm, REMOTE_BACKEND)
    lm.remote, lm.trace_prefixes, lm.edits_in_traces = "local", False, True
    return lm
