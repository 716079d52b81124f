"""Failed-authentication limiter: a token bucket per client address, in memory (one process).

Only failures take tokens, so a client with a right key is never slowed by its own traffic. Once
an address has used its burst, every request from it is refused with 429 and `Retry-After` until a
token is back, the right key included: answering a right key during the block would tell a key
guesser which guess was right."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class FailureLimiter:
    def __init__(self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 10_000):
        self.burst, self.rate = burst, per_minute / 60.0
        self.clock, self.max_addresses = clock, max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again, or None when it may now."""
        with self._lock:
            tokens = self._tokens(address, self.clock())
        return None if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.rate))

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            if len(self._buckets) >= self.max_addresses:  # forget addresses whose bucket is full again
                self._buckets = {a: b for a, b in self._buckets.items() if self._tokens(a, now) < self.burst}
            self._buckets[address] = (max(0.0, self._tokens(address, now) - 1), now)
