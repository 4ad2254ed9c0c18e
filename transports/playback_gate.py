"""Holding the bot's voice while the user may be taking the floor.

A person who is talked over stops at once and only then works out whether it
was an interruption. Words decide a barge-in, and they take the better part of
a second to be heard; so at the first sign of the user's speech the turn
strategy pauses playback (:class:`PausePlaybackFrame`), then either interrupts
(the held audio is dropped with the rest of the reply) or resumes
(:class:`ResumePlaybackFrame`: a backchannel, a cough, the bot's own echo).

The output transports mix in :class:`PausableOutputMixin`: the audio chunk
about to be written waits at the gate, and the words of the reply wait with it,
so the assistant context still holds only the words that were heard.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from loguru import logger

from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    Frame,
    InterruptionFrame,
    SystemFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.utils.time import nanoseconds_to_seconds


@dataclass
class PausePlaybackFrame(SystemFrame):
    """Hold the bot's audio: the user may be barging in.

    Parameters:
        max_secs: Play on by itself after this long, whatever happens upstream.
    """

    max_secs: float = 2.0


@dataclass
class ResumePlaybackFrame(SystemFrame):
    """Play on: it was not a barge-in.

    Parameters:
        after_secs: Resume this much later, unless a barge-in comes first.
    """

    after_secs: float = 0.0


class PlaybackGate:
    """Whether the output may play, and for how long it has been held in this reply."""

    def __init__(self):
        self._paused_at: float | None = None
        self._deadline = 0.0
        self._epoch = 0  # bumped by an interruption: what waited is dropped
        self._held_secs = 0.0
        self._changed = asyncio.Event()

    @property
    def paused(self) -> bool:
        self._settle()
        return self._paused_at is not None

    @property
    def held_secs(self) -> float:
        """Time this reply has spent paused so far: its words are due that much later."""
        self._settle()
        return self._held_secs + (time.monotonic() - self._paused_at if self._paused_at else 0.0)

    def _settle(self) -> None:
        """Play on once the deadline has passed, counting only the time actually held."""
        if self._paused_at is not None and time.monotonic() >= self._deadline:
            self._held_secs += max(0.0, self._deadline - self._paused_at)
            self._paused_at = None
            logger.debug(f"playback resumed, {self._held_secs:.2f}s held in this reply")

    def pause(self, *, max_secs: float) -> None:
        now = time.monotonic()
        if self._paused_at is None:
            self._paused_at = now
        self._deadline = now + max_secs
        self._changed.set()

    def resume(self, *, after_secs: float = 0.0) -> None:
        if self._paused_at is not None:
            self._deadline = min(self._deadline, time.monotonic() + after_secs)
            self._changed.set()

    @property
    def epoch(self) -> int:
        """Changes with each interruption."""
        return self._epoch

    def interrupt(self) -> None:
        """The reply is cut: what waits is dropped and the next reply starts unheld."""
        self._epoch += 1
        self._paused_at = None
        self._held_secs = 0.0
        self._changed.set()

    def reply_done(self) -> None:
        self._held_secs = 0.0

    async def admit(self) -> bool:
        """Wait while paused; False if the reply was interrupted meanwhile."""
        epoch = self._epoch
        while self.paused and epoch == self._epoch:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self._deadline - time.monotonic())
            except TimeoutError:
                pass
        return epoch == self._epoch


class PausableOutputMixin:
    """For output transports: pause and resume playback on the frames above.

    A subclass awaits ``self.playback_gate.admit()`` first thing in
    ``write_audio_frame`` and writes nothing when it returns False.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.playback_gate = PlaybackGate()
        self._pause_task: asyncio.Task | None = None
        # Replies (TTS contexts) seen since the last interruption, and those it cut: a word or
        # chunk of a cut reply still on its way here is never played, nor kept in the context.
        self._live_contexts: set[str] = set()
        self._cut_contexts: deque[str] = deque(maxlen=16)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, PausePlaybackFrame):
            self.playback_gate.pause(max_secs=frame.max_secs)
            if not self._pause_task or self._pause_task.done():
                await self.on_playback_paused()
                self._pause_task = self.create_task(self._await_resume())
            return
        if isinstance(frame, ResumePlaybackFrame):
            self.playback_gate.resume(after_secs=frame.after_secs)
            return
        if isinstance(frame, InterruptionFrame):
            self.playback_gate.interrupt()
            self._cut_contexts.extend(self._live_contexts)
            self._live_contexts.clear()
        elif isinstance(frame, (TTSAudioRawFrame, TTSTextFrame)) and frame.context_id:
            if frame.context_id in self._cut_contexts:
                return
            self._live_contexts.add(frame.context_id)
        elif isinstance(frame, TTSStoppedFrame):
            self._live_contexts.discard(frame.context_id)
        await super().process_frame(frame, direction)

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        if isinstance(frame, TTSTextFrame) and frame.context_id in self._cut_contexts:
            return
        if isinstance(frame, TTSTextFrame) and frame.pts and direction == FrameDirection.DOWNSTREAM:
            # A word is due when its audio plays: later by however long the reply was held.
            if not await self._word_heard(frame.pts) or not await self.listener_heard(frame):
                return
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.playback_gate.reply_done()
        await super().push_frame(frame, direction)

    async def _word_heard(self, pts: int) -> bool:
        gate = self.playback_gate
        while True:
            if not await gate.admit():
                return False
            late = nanoseconds_to_seconds(self.get_clock().get_time() - pts)
            wait = gate.held_secs - late
            if wait <= 0:
                return True
            await asyncio.sleep(wait)

    async def listener_heard(self, frame: TTSTextFrame) -> bool:
        """Whether the word, whose audio was just sent, was heard (False: leave it out).

        Here it was: the listener's buffer is short. An output whose far end buffers
        more and can say what it played (a carrier's ``mark``) waits to be told.
        """
        return True

    async def _await_resume(self):
        if await self.playback_gate.admit():
            await self.on_playback_resumed()

    async def cleanup(self):
        if self._pause_task:
            await self.cancel_task(self._pause_task)
            self._pause_task = None
        await super().cleanup()

    async def on_playback_paused(self) -> None:
        """Tell the listener's player to hold what it has buffered, where there is one."""

    async def on_playback_resumed(self) -> None:
        """Tell the listener's player to play on (an interruption flushes it instead)."""
