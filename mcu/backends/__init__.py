"""Backend registry and model-type detection.

Backends are named by lazy ``"module:factory"`` strings (a class, or a function that makes the backend):
importing :mod:`mcu` imports no framework, and a backend's module (which imports its framework at the top) is
loaded only when a call needs it. Detection looks only at ``sys.modules``: if torch was never imported, the
object cannot be a torch module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from typing import Any, Callable

from mcu.config import Choice, configured_backend
from mcu.errors import BackendError, BackendMismatchError, BackendNotInstalledError

__all__ = ["REGISTRY", "detect", "get_backend", "installed_frameworks", "keras_backend", "missing", "resolve"]

#: canonical name -> (implementation, distributions that provide the framework, pip extra)
REGISTRY: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tensorflow": ("mcu.backends.keras:create", ("tensorflow", "tensorflow-cpu", "keras"), "tensorflow"),
    "torch": ("mcu.backends.torch:TorchBackend", ("torch",), "torch"),
}


def _is_keras(obj: Any) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(obj, keras.layers.Layer)


def _is_torch(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


# Order matters: a Keras 3 layer on the torch backend is also a torch.nn.Module.
_DETECTORS: tuple[tuple[str, Callable[[Any], bool]], ...] = (("tensorflow", _is_keras), ("torch", _is_torch))
_type_cache: dict[type, str | None] = {}


def detect(model: Any) -> str | None:
    """The canonical backend name for ``model``'s type, or ``None``; cached per type."""
    kind = type(model)
    if kind not in _type_cache:
        found = next((name for name, test in _DETECTORS if test(model)), None)
        if found is None:
            return None  # do not cache a miss: the framework may be imported later
        _type_cache[kind] = found
    return _type_cache[kind]


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def installed_frameworks() -> dict[str, str | None]:
    """Installed version of each framework (``None`` when absent), read from metadata without importing it."""
    versions = {}
    for name, (_, dists, _) in REGISTRY.items():
        version = None
        if name in ("tensorflow", "torch") and not _found(name):
            dists = ()  # metadata of a removed or hidden package; for tensorflow, Keras alone is not TensorFlow
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        versions[name] = version
    return versions


def keras_backend() -> tuple[str, str] | None:
    """The framework Keras 3 runs on (``"tensorflow"``, ``"jax"``, ``"torch"``) and why, resolved as Keras does
    (``KERAS_BACKEND``, then the ``backend`` of ``$KERAS_HOME/keras.json`` or ``~/.keras/keras.json``, then
    TensorFlow) without importing Keras; the running Keras' answer once it is imported. None when Keras is not
    installed. The ``tensorflow`` backend of mcu handles Keras models whichever framework Keras runs on (only
    Keras on TensorFlow needs TensorFlow)."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend(), "Keras is imported in this process"
    if importlib.util.find_spec("keras") is None:
        return None
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    path = os.path.join(os.path.expanduser(home), "keras.json")
    try:
        with open(path) as fh:
            configured = json.load(fh).get("backend")
    except (OSError, ValueError, AttributeError):
        configured = None
    if configured:
        return str(configured), path
    return "tensorflow", "Keras' default"


def missing(name: str) -> str | None:
    """Why backend ``name`` (torch or tensorflow) cannot run in this environment, with the fix, or None when it
    can (or for another name); checked without importing a framework. The Keras backend (``tensorflow``) needs
    Keras and the framework Keras runs on (:func:`keras_backend`): TensorFlow, JAX or PyTorch."""
    if name == "tensorflow":
        on = keras_backend()
        if on is None:
            return ('Keras is not installed: pip install "mcu[tensorflow]" (or "mcu[keras]" for Keras on JAX or '
                    "PyTorch)")
        framework, why = on
        if framework in ("jax", "torch") and not _found(framework):
            fix = '"mcu[keras]" "jax[cpu]"' if framework == "jax" else '"mcu[keras,torch]"'
            return f"Keras runs on {framework} ({why}) but {framework} is not installed: pip install {fix}"
        if framework == "tensorflow" and not _found("tensorflow"):
            return (f'Keras runs on tensorflow ({why}) but TensorFlow is not installed: pip install "mcu[tensorflow]" '
                    "(or set KERAS_BACKEND=jax or torch)")
        return None
    if name == "torch" and not _found("torch"):
        return 'torch is not installed: pip install "mcu[torch]"'
    return None


_instances: dict[str, Any] = {}


def get_backend(name: str) -> Any:
    """The backend object for a canonical name, importing its framework now."""
    if name not in REGISTRY:
        raise BackendError(f"backend: unknown backend {name!r}; expected one of {sorted(REGISTRY)}.")
    if name not in _instances:
        target, _, extra = REGISTRY[name]
        module_name, class_name = target.split(":")
        try:  # the factory may import the framework too (the Keras package picks its class by Keras' framework)
            backend = getattr(importlib.import_module(module_name), class_name)()
        except ImportError as exc:
            problem = missing(name)
            raise BackendNotInstalledError(
                f"backend {name!r} needs a framework that is not installed ({exc}); "
                + (problem or f'install it with: pip install "mcu[{extra}]"')
            ) from exc
        _instances[name] = backend
    return _instances[name]


def resolve(model: Any, backend: str | None = None) -> tuple[Any, Choice]:
    """Pick the backend for ``model``: configuration first, then detection; check that they agree."""
    choice = configured_backend(backend)
    detected = detect(model)
    if choice is None:
        if detected is None:
            raise BackendError(
                f"model: cannot tell which framework {type(model).__module__}.{type(model).__qualname__} "
                "belongs to; expected a torch.nn.Module or a keras Model/Layer (pass backend= explicitly)."
            )
        choice = Choice(detected, f"detected from the model type {type(model).__qualname__}")
    impl = get_backend(choice.name)
    if detected != choice.name and not impl.is_model(model):
        owner = f", which belongs to backend {detected!r}" if detected else ""
        fix = f"pass backend={detected!r} or change the configuration" if detected else "pass a model of that framework"
        raise BackendMismatchError(
            f"backend: {choice.name!r} was selected ({choice.reason}) but the model is a "
            f"{type(model).__module__}.{type(model).__qualname__}{owner}; {fix}."
        )
    return impl, choice
