"""The README's quickstarts run as written (each ```python block, in a fresh namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_quickstarts():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = BLOCKS[index]
    from tests.conftest import require_backend

    for name in ("torch", "tensorflow"):
        if f"import {name}" in code or (name == "tensorflow" and "import keras" in code):
            require_backend(name)
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
