"""Rewrite README.md's demo tables from a `msnet demo` output folder (never edit them by hand).

    msnet demo msnet-demo && python3 docs/demo_table.py msnet-demo

Between ``<!-- demo-table:begin -->`` and ``<!-- demo-table:end -->`` goes ``OUT/table.md`` (the
headline table ``msnet demo`` prints, as Markdown) with a line naming the run (patients, threads,
seconds end to end); between ``<!-- demo-partial:begin -->`` and ``<!-- demo-partial:end -->`` goes
``OUT/run/evaluate/partial.md`` (accuracy on partial scans). Nothing else in the README changes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKERS = ("demo-table", "demo-partial")


def _block(name: str, body: str) -> str:
    return f"<!-- {name}:begin -->\n{body.strip()}\n<!-- {name}:end -->"


def _replace(text: str, name: str, body: str, readme: Path) -> str:
    pattern = re.compile(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->", re.S)
    if len(pattern.findall(text)) != 1:
        sys.exit(f"{readme}: needs exactly one <!-- {name}:begin --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda _: _block(name, body), text)


def demo_blocks(out: Path) -> dict[str, str]:
    """The README blocks of one demo run: its headline table (+ a line naming the run) and its
    partial-scan table."""
    files = {"table": out / "table.md", "metrics": out / "metrics.json",
             "partial": out / "run" / "evaluate" / "partial.md"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        sys.exit(f"{out}: not a finished `msnet demo` output folder (missing {', '.join(missing)}). "
                 "Fix: run `msnet demo OUT` first and pass OUT")
    metrics = json.loads(files["metrics"].read_text())
    run = f"*This table: {metrics['n']} test patients; {metrics['elapsed_s']:.0f} s end to end on the run that made it.*"
    return {"demo-table": files["table"].read_text().strip() + "\n\n" + run,
            "demo-partial": files["partial"].read_text().strip()}


def update(readme: Path, out: Path) -> bool:
    """Rewrite ``readme``'s demo blocks from ``out``; True when the file changed."""
    text = readme.read_text()
    new = text
    for name, body in demo_blocks(out).items():
        new = _replace(new, name, body, readme)
    if new != text:
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    return new != text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the folder `msnet demo OUT` wrote")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md", help="the README to rewrite")
    args = ap.parse_args()
    changed = update(args.readme, args.out)
    print(f"{args.readme}: demo tables {'rewritten' if changed else 'already up to date'} from {args.out}")


if __name__ == "__main__":
    main()
