"""Deciding whether the user really took the floor while the bot holds it.

The bot holds the floor from the end of a user turn (it is thinking) until it
stops speaking. While it is free, speech starts a user turn at once (as
pipecat's VAD strategy does). While the bot holds it, the user's interim words
decide: a backchannel ("mhm", "okay"), a noise or breath that yields no words,
or the bot's own voice coming back through an open microphone (its words match
what the bot just said) leave the bot alone; any other word is a barge-in.
"""

from __future__ import annotations

import difflib
import re
import time
from collections import deque

from loguru import logger

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start.base_user_turn_start_strategy import BaseUserTurnStartStrategy

BACKCHANNELS = frozenset(
    "mhm mm mmm hmm hm uh huh uhhuh mhmm ok okay yeah yes yep yup right sure alright "
    "aha ah oh i see got it cool nice wow great".split()
)


def words_of(text: str) -> list[str]:
    """Lowercase words without punctuation; "uh-huh" and "M-H-M" become one word each."""
    text = re.sub(r"(?<=\w)-(?=\w)", "", text.lower())
    return re.findall(r"[a-z0-9']+", text)


class RecentBotSpeech:
    """The words the bot spoke lately, shared by the TTS (writer) and the strategy (reader)."""

    def __init__(self, *, window_secs: float = 8.0):
        self._window = window_secs
        self._entries: deque[tuple[float, list[str]]] = deque()

    def add(self, text: str) -> None:
        self._entries.append((time.monotonic(), words_of(text)))

    def words(self) -> set[str]:
        horizon = time.monotonic() - self._window
        while self._entries and self._entries[0][0] < horizon:
            self._entries.popleft()
        return {w for _, ws in self._entries for w in ws}


class Floor:
    """Who holds the conversational floor, read from the turn frames both ways."""

    def __init__(self):
        self.bot_has_it = False

    def update(self, frame: Frame) -> None:
        if isinstance(frame, (UserStoppedSpeakingFrame, BotStartedSpeakingFrame)):
            self.bot_has_it = True  # the bot is thinking, then speaking
        elif isinstance(frame, (UserStartedSpeakingFrame, BotStoppedSpeakingFrame)):
            self.bot_has_it = False


def floor_words(text: str, *, bot_words: set[str], backchannels: frozenset[str] = BACKCHANNELS) -> list[str]:
    """The words that claim the floor: neither backchannel nor an echo of the bot."""
    echo = list(bot_words)
    return [
        w
        for w in words_of(text)
        if w not in backchannels and not difflib.get_close_matches(w, echo, n=1, cutoff=0.75)
    ]


class BargeInUserTurnStartStrategy(BaseUserTurnStartStrategy):
    """Starts the user turn on speech when the floor is free, on real words when the bot has it."""

    def __init__(
        self,
        *,
        recent_bot_speech: RecentBotSpeech,
        min_words: int = 1,
        backchannels: frozenset[str] = BACKCHANNELS,
        **kwargs,
    ):
        """Initialize the strategy.

        Args:
            recent_bot_speech: What the bot said lately, to recognize its echo.
            min_words: Floor-claiming words needed to interrupt the bot.
            backchannels: Words that acknowledge without taking the floor.
            **kwargs: Passed to ``BaseUserTurnStartStrategy``.
        """
        super().__init__(**kwargs)
        self._recent = recent_bot_speech
        self._min_words = min_words
        self._backchannels = backchannels
        self._floor = Floor()
        self._in_turn = False

    async def handle_user_turn_started(self):
        await super().handle_user_turn_started()
        self._in_turn = True
        self._floor.update(UserStartedSpeakingFrame())

    async def handle_user_turn_stopped(self):
        await super().handle_user_turn_stopped()
        self._in_turn = False
        # The aggregator emits this frame itself, so its strategies never see it go by.
        self._floor.update(UserStoppedSpeakingFrame())

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        self._floor.update(frame)
        if isinstance(frame, VADUserStartedSpeakingFrame) and not self._floor.bot_has_it:
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        elif isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)) and not self._in_turn:
            return await self._handle_words(frame)
        return ProcessFrameResult.CONTINUE

    async def _handle_words(self, frame: InterimTranscriptionFrame | TranscriptionFrame) -> ProcessFrameResult:
        claimed = floor_words(frame.text, bot_words=self._recent.words(), backchannels=self._backchannels)
        if len(claimed) >= self._min_words:
            logger.debug(f"{self}: barge-in on {claimed} in {frame.text!r}")
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        if isinstance(frame, TranscriptionFrame):
            # A backchannel or an echo: keep it out of the next user message.
            logger.debug(f"{self}: not a turn: {frame.text!r}")
            await self.trigger_reset_aggregation()
        return ProcessFrameResult.CONTINUE
