"""Progress on long work: a rich bar on a terminal, and log lines with rate and ETA everywhere else
(CI logs, nohup, systemd), so a non-interactive run still says how far it is and how long it needs.

>>> list(track([1, 2, 3], "counting", unit="items"))
[1, 2, 3]
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("msnet.progress")


def fmt_seconds(s: float) -> str:
    """Seconds as 1h02m, 3m05s or 12s.

    >>> fmt_seconds(3725), fmt_seconds(185), fmt_seconds(12.4)
    ('1h02m', '3m05s', '12s')
    """
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Rate:
    """Counts done units and says the rate and the time left: ``Rate(total).update(n)`` -> text."""

    def __init__(self, total: int | None, unit: str = "items") -> None:
        self.total, self.unit, self.done, self.t0 = total, unit, 0, time.perf_counter()

    def update(self, n: int = 1) -> str:
        self.done += n
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"{self.done}/{self.total if self.total is not None else '?'} {self.unit}, {rate:.2f} {self.unit}/s"
        if self.total:
            text += f", ETA {fmt_seconds((self.total - self.done) / rate) if rate > 0 else '?'}"
        return text


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "items",
          every_s: float = 10.0, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` showing progress: rich's bar on a terminal, otherwise an INFO log line at
    most every ``every_s`` seconds (and at the end) with count, rate and ETA."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    if enabled and sys.stderr.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, transient=True)
        return
    rate, last = Rate(total, unit), time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        text = rate.update()
        now = time.perf_counter()
        if enabled and (now - last >= every_s or i == total):
            log.info("%s: %s", description, text)
            last = now
