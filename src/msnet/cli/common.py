"""What every command shares: the typer app, config overrides, JSON and error printing, signals and the
console entry point."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional
import typer
import typer.core
from msnet.errors import MsnetError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="msnet: Multi-Slice Net diagnosis of chest CT (COVID-19 / CAP / normal).",
)


bench_app = typer.Typer(no_args_is_help=True, help="Performance, as ratios measured in one run.")


app.add_typer(bench_app, name="bench")


log = logging.getLogger("msnet")


CONFIGS = Path(__file__).parents[1] / "configs"


def _shipped_configs() -> str:
    """The shipped configs' names, read from the package's configs folder."""
    return ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))


CONFIG_HELP = f"YAML config, or the name of a shipped one ({_shipped_configs()})."


def _value_label(self, ctx) -> str | None:
    """What --help shows after an option or argument: nothing after a flag (it takes no value); else the
    value it takes, in capitals (PATH, TEXT, INTEGER), once for a repeatable option."""
    if self.metavar is not None:  # an argument's metavar is its name, shown already
        return None if isinstance(self, typer.core.TyperArgument) else self.metavar
    if getattr(self, "is_flag", False):
        return None
    label = self.display_type(ctx).strip("<>")
    label = label.removeprefix("list[").removesuffix("]")
    return {"str": "TEXT", "int": "INTEGER", "float": "NUMBER"}.get(label, label.upper())


def _plain_help() -> None:
    """Typer's help shows type tags such as <bool> and <list[str]>, which make flags look as if they took
    a value; show PATH, TEXT, INTEGER instead, and nothing after a flag."""
    typer.core.TyperOption.display_type_rich = _value_label
    typer.core.TyperArgument.display_type_rich = _value_label


_plain_help()


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, console=_stderr_console())],
        force=True,
    )
    # third-party chatter
    for name in ("PIL", "matplotlib", "pydicom", "timm", "urllib3", "httpx", "dicomweb_client", "pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _overrides(values: Optional[List[str]]) -> list[str]:
    return list(values or [])


def _print_headline(report: Path) -> None:
    """The headline comparison table of an evaluated run (``report``: its evaluate/report.md)."""
    from rich.console import Console

    from msnet.stages.evaluate import format_console_table

    Console().print(format_console_table(json.loads((report.parent / "metrics.json").read_text())))


def _json(obj) -> str:
    """Strict JSON: a NaN or infinite number is an error, never the invalid token ``NaN``."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError as exc:
        raise MsnetError(f"the result holds a NaN or infinite number ({exc})",
                         fix="report this study; no result with NaN is printed") from exc


def _print_error(label: str, text: str) -> None:
    """``label`` in red, then the message as plain text (a message may hold brackets, never markup)."""
    from rich.text import Text

    _stderr_console().print(Text.assemble((label, "red"), text), highlight=False)


_TERMINATED: list[int] = []


def _on_sigterm(signum: int, frame) -> None:
    """SIGTERM as a clean exit: stop decode workers now, then unwind (finally blocks, atexit)."""
    _TERMINATED.append(signum)
    decode = sys.modules.get("msnet.io.decode")
    if decode is not None:
        decode.stop_workers()
    raise SystemExit(128 + signum)


_INTERRUPTED: list[int] = []


_STAGES = {"run", "demo", "extract", "finetune", "train", "evaluate"}


def _on_sigint(signum: int, frame) -> None:
    """Ctrl-C: noted (so that the exit says what was kept), then the usual KeyboardInterrupt."""
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _kept_after_interrupt(argv: list[str]) -> str:
    """What an interrupted command leaves, in words (every file msnet writes is written whole or not at all).

    >>> _kept_after_interrupt(["predict", "b", "s1", "--out", "res"])
    'the run was interrupted (Ctrl-C). Kept: the studies finished before it, in res/predictions.jsonl (.csv, status.csv); run the same command again to do the rest (finished studies are skipped)'
    """
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else ""
    head = "the run was interrupted (Ctrl-C). Kept: "
    if command == "predict":
        out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"), None)
        out = out or next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
        if out:
            return (head + f"the studies finished before it, in {out}/predictions.jsonl (.csv, status.csv); run the "
                    "same command again to do the rest (finished studies are skipped)")
        return head + ("only the results printed above (pass --out DIR to keep results study by study and resume); "
                       "no partial file was written")
    if command in _STAGES:
        return head + ("the files finished before it, in the run folder, each whole (features already extracted are "
                       "reused when the command is run again)")
    return head + "nothing half-written (each file msnet writes is written whole or not at all)"


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        app()
    except MsnetError as exc:
        _print_error("error: ", str(exc))
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as exc:  # click turns Ctrl-C into "Aborted!" and exit 1
        if isinstance(exc, SystemExit) and not _INTERRUPTED:
            raise
        _print_error("interrupted: ", _kept_after_interrupt(sys.argv[1:]))
        sys.exit(130)
    finally:
        decode = sys.modules.get("msnet.io.decode")
        if _TERMINATED and decode is not None:
            decode.shutdown_pool(kill=True, wait_s=5.0)
