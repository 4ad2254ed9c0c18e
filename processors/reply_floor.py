"""When a reply may first sound: a statement waits out a pause, a question does not.

The turn ends a quarter of a second after the user's speech, so the reply is
thought out early. But people pause inside a sentence ("I'd like to book ...
a table for two"), and on a fast CPU the reply to the fragment would be heard in
that pause. Whisper ends a question with "?": the user is done, the reply goes at
once. Anything else is answered no sooner than ``statement_wait_secs`` after the
speech ended; the reply is made meanwhile and held by the TTS, and if the user
goes on it is dropped unheard. On a slow CPU the reply takes that long anyway, so
the wait costs nothing there: the bot behaves alike on every machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipecat.frames.frames import (
    ControlFrame,
    Frame,
    LLMContextFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


@dataclass
class ReplyNotBeforeFrame(ControlFrame):
    """The reply that follows plays its first audio no sooner than ``at`` (``time.monotonic()``)."""

    at: float = 0.0


def last_user_text(frame: LLMContextFrame) -> str:
    """The text of the context's last user message ("" when it has none)."""
    for message in reversed(frame.context.get_messages()):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
    return ""


class ReplyFloor(FrameProcessor):
    """Sets, for each reply, the earliest moment its first audio may play."""

    def __init__(self, *, statement_wait_secs: float, **kwargs):
        """Initialize the processor.

        Args:
            statement_wait_secs: Seconds from the end of the user's speech before a
                reply to words that do not end in "?" may sound (0: no wait).
            **kwargs: Passed to ``FrameProcessor``.
        """
        super().__init__(**kwargs)
        self._wait = statement_wait_secs
        self._speech_end: float | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._speech_end = None
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_end = time.monotonic() - frame.stop_secs
        elif isinstance(frame, LLMContextFrame) and direction == FrameDirection.DOWNSTREAM and self._wait > 0:
            text = last_user_text(frame).strip()
            if text and not text.endswith("?"):
                # A reply begun before the VAD stopped (a preemptive one): the speech ended by now.
                speech_end = self._speech_end if self._speech_end is not None else time.monotonic()
                await self.push_frame(ReplyNotBeforeFrame(at=speech_end + self._wait))
        await self.push_frame(frame, direction)
