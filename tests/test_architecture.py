"""The house rules that keep the architecture readable: layers, safe checkpoint loading, no skipped modules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "msnet"


def test_import_layers_hold() -> None:
    """import-linter: no cycles, no upward imports (contracts in pyproject.toml)."""
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                         cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_checkpoints_load_without_code_and_library_raises_project_errors() -> None:
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        assert "weights_only=False" not in text, f
        assert not re.search(r"^\s*assert\s", text, re.M), f"{f}: library code raises MsnetError, not assert"


def test_tests_never_skip_msnet_modules() -> None:
    for f in (REPO / "tests").glob("*.py"):
        assert "importorskip(\"msnet" not in f.read_text(), f


def _modules() -> list[str]:
    """Every module of the package as a path under src/msnet/ (packages by their folder)."""
    return sorted(str(f.relative_to(SRC)) for f in SRC.rglob("*.py") if f.name not in ("__init__.py", "__main__.py"))


def test_no_module_over_600_lines() -> None:
    long = {m: n for m in _modules() if (n := len((SRC / m).read_text().splitlines())) > 600}
    assert not long, f"split by job: {long}"


def test_readme_module_map_names_every_module() -> None:
    """The README's module map (a table between its 'Module map' heading and the next heading) names every
    module, by its path under src/msnet/ or, inside a folder row, by its file name."""
    text = (REPO / "README.md").read_text()
    start = text.index("**Module map**")
    end = text.find("\n#", start)
    table = text[start : end if end > 0 else len(text)]
    missing = [m for m in _modules() if f"`{m}`" not in table and f"`{Path(m).name}`" not in table]
    assert not missing, f"add to the README module map: {missing}"


def test_most_imports_of_msnet_are_at_module_level() -> None:
    """Imports of msnet's own modules sit at the top of the module that needs them (a reader sees the
    dependencies), except where a cycle or the CLI's instant --help needs them inside a function: at most a
    quarter of them."""
    import ast

    total = local = 0
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msnet") and not node.level:
                total += 1
                local += node.col_offset > 0
    assert local <= total / 4, f"{local} of {total} msnet imports are inside functions"
