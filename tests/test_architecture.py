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
