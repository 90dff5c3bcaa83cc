"""Where a worker gets its model from, and loading it without running untrusted code.

A :class:`ModelSource` is small and picklable: it travels to every worker, which builds or loads the model
once. Accepted sources:

* a **factory**: an importable ``"package.module:function"`` string or a picklable callable (a module-level
  function, a ``functools.partial``) that returns the model;
* a **model object** (``torch.nn.Module`` / Keras model), pickled to the workers — handy on one machine;
* a **TorchScript** file (``torch.jit.save``), loaded with ``torch.jit.load``;
* a **state_dict** file (``torch.save(model.state_dict(), path)``) plus a factory that builds the architecture:
  loaded with ``torch.load(path, weights_only=True)`` then ``load_state_dict``;
* a **Keras** ``.keras`` file, loaded with ``keras.saving.load_model(path, safe_mode=True)``.

Loading never unpickles arbitrary objects: a full pickled torch model (``torch.save(model)``) is refused by
``weights_only=True``, a ``.keras`` file with a ``Lambda`` layer is refused by ``safe_mode``, and legacy
``.h5`` / SavedModel formats are refused outright. Each refusal is an :class:`~mcu.errors.InputError` that
names the argument and the way to re-save the model. Frameworks are imported only inside the loaders.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Callable

from mcu.errors import InputError

__all__ = ["ModelSource", "describe", "load_model"]

_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_KINDS = ("factory", "instance", "torchscript", "state_dict", "keras")
_LEGACY_KERAS = (".h5", ".hdf5", ".pb")


@dataclass(frozen=True)
class ModelSource:
    """How a worker obtains the model. Build one with :meth:`resolve` (or the constructors below).

    Attributes:
        kind: ``"factory"``, ``"instance"``, ``"torchscript"``, ``"state_dict"`` or ``"keras"``.
        path: the model file (file kinds).
        factory: ``"module:function"`` or a callable (``"factory"`` and ``"state_dict"`` kinds).
        instance: the model object (``"instance"`` kind).
    """

    kind: str
    path: str | None = None
    factory: str | Callable[[], Any] | None = None
    instance: Any = None

    @classmethod
    def resolve(cls, model: Any, factory: Any = None) -> "ModelSource":
        """Interpret the ``model`` (and ``factory``) arguments of :func:`mcu.distributed.predict`.

        Example:
            >>> ModelSource.resolve("mypkg.models:build").kind
            'factory'
            >>> ModelSource.resolve("weights.pt", factory="mypkg.models:build").kind
            'state_dict'
            >>> ModelSource.resolve("classifier.keras").kind
            'keras'
        """
        if isinstance(model, ModelSource):
            return model
        if factory is not None:
            _check_factory(factory, "factory")
        if isinstance(model, (str, os.PathLike)):
            text = os.fspath(model)
            if isinstance(model, str) and _IMPORT_STRING.match(text) and not os.path.exists(text):
                if factory is not None:
                    raise InputError(
                        f"factory: only used with a state_dict file, got model={text!r} (an import string) "
                        f"and factory={factory!r}; pass one of them."
                    )
                return cls("factory", factory=text)
            return cls._from_path(text, factory)
        if _framework_model(model):
            if factory is not None:
                raise InputError(
                    f"factory: only used with a state_dict file, got a model object and factory={factory!r}."
                )
            return cls("instance", instance=model)
        if callable(model):
            if factory is not None:
                raise InputError(
                    f"factory: only used with a state_dict file, got a callable model and factory={factory!r}."
                )
            _check_factory(model, "model")
            return cls("factory", factory=model)
        raise InputError(
            f"model: expected a factory ('module:function' or a picklable callable returning the model), a model "
            f"path (.pt TorchScript, .pt state_dict with factory=, .keras) or a model object, got "
            f"{type(model).__qualname__}."
        )

    @classmethod
    def _from_path(cls, path: str, factory: Any) -> "ModelSource":
        lower = path.lower()
        if os.path.isdir(path):
            raise InputError(
                f"model: {path!r} is a directory (a TensorFlow SavedModel?); expected a file. Save a Keras model "
                "with model.save('model.keras'), a torch model with torch.jit.script(model).save('model.pt')."
            )
        if lower.endswith(_LEGACY_KERAS):
            raise InputError(
                f"model: {path!r} is a legacy Keras/TensorFlow format that can run arbitrary code when loaded; "
                "expected a .keras file: re-save it with model.save('model.keras')."
            )
        if lower.endswith(".keras"):
            if factory is not None:
                raise InputError(f"factory: only used with a torch state_dict file, got a .keras path {path!r}.")
            return cls("keras", path=os.path.abspath(path) if "://" not in path else path)
        path = os.path.abspath(path) if "://" not in path else path
        return cls("state_dict", path=path, factory=factory) if factory is not None else cls("torchscript", path=path)


def _framework_model(obj: Any) -> bool:
    from mcu.backends import detect

    return detect(obj) is not None


def _check_factory(factory: Any, argument: str) -> None:
    if isinstance(factory, str):
        if not _IMPORT_STRING.match(factory):
            raise InputError(f"{argument}: expected 'package.module:function', got {factory!r}.")
        return
    if not callable(factory):
        raise InputError(
            f"{argument}: expected 'package.module:function' or a callable, got {type(factory).__qualname__}."
        )
    try:
        import cloudpickle  # ships with Ray

        cloudpickle.dumps(factory)
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the workers cannot receive it
        raise InputError(
            f"{argument}: the callable {factory!r} cannot be pickled for the workers ({type(exc).__name__}: {exc}); "
            "expected a module-level function or a 'package.module:function' string."
        ) from exc


def _import_factory(spec: str, argument: str) -> Callable[[], Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"{argument}: cannot import module {module_name!r} of {spec!r} ({exc}); it must be importable on every "
            "worker (install it, or ship it with ray.init(runtime_env={'py_modules': [...]}))."
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InputError(
                f"{argument}: module {module_name!r} has no attribute {attribute!r} (from {spec!r})."
            ) from None
    if not callable(target):
        raise InputError(f"{argument}: {spec!r} is not callable; expected a function that returns the model.")
    return target


def _call_factory(factory: Any, argument: str) -> Any:
    build = _import_factory(factory, argument) if isinstance(factory, str) else factory
    model = build()
    if not _framework_model(model):
        raise InputError(
            f"{argument}: the factory {factory!r} returned {type(model).__qualname__}; expected a torch.nn.Module "
            "or a Keras model."
        )
    return model


def load_model(source: ModelSource) -> Any:
    """Build or load the model described by ``source`` (on a worker, or on the driver as a preflight check).

    Raises:
        InputError: the file fails the safe-loading check, or does not hold what its kind promises.
    """
    if source.kind not in _KINDS:
        raise InputError(f"model: unknown source kind {source.kind!r}; expected one of {', '.join(_KINDS)}.")
    if source.kind == "instance":
        return source.instance
    if source.kind == "factory":
        return _call_factory(source.factory, "model")
    _check_exists(source.path)
    if source.kind == "keras":
        return _load_keras(source.path)
    if source.kind == "torchscript":
        return _load_torchscript(source.path)
    return _load_state_dict(source.path, source.factory)


def _check_exists(path: str | None) -> None:
    if path is None or ("://" not in path and not os.path.isfile(path)):
        raise InputError(f"model: expected an existing model file, got {path!r} (not found on this machine).")


def _load_keras(path: str) -> Any:
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        if "safe_mode" in text or "Lambda" in text or "lambda" in text:
            raise InputError(
                f"model: {path!r} contains Python code (e.g. a Lambda layer) that Keras safe_mode refuses to load, "
                "because loading it would run arbitrary code. Replace the Lambda layer by a registered custom layer "
                "(@keras.saving.register_keras_serializable) importable on the workers, or build the model in a "
                "factory ('module:function') and ship the weights separately."
            ) from exc
        raise InputError(f"model: cannot load the Keras file {path!r}: {exc}") from exc


def _torch_load_weights(path: str) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _full_pickle_error(path: str, exc: BaseException) -> InputError:
    return InputError(
        f"model: {path!r} is a pickled torch object (torch.save(model)) that torch.load(weights_only=True) refuses "
        "to load, because unpickling it could run arbitrary code. Re-save it as TorchScript "
        "(torch.jit.script(model).save(path)) or as weights (torch.save(model.state_dict(), path)) and pass "
        f"factory='module:function' that builds the architecture. ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    )


def _load_torchscript(path: str) -> Any:
    import torch

    try:
        return torch.jit.load(path, map_location="cpu")
    except RuntimeError as script_error:
        # Not TorchScript: say what it is instead (a state_dict or a pickled model), without unpickling code.
        try:
            content = _torch_load_weights(path)
        except pickle.UnpicklingError as exc:
            raise _full_pickle_error(path, exc) from exc
        except Exception as exc:  # noqa: BLE001 - neither format
            raise InputError(
                f"model: {path!r} is neither a TorchScript file nor a torch weights file ({script_error}); expected "
                "torch.jit.script(model).save(path), or torch.save(model.state_dict(), path) with factory=."
            ) from exc
        if isinstance(content, dict):
            raise InputError(
                f"model: {path!r} holds a state_dict (weights only), not a TorchScript program; pass "
                "factory='module:function' (or a callable) that builds the architecture to load the weights into."
            ) from script_error
        raise InputError(
            f"model: {path!r} holds a {type(content).__qualname__}, not TorchScript; expected "
            "torch.jit.script(model).save(path)."
        ) from script_error


def _load_state_dict(path: str, factory: Any) -> Any:
    try:
        state = _torch_load_weights(path)
    except pickle.UnpicklingError as exc:
        raise _full_pickle_error(path, exc) from exc
    except RuntimeError as exc:
        raise InputError(
            f"model: cannot read {path!r} as torch weights ({exc}); expected torch.save(model.state_dict(), path)."
        ) from exc
    if not isinstance(state, dict):
        raise InputError(
            f"model: {path!r} holds a {type(state).__qualname__}; expected a state_dict "
            "(torch.save(model.state_dict(), path))."
        )
    model = _call_factory(factory, "factory")
    if not hasattr(model, "load_state_dict"):
        raise InputError(f"factory: {factory!r} returned {type(model).__qualname__}, which has no load_state_dict.")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise InputError(
            f"model: the weights in {path!r} do not fit the architecture built by factory {factory!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval() if hasattr(model, "eval") else model


def describe(source: ModelSource) -> str:
    """A short human-readable description (for reports and error messages)."""
    if source.kind == "instance":
        return f"model object {type(source.instance).__qualname__}"
    if source.kind == "factory":
        return f"factory {source.factory!r}"
    extra = f" + factory {source.factory!r}" if source.kind == "state_dict" else ""
    return f"{source.kind} {source.path!r}{extra}"
