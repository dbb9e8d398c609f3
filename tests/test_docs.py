"""README.md and the pages of docs/: their code runs and their links resolve.

Every ```python block of README.md and of docs/**/*.md runs on its own (a
fresh namespace, as if pasted into a new interpreter) in a temporary working
directory, so the files it writes land there. A block runs under the Keras
backends it claims: those named by a first-line comment such as
`# backends: tensorflow, jax`, else the one whose package it imports
(`import tensorflow`, `jax` or `torch`), else every backend. A block directly
followed by a ```text block must print exactly that text.
"""

import contextlib
import io
import pathlib
import re

import keras
import pytest

import keras_lsoftmax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BACKENDS = ("tensorflow", "jax", "torch")
README_MAX_BYTES = 12 * 1024
INSTALL_BLOCKS = (
    '```bash\npip install -e ".[test]"\npytest\n```',
    '```bash\npip install -e ".[jax]"\nKERAS_BACKEND=jax pytest\n```',
    '```bash\npip install -e ".[torch]"\nKERAS_BACKEND=torch pytest\n```',
)

# A fenced block at any indentation (list items indent theirs), optionally
# followed, after blank lines only, by a ```text block of its output.
_FENCE = re.compile(
    r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```\n"
    r"(?:\s*^(?P=indent)```text\n(?P<output>.*?)^(?P=indent)```$)?",
    re.DOTALL | re.MULTILINE,
)
_BACKENDS_COMMENT = re.compile(r"#\s*backends:\s*(.+)")
_BACKEND_IMPORT = re.compile(
    r"^(?:import|from) (tensorflow|jax|torch)\b", re.MULTILINE
)
# Markdown links and images, [text](target) and ![alt](target).
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[pathlib.Path]:
    return [README, *sorted(DOCS.glob("**/*.md"))]


def _name(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def _dedent(text: str, indent: int) -> str:
    return "\n".join(line[indent:] for line in text.splitlines())


def python_blocks(path: pathlib.Path) -> list[dict]:
    """Each ```python block of `path`: its line, code and expected output."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        indent = len(match.group("indent"))
        output = match.group("output")
        blocks.append(
            {
                "file": _name(path),
                "line": text.count("\n", 0, match.start()) + 2,
                "code": _dedent(match.group("code"), indent),
                "output": None if output is None else _dedent(output, indent),
            }
        )
    return blocks


def block_backends(code: str) -> tuple[str, ...]:
    """The backends a block claims (see the module docstring)."""
    first_line = code.lstrip("\n").split("\n", 1)[0]
    comment = _BACKENDS_COMMENT.fullmatch(first_line.strip())
    if comment:
        names = tuple(name.strip() for name in comment.group(1).split(","))
        unknown = [name for name in names if name not in BACKENDS]
        if unknown:
            raise ValueError(
                f"Unknown backend(s) {unknown} in {first_line!r}; "
                f"expected names from {BACKENDS}."
            )
        return names
    imported = tuple(dict.fromkeys(_BACKEND_IMPORT.findall(code)))
    return imported or BACKENDS


BLOCKS = [block for path in markdown_files() for block in python_blocks(path)]


@pytest.fixture
def restore_keras_state():
    """Puts back the global Keras settings a block may change."""
    policy = keras.mixed_precision.global_policy().name
    floatx = keras.config.floatx()
    distribution = keras.distribution.distribution()
    yield
    keras.mixed_precision.set_global_policy(policy)
    keras.config.set_floatx(floatx)
    keras.distribution.set_distribution(distribution)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "block", BLOCKS, ids=[f"{b['file']}:{b['line']}" for b in BLOCKS]
)
def test_python_block_runs(block, tmp_path, monkeypatch, restore_keras_state):
    backends = block_backends(block["code"])
    backend = keras.backend.backend()
    if backend not in backends:
        pytest.skip(f"written for {', '.join(backends)}; backend is {backend}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(
            compile(block["code"], f"{block['file']}, line {block['line']}", "exec"),
            namespace,
        )
    if block["output"] is not None:
        assert stdout.getvalue().strip() == block["output"].strip()


def test_block_backends():
    assert block_backends("import keras\n") == BACKENDS
    assert block_backends("import numpy as np\nimport jax\n") == ("jax",)
    assert block_backends("from torch import nn\n") == ("torch",)
    assert block_backends(
        "# backends: tensorflow, jax\nimport tensorflow as tf\n"
    ) == ("tensorflow", "jax")
    with pytest.raises(ValueError, match="'tensorflw'"):
        block_backends("# backends: tensorflw\n")


def test_python_blocks_pair_code_with_output(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n"
        "```python\nprint(1)\n```\n\n"
        "```text\n1\n```\n\n"
        "```python\nx = 2\n```\n\n"
        "Text between.\n\n```text\nnot an output\n```\n\n"
        "1. Item:\n\n   ```python\n   print(3)\n   ```\n\n   ```text\n   3\n   ```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(page)
    assert [(b["line"], b["code"], b["output"]) for b in blocks] == [
        (4, "print(1)", "1"),
        (12, "x = 2", None),
        (24, "print(3)", "3"),
    ]


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes"


def test_readme_keeps_the_install_commands_in_order():
    text = README.read_text(encoding="utf-8")
    positions = [text.find(block) for block in INSTALL_BLOCKS]
    assert -1 not in positions, positions
    assert positions == sorted(positions)


def test_ci_runs_the_readme_commands_and_nothing_else():
    # CI checks what a user types: the install blocks' lines, in order, are
    # the only pip and pytest commands of .ci/run.
    readme_lines = [
        line for block in INSTALL_BLOCKS for line in block.splitlines()[1:-1]
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line for line in ci if not line.lstrip().startswith("#")]
    ci_lines = [line for line in commands if re.search(r"\b(pip|pytest)\b", line)]
    assert ci_lines == readme_lines


def test_readme_quick_start_shows_its_output():
    first = python_blocks(README)[0]
    assert "keras_lsoftmax.Sequential" in first["code"]
    assert block_backends(first["code"]) == BACKENDS
    assert first["output"] and "test accuracy" in first["output"]


def _relative_links(path: pathlib.Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    # Code blocks hold code, not links.
    text = re.sub(r"^( *)```.*?^\1```$", "", text, flags=re.DOTALL | re.MULTILINE)
    targets = [target.split("#", 1)[0] for target in _LINK.findall(text)]
    return [
        target
        for target in targets
        if target and not re.match(r"[a-z][a-z0-9+.-]*:", target)
    ]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (README.parent / target).resolve() for target in _relative_links(README)
    }
    pages = {page.resolve() for page in DOCS.glob("*.md")}
    missing = sorted(str(page.relative_to(ROOT)) for page in pages - linked)
    assert not missing


@pytest.mark.parametrize(
    "path", markdown_files(), ids=_name
)
def test_relative_links_point_to_files(path):
    broken = []
    for target in _relative_links(path):
        if not (path.parent / target).resolve().exists():
            broken.append(target)
    assert not broken


def test_api_page_lists_every_public_name():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `(\w+)`$", text, re.MULTILINE))
    public = (
        set(keras_lsoftmax.__all__)
        | set(keras_lsoftmax.schedules.__all__)
        | set(keras_lsoftmax.optimizers.__all__)
    )
    assert documented == public
