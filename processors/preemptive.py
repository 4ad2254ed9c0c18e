"""Preemptive replies: answer the words heard so far while the end of the turn is being confirmed.

pipecat's eager end-of-turn machinery, fed by our own prediction instead of a cloud
STT's. Whisper transcribes speculatively after a short quiet and reports that
transcript as an :class:`~pipecat.frames.frames.EagerTranscriptionFrame`;
:class:`PreemptiveUserTurnStopStrategy` starts a speculative inference on it (the
user aggregator runs it on a provisional context that the real one never sees).
The language model streams its text on, and the TTS holds the reply: it makes the
first chunk of audio, then waits. When the turn ends with the same words, the held
audio plays at once; when the user goes on, or the final words differ, an
:class:`~pipecat.frames.frames.EagerEndOfTurnCancelFrame` stops the model at its next
token and drops the synthesis, and nothing of it was heard or written to the context.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loguru import logger

from pipecat.frames.frames import (
    ControlFrame,
    EagerEndOfTurnCancelFrame,
    EagerTranscriptionFrame,
    Frame,
    SystemFrame,
    VADUserStartedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult, UserTurnSpeculation
from pipecat.turns.user_stop import NormalizedMatch, SpeechTimeoutUserTurnStopStrategy

_MATCH = NormalizedMatch()


# Whisper ends a sentence it heard finished with one of these; a fragment ("What is the capital of") it leaves open.
_SENTENCE_ENDS = (".", "?", "!", "。", "？", "！")


def _ends_a_sentence(text: str) -> bool:
    """Whether a transcript sounds finished: a pause inside a sentence is no end of turn to answer."""
    text = text.rstrip()
    return text.endswith(_SENTENCE_ENDS) and not text.endswith("...")


def _same_words(early: str, final: str) -> bool:
    """Whether two transcripts say the same, case, punctuation and spacing aside.

    Spacing too: the committed text of a turn in two segments is joined without one.
    """
    return _MATCH.matches(early.replace(" ", ""), final.replace(" ", ""))


@dataclass
class SpeculativeReplyFrame(ControlFrame):
    """The response that follows answers a turn that may not have ended.

    Pushed by a language model that lets a speculative response through to the TTS,
    which holds its audio (pipecat's own gate in the LLM would hold the text, and no
    audio could be made ahead).
    """


@dataclass
class PreemptionWasteFrame(SystemFrame):
    """Work spent on a preemptive reply that was cancelled: for the trace and /metrics."""

    tokens: int = 0
    synthesis_secs: float = 0.0


class PreemptiveUserTurnStopStrategy(SpeechTimeoutUserTurnStopStrategy):
    """Ends turns on the speech timeout, and answers an eager end of turn ahead of it.

    Like pipecat's ``EagerUserTurnStopStrategy``, but the turn end is still decided by
    the VAD and the speech timeout (Whisper has no end-of-turn model of its own). A
    speculation is withdrawn when the user speaks again, when the committed words
    differ (normalized: case and punctuation aside), and when the turn ends some other
    way; at most ``max_attempts`` are made per user turn, each on words that end a
    sentence (a pause before the next word of a fragment is no end of turn).
    """

    def __init__(self, *, max_attempts: int = 2, speculation_timeout: float = 5.0, **kwargs):
        """Initialize the strategy.

        Args:
            max_attempts: Preemptive replies started per user turn, at most: each one
                cancelled costs tokens and synthesis taken from the audio being played.
            speculation_timeout: Seconds a speculation may go unresolved before it is
                withdrawn (the turn end should come within a fraction of a second).
            **kwargs: Passed to ``SpeechTimeoutUserTurnStopStrategy``.
        """
        super().__init__(**kwargs)
        self._max_attempts = max_attempts
        self._speculation_timeout = speculation_timeout
        self._speculation: UserTurnSpeculation | None = None
        self._timeout_task: asyncio.Task | None = None
        self._attempts = 0

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, EagerTranscriptionFrame):
            await self._speculate(frame)
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            # The STT withdrew it; its frame reaches the LLM and the TTS on its own.
            await self._take_speculation()
        elif isinstance(frame, VADUserStartedSpeakingFrame) and self._speculation:
            # The user goes on: that reply answers half a sentence.
            await self._withdraw("the user went on speaking")
        return await super().process_frame(frame)

    async def trigger_user_turn_stopped(self, *, enable_user_speaking_frames: bool | None = None):
        """End the turn, adopting the preemptive reply when it answers the same words."""
        speculation = await self._take_speculation()
        if speculation and _same_words(speculation.text, self._text):
            logger.debug(f"{self}: the turn ended as heard early, adopting the preemptive reply")
            await self.trigger_user_turn_finalized(
                enable_user_speaking_frames=enable_user_speaking_frames, confirms_speculation=True
            )
            return
        if speculation:
            logger.debug(
                f"{self}: the words changed, cancelling the preemptive reply"
                f" (early: [{speculation.text}], final: [{self._text}])"
            )
            await self.trigger_user_turn_speculation_cancelled()
        await super().trigger_user_turn_stopped(enable_user_speaking_frames=enable_user_speaking_frames)

    async def handle_user_turn_started(self):
        await self._withdraw("a new turn started")
        self._attempts = 0
        await super().handle_user_turn_started()

    async def handle_user_turn_stopped(self):
        # Normally resolved by trigger_user_turn_stopped; the stop watchdog or an
        # interruption ends a turn without it, and nothing else would withdraw it.
        await self._withdraw("the turn ended unresolved")
        await super().handle_user_turn_stopped()

    async def cleanup(self):
        await self._take_speculation()
        await super().cleanup()

    async def _speculate(self, frame: EagerTranscriptionFrame):
        if self._speculation or self._attempts >= self._max_attempts or not _ends_a_sentence(frame.text):
            return
        self._attempts += 1
        # Segments committed earlier in this turn are part of what the model will see.
        speculation = self._speculation = UserTurnSpeculation(text=f"{self._text} {frame.text}".strip())
        self._timeout_task = self.task_manager.create_task(
            self._timeout(speculation), f"{self}::_speculation_timeout"
        )
        logger.debug(f"{self}: preemptive reply {self._attempts} on [{speculation.text}]")
        await self.trigger_user_turn_inference_triggered(speculation=speculation)

    async def _timeout(self, speculation: UserTurnSpeculation):
        await asyncio.sleep(self._speculation_timeout)
        self._timeout_task = None
        if self._speculation is speculation:
            self._speculation = None
            logger.debug(f"{self}: no turn end within {self._speculation_timeout}s, cancelling the preemptive reply")
            await self.trigger_user_turn_speculation_cancelled()

    async def _withdraw(self, reason: str):
        if await self._take_speculation():
            logger.debug(f"{self}: {reason}, cancelling the preemptive reply")
            await self.trigger_user_turn_speculation_cancelled()

    async def _take_speculation(self) -> UserTurnSpeculation | None:
        """The single exit of a speculation: a resolved one is never withdrawn again by its timer."""
        speculation, self._speculation = self._speculation, None
        if self._timeout_task:
            task, self._timeout_task = self._timeout_task, None
            await self.task_manager.cancel_task(task)
        return speculation
