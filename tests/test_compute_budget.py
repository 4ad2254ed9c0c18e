"""The process-wide compute order: soonest-needed speech first, background work waits for urgent speech."""

from __future__ import annotations

import threading
import time

import pytest

from processors.compute_budget import ComputeBudget, Preempted


def _in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_speech_runs_one_at_a_time_soonest_deadline_first():
    budget = ComputeBudget()
    order: list[str] = []
    holding = threading.Event()
    release = threading.Event()

    def first():
        with budget.speech(deadline=0.0, urgent=False):
            holding.set()
            release.wait(5)
            order.append("first")

    def job(name: str, deadline: float):
        def run():
            with budget.speech(deadline=deadline, urgent=False):
                order.append(name)

        return run

    threads = [_in_thread(first)]
    assert holding.wait(5)
    # Queued while the synthesizer is busy: the later deadline arrives first, runs last.
    threads.append(_in_thread(job("late", 20.0)))
    time.sleep(0.05)
    threads.append(_in_thread(job("soon", 10.0)))
    time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join(5)
    assert order == ["first", "soon", "late"]


class _Interruptible:
    """A model call that runs until it is done or told to stop, as ONNX Runtime's ``terminate`` does."""

    def __init__(self, secs: float):
        self.secs = secs
        self.started = threading.Event()
        self.stop = threading.Event()

    def __call__(self) -> None:
        self.started.set()
        if self.stop.wait(self.secs):
            raise RuntimeError("Exiting due to terminate flag being set to true.")


def _speculative(budget: ComputeBudget, call: _Interruptible, outcome: list[str]) -> threading.Thread:
    def run():
        try:
            with budget.speech(deadline=float("inf"), urgent=False, abort=call.stop.set):
                call()
            outcome.append("done")
        except Preempted:
            outcome.append("preempted")

    return _in_thread(run)


def test_a_piece_nobody_waits_for_gives_way_to_one_that_would_miss_its_deadline():
    budget = ComputeBudget()
    call, outcome = _Interruptible(5.0), []
    speculative = _speculative(budget, call, outcome)
    assert call.started.wait(5)
    start = time.monotonic()
    # Due in 0.3 s, 0.2 s of work: it can wait 0.1 s, no longer.
    with budget.speech(deadline=start + 0.3, urgent=False, cost=0.2):
        waited = time.monotonic() - start
    speculative.join(5)
    assert outcome == ["preempted"]
    assert 0.05 < waited < 0.5


def test_a_piece_that_can_wait_lets_the_speculative_piece_finish():
    budget = ComputeBudget()
    call, outcome = _Interruptible(0.2), []
    speculative = _speculative(budget, call, outcome)
    assert call.started.wait(5)
    with budget.speech(deadline=time.monotonic() + 5.0, urgent=False, cost=0.2):
        pass
    speculative.join(5)
    assert outcome == ["done"]


def test_a_failure_of_a_piece_not_preempted_is_its_own():
    budget = ComputeBudget()
    with pytest.raises(ValueError):
        with budget.speech(deadline=float("inf"), urgent=False, abort=lambda: None):
            raise ValueError("bad text")


def test_background_work_waits_while_urgent_speech_runs():
    budget = ComputeBudget()
    speaking = threading.Event()
    done_speaking = threading.Event()
    events: list[str] = []

    def speech():
        with budget.speech(deadline=0.0, urgent=True):
            speaking.set()
            time.sleep(0.3)
            events.append("speech done")
        done_speaking.set()

    _in_thread(speech)
    assert speaking.wait(5)
    assert budget.speech_urgent
    start = time.monotonic()
    budget.yield_to_speech()
    events.append("background ran")
    assert events == ["speech done", "background ran"]
    assert time.monotonic() - start >= 0.2
    assert budget.yielded_secs >= 0.2


def test_background_work_does_not_wait_for_speech_that_is_not_urgent():
    budget = ComputeBudget()
    with budget.speech(deadline=0.0, urgent=False):
        start = time.monotonic()
        budget.yield_to_speech()
        assert time.monotonic() - start < 0.05
    assert budget.yielded_secs == 0.0


def test_a_cancelled_background_caller_stops_waiting():
    budget = ComputeBudget()
    cancelled = threading.Event()
    with budget.speech(deadline=0.0, urgent=True):
        threading.Timer(0.1, cancelled.set).start()
        start = time.monotonic()
        budget.yield_to_speech(cancelled=cancelled.is_set)
        assert 0.05 < time.monotonic() - start < 1.0


async def test_background_work_runs_at_the_lowest_cpu_priority():
    """The language model gets only the cycles synthesis leaves: the kernel, not a poll, enforces it."""
    import os
    import sys

    budget = ComputeBudget()
    niceness = await budget.background(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    if sys.platform.startswith("linux"):
        assert niceness == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == os.getpriority(os.PRIO_PROCESS, 0)
