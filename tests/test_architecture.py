"""The shape of the code: no reach into another package's private names; the import contracts hold.

The layers and the framework rule are checked by ``lint-imports`` (configuration in pyproject.toml, run by
``.ci/run``); this test covers what import-linter does not: a private *name* (``from mcu.metrics.calibration
import _helper``) imported across packages. Within one package (``mcu.metrics.streaming`` using
``mcu.metrics.classification._summary``) private names are shared freely; the root's private modules
(``mcu._seeds``) are shared by the whole of mcu. Module names in strings (``importlib.import_module("mcu.x._y")``,
``"module:attribute"`` registries) count as imports.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MCU = ROOT / "mcu"


def _package(module: str) -> str:
    """The top-level package of a dotted module name under mcu (``mcu.active.query`` -> ``active``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _private_parts(module: str) -> list[str]:
    """The private components of ``module`` below its top-level package."""
    return [p for p in module.split(".")[2:] if p.startswith("_") and not p.startswith("__")]


#: a whole string naming an mcu module, optionally with ``:attribute`` (what import_module and registries take)
_MODULE_STRING = re.compile(r"mcu(\.\w+)+(:\w+)?")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _root_private_module(name: str) -> bool:
    """Whether ``mcu.<name>`` is one of the root's private modules (``_seeds``), shared by the whole of mcu."""
    return _private(name) and ((MCU / f"{name}.py").is_file() or (MCU / name / "__init__.py").is_file())


def cross_package_private_imports(source: str, module: str) -> list[str]:
    """``"line: import"`` for each private name or module of another package that ``source`` imports."""
    own = _package(module)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "mcu":
            if node.module == "mcu":
                private = [a.name for a in node.names if _private(a.name) and not _root_private_module(a.name)]
            elif _package(node.module) == own:
                continue
            else:
                private = _private_parts(node.module) + [a.name for a in node.names if _private(a.name)]
            if private:
                found.append(f"{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mcu" and _package(alias.name) != own and _private_parts(alias.name):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.fullmatch(node.value):
            name, _, attribute = node.value.partition(":")
            if _package(name) != own and (_private_parts(name) or _private(attribute)):
                found.append(f"{node.lineno}: {node.value!r}")
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_private_reach_across_packages():
    offenders = {}
    for path in sorted(MCU.rglob("*.py")):
        found = cross_package_private_imports(path.read_text(encoding="utf-8"), _module_name(path))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}, "import a public name instead (promote the helper in its package):\n" + "\n".join(
        f"{path}: {lines}" for path, lines in offenders.items()
    )


def test_the_scan_finds_what_it_should():
    assert cross_package_private_imports("from mcu.metrics.calibration import _scores_1d, aurc", "mcu.triage")
    assert cross_package_private_imports("def f():\n    from mcu.core.predict import _x\n", "mcu.distributed.a")
    assert cross_package_private_imports("from mcu.metrics._validation import log_base", "mcu.core.scoring")
    assert cross_package_private_imports("from mcu.backends.torch.masks import _reserve", "mcu.strategies.auto")
    assert cross_package_private_imports("import mcu.backends.torch._x", "mcu.strategies.auto")
    assert cross_package_private_imports("from mcu import _SUBPACKAGES", "mcu.core.engines")
    assert cross_package_private_imports("importlib.import_module('mcu.backends.torch._x')", "mcu.core.info")
    assert cross_package_private_imports("ENGINES = {'ray': 'mcu.distributed.ray_engine:_predict'}", "mcu.core")
    # allowed: the same package, public names, the root's private modules, dunder names
    assert not cross_package_private_imports("from mcu.metrics.classification import _summary", "mcu.metrics.streaming")
    assert not cross_package_private_imports("from mcu.backends.torch.memory import _unreferenced",
                                          "mcu.backends.torch.kernels")
    assert not cross_package_private_imports("from mcu.metrics.calibration import aurc", "mcu.triage")
    assert not cross_package_private_imports("from mcu._seeds import derive_seed", "mcu.core.predict")
    assert not cross_package_private_imports("from mcu import __version__", "mcu.cli")
    assert not cross_package_private_imports("from mcu import _seeds", "mcu.core.predict")
    assert not cross_package_private_imports("REGISTRY = {'torch': 'mcu.backends._torch:TorchBackend'}", "mcu.backends")
    assert not cross_package_private_imports("import_module('mcu.distributed.ray_engine')", "mcu.core.engines")
