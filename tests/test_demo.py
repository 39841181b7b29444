"""`msnet demo` is reproducible: a reduced demo, run twice in fresh folders and fresh interpreters that
differ in hash seed and in the thread count the environment asks for, gives the same tables and numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from msnet.errors import MsnetError

REDUCED = ("n_patients=15, size=64, slices=(8, 12), config='tiny', "
           "overrides=['train.aggregators=[msnet,mean,max,mil,vote]', 'finetune.epochs=1', 'train.epochs=2']")
"""Every stage and all five aggregators, on 15 patients of 8-12 slices at 64 px (seconds)."""


def _demo(out: Path, hash_seed: str, omp_threads: str | None) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONHASHSEED": hash_seed}
    env.pop("OMP_NUM_THREADS", None)
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = omp_threads
    code = f"from msnet.stages.run import run_demo\nrun_demo({str(out)!r}, {REDUCED})"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=out.parent, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def _outputs(out: Path) -> dict[str, bytes]:
    """Everything a run's numbers live in: tables, metrics (less the wall-clock time), every aggregator's
    predictions and history, the fine-tuning history and every study's features."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("elapsed_s")
    files = {"metrics": json.dumps(metrics, sort_keys=True).encode()}
    run = out / "run"
    for p in [out / "table.txt", out / "table.md", run / "finetune" / "history.csv",
              *sorted(run.glob("train/*/predictions.csv")), *sorted(run.glob("train/*/history.csv")),
              *sorted(run.glob("features/*/*.npy"))]:
        files[str(p.relative_to(out))] = p.read_bytes()
    return files


def test_demo_gives_the_same_tables_on_every_run(tmp_path):
    _demo(tmp_path / "a", hash_seed="1", omp_threads="1")
    _demo(tmp_path / "b", hash_seed="2", omp_threads=None)
    a, b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert sum(k.endswith("predictions.csv") for k in a) == 5 and sum(k.endswith(".npy") for k in a) == 15
    assert [k for k in a if a[k] != b[k]] == []
    table = (tmp_path / "a" / "table.md").read_text().splitlines()
    names = [row.split(" | ")[0] for row in table[2:]]
    assert names[0] == "| msnet" and sorted(names) == ["| max", "| mean", "| mil", "| msnet", "| vote"]
    # README's tables are rewritten from a run's folder, and only they
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    tool = _demo_table_tool()
    assert tool.update(readme, tmp_path / "a")
    before, after = _outside_blocks(REPO / "README.md"), _outside_blocks(readme)
    assert before == after
    blocks = _blocks(readme)
    assert blocks["demo-table"].startswith((tmp_path / "a" / "table.md").read_text().strip())
    assert blocks["demo-partial"] == (tmp_path / "a" / "run" / "evaluate" / "partial.md").read_text().strip()


def _demo_table_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_table", REPO / "docs" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(readme: Path) -> dict[str, str]:
    text = readme.read_text()
    return {name: text.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"\n<!-- {name}:end -->", 1)[0]
            for name in ("demo-table", "demo-partial")}


def _outside_blocks(readme: Path) -> str:
    import re

    return re.sub(r"<!-- (demo-[a-z]+):begin -->.*?<!-- \1:end -->", "", readme.read_text(), flags=re.S)


def test_readme_shows_the_demo_tables_in_the_demo_format():
    """README's demo blocks hold what `msnet demo` writes (a headline row per aggregator, MS-Net first; the
    partial-scan table), and README shows the command that rewrites them."""
    from msnet.stages.run import markdown_table

    text = (REPO / "README.md").read_text()
    for name in ("demo-table", "demo-partial"):
        assert text.count(f"<!-- {name}:begin -->") == text.count(f"<!-- {name}:end -->") == 1
    assert "python3 docs/demo_table.py" in _outside_blocks(REPO / "README.md")
    blocks = _blocks(REPO / "README.md")
    table = blocks["demo-table"].splitlines()
    metrics = {"classes": ["COVID-19", "CAP", "NORMAL"], "by_aggregator": {"msnet": {}}}
    assert table[:2] == markdown_table(metrics).splitlines()[:2]  # the header the demo writes
    rows = [r.split(" | ")[0] for r in table[2:7]]
    assert rows[0] == "| msnet" and sorted(rows) == ["| max", "| mean", "| mil", "| msnet", "| vote"]
    assert all(len(r.split(" | ")) == len(table[0].split(" | ")) for r in table[2:7])
    partial = blocks["demo-partial"].splitlines()
    assert partial[0].startswith("| model | 100% of slices |") and len(partial) == 7


def test_demo_refuses_a_folder_with_a_cohort_made_otherwise(tmp_path):
    from rich.console import Console

    from msnet.stages.run import _demo_cohort

    console = Console(quiet=True)
    _demo_cohort(tmp_path / "data", 3, 32, 0, (4, 5), console)
    _demo_cohort(tmp_path / "data", 3, 32, 0, (4, 5), console)  # same arguments: reused
    with pytest.raises(MsnetError, match="other arguments") as exc:
        _demo_cohort(tmp_path / "data", 3, 32, 1, (4, 5), console)
    assert "--overwrite" in str(exc.value)


def test_reproducible_restores_the_settings():
    import torch

    from msnet.device import reproducible

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with reproducible(3, threads=1):
        a = torch.rand(4)
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    with reproducible(3, threads=1):
        assert torch.equal(torch.rand(4), a)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
