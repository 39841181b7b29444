"""Command line: thin typer commands over the library functions, one module per kind of command
(:mod:`msnet.cli.data`, :mod:`msnet.cli.stages`, :mod:`msnet.cli.serving`, :mod:`msnet.cli.bench`),
sharing the app, the error printing and the signal handling of :mod:`msnet.cli.common`.

Heavy modules are imported inside each command so that ``msnet --help`` is
instant. A :class:`msnet.errors.MsnetError` is printed without a traceback and
exits with code 2. SIGTERM (what systemd, Docker and Kubernetes send) ends a
command as cleanly as Ctrl-C: decode workers are stopped, temp files removed,
exit code 143. JSON output never holds a bare NaN (it would not be JSON).
"""

from msnet.cli.common import _json, _kept_after_interrupt, app, main  # noqa: F401 (the package's face)
from msnet.cli import data, stages, serving, bench  # noqa: F401,E402 (each registers its commands, in this order)
