"""Admission with Retry-After: at most ``limit`` requests under way at once, and the next one refused.

A place is held from before a request's body is read until its answer. A request that finds none free is
refused at once, never queued, with a Retry-After from how long requests have been taking. The batcher
(/classify, /embed, /v2 infer) and the explain threads (/explain) each have one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

from .metrics import Counter


class Admission:
    """``limit`` places; ``refused(retry_after)`` is the exception raised when none is free."""

    def __init__(
        self,
        limit: int,
        *,
        rejected: Counter,
        refused: Callable[[int], Exception],
        seconds_per_request: float,
        served_at_once: int = 1,
    ):
        self.limit = limit
        self.under_way = 0  # requests between hold() and their answer
        self.rejected, self.refused = rejected, refused
        # A running estimate of the time one request takes; ``served_at_once`` requests progress side by side.
        self.seconds_per_request = seconds_per_request
        self.served_at_once = served_at_once

    @contextlib.contextmanager
    def hold(self):
        """One place, from now until the request is answered; none free: ``refused(retry_after)``."""
        if self.under_way >= self.limit:
            self.rejected.inc()
            raise self.refused(self.retry_after())
        self.under_way += 1
        try:
            yield
        finally:
            self.under_way -= 1

    def retry_after(self) -> int:
        """Whole seconds until the requests under way are likely answered; at least 1."""
        return max(1, math.ceil(self.seconds_per_request * self.under_way / self.served_at_once))

    def observe(self, seconds_per_request: float) -> None:
        """Fold one measured time into the estimate; recent requests weigh most."""
        self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * seconds_per_request
