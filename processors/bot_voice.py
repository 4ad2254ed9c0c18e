"""The bot's own voice, as a reference for recognizing its echo in the user's microphone."""

from __future__ import annotations

import time
from collections import deque

from pipecat.frames.frames import Frame, OutputAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from processors.audio_level import pcm_peak
from processors.barge_in import words_of


class BotVoice:
    """What the bot said lately and how loud it played; one per session.

    The TTS adds the words it speaks, a :class:`PlaybackMonitor` after the output
    transport adds the level of each chunk as it plays, and the STT and the
    barge-in strategy read them.
    """

    def __init__(self, *, window_secs: float = 30.0):
        """Initialize the reference.

        Args:
            window_secs: How long words are remembered. Text is added when
                synthesized, which can run a long reply ahead of playback.
        """
        self._window = window_secs
        self._words: deque[tuple[float, list[str]]] = deque()
        self._levels: deque[tuple[float, float]] = deque(maxlen=200)

    def add_text(self, text: str) -> None:
        self._words.append((time.monotonic(), words_of(text)))

    def words(self) -> set[str]:
        horizon = time.monotonic() - self._window
        while self._words and self._words[0][0] < horizon:
            self._words.popleft()
        return {w for _, ws in self._words for w in ws}

    def add_playback(self, peak: float) -> None:
        self._levels.append((time.monotonic(), peak))

    def playback_peak(self, *, within_secs: float) -> float:
        """The loudest the bot played lately (0..1 of full scale)."""
        horizon = time.monotonic() - within_secs
        return max((p for t, p in self._levels if t >= horizon), default=0.0)

    def could_be_echo(self, mic_peak: float, *, gate: float) -> bool:
        """Whether the microphone at ``mic_peak`` may be only the bot's voice coming back.

        The Geigel double-talk test: an echo is quieter than what was played by
        the room's loss, so speech louder than ``gate`` times the bot's recent
        peak is the user's. ``gate`` 0 disables the test.
        """
        return gate > 0 and mic_peak < gate * self.playback_peak(within_secs=0.5)


class PlaybackMonitor(FrameProcessor):
    """Notes the level of every audio chunk the output transport has played.

    The output transport pushes each chunk on once it has been sent at playback
    pace, so this is the bot's voice as the user's speaker plays it.
    """

    def __init__(self, *, bot_voice: BotVoice, **kwargs):
        super().__init__(**kwargs)
        self._bot_voice = bot_voice

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and frame.audio:
            self._bot_voice.add_playback(pcm_peak(frame.audio))
        await self.push_frame(frame, direction)
