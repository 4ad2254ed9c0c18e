"""Who computes next on this process's cores: the audio a listener is waiting for first.

Two CPU cores run speech synthesis, the language model and Whisper for every
session. When they all run at once each is slower, and the one that matters most,
the next piece of a reply whose listener is about to run out of audio, comes late:
a hole in the bot's voice. So every model call that computes goes through one
:class:`ComputeBudget`, shared like a model:

- Speech synthesis runs one piece at a time (ONNX Runtime already uses both cores),
  the piece whose playback deadline is soonest first: with several sessions, the
  listener whose buffer runs dry first is served first.
- A piece nobody waits for yet (a speculative reply's) gives the synthesizer up
  when a waiting piece would otherwise miss its deadline: it is stopped
  (``abort``), raises :class:`Preempted`, and is made again later.
- While a piece that a listener is waiting for is being made (``urgent``),
  background work waits: the language model between tokens, speculative
  Whisper passes before they start.
- Background work runs on threads of the lowest CPU priority (``background``):
  the kernel gives them only the cycles synthesis leaves. Measured on a 2-core
  AMD EPYC: decoding 64 frames took 1.09 s alone, 2.07 s while llama.cpp generated
  on one thread, and 1.08 s with that thread at the lowest priority (it still made
  18 tokens a second, from the moments ONNX Runtime's threads wait).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# A background caller re-checks its own cancellation this often while it waits.
_POLL_SECS = 0.02
# Niceness of the background threads: the lowest priority there is.
BACKGROUND_NICENESS = 19
# Background calls at once (one per session generating; the model's own lock serializes them).
_BACKGROUND_THREADS = 8


def _lower_priority() -> None:
    """Make the calling thread yield the CPU to everything else (Linux: niceness is per thread)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
        except OSError:
            pass  # the ordering above still holds


class Preempted(Exception):
    """A piece nobody waited for was stopped for one a listener needs: make it again later."""


class ComputeBudget:
    """The process-wide order of compute: urgent speech, then speech, then the rest."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: list[tuple[float, int]] = []  # (deadline, ticket) of speech waiting its turn
        self._tickets = itertools.count()
        self._running: int | None = None
        self._abort_running: Callable[[], None] | None = None  # set while a preemptible piece runs
        self._preempted = False
        self._urgent = 0  # urgent speech waiting or running
        self.yielded_secs = 0.0  # background time spent waiting, for the bench
        self._background = ThreadPoolExecutor(
            max_workers=_BACKGROUND_THREADS, thread_name_prefix="voxbot-background", initializer=_lower_priority
        )

    async def background(self, fn: Callable[[], T]) -> T:
        """Run a blocking model call nobody is waiting to hear, at the lowest CPU priority."""
        return await asyncio.get_running_loop().run_in_executor(self._background, fn)

    @property
    def speech_urgent(self) -> bool:
        with self._cond:
            return self._urgent > 0

    @contextmanager
    def speech(
        self, *, deadline: float, urgent: bool, cost: float = 0.0, abort: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold the synthesizer for one piece of speech (blocking: call it from a worker thread).

        Args:
            deadline: ``time.monotonic()`` at which the listener runs out of audio
                without this piece; the soonest goes first. ``inf``: nobody waits for it.
            urgent: The listener's buffer is short: background work waits meanwhile.
            cost: Predicted seconds the piece takes: once it can no longer wait and
                still meet its deadline, it stops a preemptible piece that holds the synthesizer.
            abort: Stops this piece's model call. With an ``inf`` deadline it makes the
                piece preemptible.

        Raises:
            Preempted: This piece was stopped for a piece with a deadline.
        """
        ticket = next(self._tickets)
        with self._cond:
            self._urgent += urgent
            heapq.heappush(self._queue, (deadline, ticket))
            while self._running is not None or self._queue[0][1] != ticket:
                self._cond.wait(timeout=self._preempt_if_due(deadline - cost))
            heapq.heappop(self._queue)
            self._running = ticket
            self._abort_running = abort if deadline == float("inf") else None
            self._preempted = False
        try:
            yield
        except Exception as error:
            with self._cond:
                preempted = self._preempted
            if preempted:
                raise Preempted() from error
            raise
        finally:
            with self._cond:
                self._running = self._abort_running = None
                self._urgent -= urgent
                self._cond.notify_all()

    def _preempt_if_due(self, start_by: float) -> float | None:
        """Stop the running preemptible piece once a waiting piece must start; else how long to wait."""
        if self._abort_running is None or start_by == float("inf"):
            return None
        left = start_by - time.monotonic()
        if left > 0:
            return left
        self._abort_running()
        self._abort_running, self._preempted = None, True
        return None

    def yield_to_speech(self, *, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait while speech a listener is waiting for is being made (blocking).

        Background work calls this between steps (the language model before each
        token, Whisper before a pass nobody waits for yet).
        """
        if not self._urgent:  # racy read on purpose: the common case takes no lock
            return
        start = time.monotonic()
        with self._cond:
            while self._urgent and not cancelled():
                self._cond.wait(timeout=_POLL_SECS)
            self.yielded_secs += time.monotonic() - start
