"""Whether the process can take one more conversation: by what it measures, not by a count.

Measured on a 2-core CPU: one caller was answered in about 3.4 s, two at once in 5.5-8.3 s,
four in 9-15 s, while ``server.max_sessions`` let eight in. How many sessions a machine
serves well depends on the machine (Kokoro has run from 0.16x to 1.5x real time on
machines with the same name) and on what the sessions do, so the server watches the
sessions it has: when their replies come late or its event loop falls behind, a newcomer
is refused with a reason, whatever the count.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from bot.tracing import TurnTrace, percentile

# The turns that say how the sessions are served now.
_WINDOW_SECS = 120.0
_MIN_TURNS = 2
# How often the event loop's lag is sampled, and for how long a lag is remembered.
_LAG_SAMPLE_SECS = 0.1
_LAG_MEMORY_SECS = 10.0


class Admission:
    """Refuses a new session while the open ones are served late."""

    def __init__(self, *, max_voice_to_voice_ms: float | None, max_loop_lag_ms: float):
        """Initialize the gate.

        Args:
            max_voice_to_voice_ms: Refuse while the recent turns' voice-to-voice p95 is above
                this (None: never for latency).
            max_loop_lag_ms: Refuse while the event loop has recently run this late.
        """
        self._max_v2v_ms = max_voice_to_voice_ms
        self._max_lag_ms = max_loop_lag_ms
        self._turns: deque[tuple[float, float]] = deque()  # (when, voice-to-voice ms)
        self._lags: deque[tuple[float, float]] = deque()  # (when, ms late)

    def record(self, turn: TurnTrace) -> None:
        if turn.voice_to_voice_ms is not None:
            self._turns.append((time.monotonic(), turn.voice_to_voice_ms))

    async def watch_loop(self) -> None:
        """Sample how late the event loop wakes up (run as a task for the server's life)."""
        while True:
            began = time.monotonic()
            await asyncio.sleep(_LAG_SAMPLE_SECS)
            late = (time.monotonic() - began - _LAG_SAMPLE_SECS) * 1000
            if late > self._max_lag_ms / 2:
                self._lags.append((time.monotonic(), late))

    def refusal(self, *, active: int) -> str | None:
        """Why a new session would be served badly now; None to admit it. The first one always is."""
        if active == 0:
            return None
        now = time.monotonic()
        for recent, memory in ((self._turns, _WINDOW_SECS), (self._lags, _LAG_MEMORY_SECS)):
            while recent and recent[0][0] < now - memory:
                recent.popleft()
        lag = max((ms for _, ms in self._lags), default=0.0)
        if lag > self._max_lag_ms:
            return f"server is busy (its event loop ran {lag:.0f} ms late); retry later"
        v2v = [ms for _, ms in self._turns]
        if self._max_v2v_ms is not None and len(v2v) >= _MIN_TURNS:
            p95 = percentile(v2v, 95)
            if p95 > self._max_v2v_ms:
                return (
                    f"server is busy: its {active} session(s) are answered in {p95 / 1000:.1f} s (p95), "
                    f"over {self._max_v2v_ms / 1000:.1f} s; retry later"
                )
        return None
