"""Every ```python block of README.md runs as written.

Each block runs on its own (a fresh namespace, as if pasted into a new
interpreter) in a temporary working directory, so the files it writes
(`lsoftmax.keras`, the SavedModel, ...) land there. A block that imports
`tensorflow`, `jax` or `torch` is written for that Keras backend and runs
only under it; the others run under every backend.
"""

import pathlib
import re

import keras
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^( *)```python\n(.*?)^\1```$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, dedented code) of each ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        indent = len(match.group(1))
        code = "\n".join(line[indent:] for line in match.group(2).splitlines())
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, code))
    return blocks


BLOCKS = python_blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


def test_readme_keeps_the_install_commands():
    text = README.read_text(encoding="utf-8")
    assert '```bash\npip install -e ".[test]"\npytest\n```' in text
    assert 'pip install -e ".[jax]"\nKERAS_BACKEND=jax pytest\n' in text
    assert 'pip install -e ".[torch]"\nKERAS_BACKEND=torch pytest\n' in text


_BACKEND_IMPORT = re.compile(r"^import (tensorflow|jax|torch)\b", re.MULTILINE)


def block_backend(code: str) -> str | None:
    """The backend a block is written for, from its imports, or None."""
    match = _BACKEND_IMPORT.search(code)
    return match.group(1) if match else None


@pytest.mark.parametrize(
    "line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS]
)
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    backend = block_backend(code)
    if backend not in (None, keras.backend.backend()):
        pytest.skip(f"written for the {backend} backend")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
