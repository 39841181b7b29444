"""One retry policy for everything that talks to another machine: waits that double after every failed
try, up to a ceiling. DICOMweb requests (:func:`msnet.io.dicomweb.retrying`, a few tries within one call)
and the listener's outbox (:mod:`msnet.service.listener`, tries spread over hours) both wait as it says.

>>> b = Backoff(first_s=30.0, max_s=900.0)
>>> [b.delay(n) for n in (1, 2, 3, 6, 7)]
[30.0, 60.0, 120.0, 900.0, 900.0]
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off: ``first_s`` after the first failure, ``factor`` times longer after each
    further one, never more than ``max_s``."""

    first_s: float = 1.0
    max_s: float = float("inf")
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed tries (1 = the first)."""
        return float(min(self.max_s, self.first_s * self.factor ** max(int(failures) - 1, 0)))
