"""Kokoro-82M text-to-speech over kokoro-onnx, sentence by sentence, with word timing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import numpy as np
import soxr
from kokoro_onnx import Kokoro
from loguru import logger

from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.utils.text.base_text_aggregator import TextType

from processors.bot_voice import BotVoice
from processors.first_clause_aggregator import FirstClauseAggregator

KOKORO_SAMPLE_RATE = 24000
# Speech starts where the signal first exceeds this (about -46 dBFS); what comes
# before is silence the listener would wait through.
_ONSET_THRESHOLD = 0.005
_ONSET_KEEP_SECS = 0.01
_CHUNK_SECS = 0.04


def trim_leading_silence(audio: np.ndarray, *, sample_rate: int) -> np.ndarray:
    """Drop the silence Kokoro puts before speech: it is pure added latency."""
    loud = np.flatnonzero(np.abs(audio) > _ONSET_THRESHOLD)
    if loud.size == 0:
        return audio[:0]
    start = max(0, int(loud[0]) - int(_ONSET_KEEP_SECS * sample_rate))
    return audio[start:]


def word_times(text: str, timings: list, *, offset: float, duration: float) -> list[tuple[str, float]]:
    """When each word of ``text`` starts, in seconds from the context's first audio.

    Kokoro reports phoneme timings with spaces between words; when its word count
    matches the text's, those starts are exact. Otherwise (numbers spoken as
    several words, say) words are spread over the audio by their length.
    """
    words = text.split()
    if not words:
        return []
    starts: list[float] = []
    in_word = False
    for t in timings:
        if t.phoneme.isspace():
            in_word = False
        elif not in_word:
            starts.append(t.start)
            in_word = True
    if len(starts) != len(words):
        total = sum(len(w) + 1 for w in words)
        starts, acc = [], 0
        for w in words:
            starts.append(duration * acc / total)
            acc += len(w) + 1
    return [(w, offset + s) for w, s in zip(words, starts)]


class KokoroTTSService(TTSService):
    """Speaks each sentence with a shared, already loaded Kokoro model.

    Word timestamps go to pipecat so the assistant context keeps only the words
    that were played when the user interrupts.
    """

    def __init__(
        self,
        *,
        kokoro: Kokoro,
        voice: str,
        lang: str = "en-us",
        speed: float = 1.0,
        peak_limit: float = 0.95,
        first_clause_words: tuple[int, int] | None = (2, 4),
        bot_voice: BotVoice | None = None,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            kokoro: A loaded kokoro-onnx model, shared across sessions.
            voice: A voice name present in the model's voices file.
            lang: The espeak-ng language used to phonemize text.
            speed: Speech rate multiplier.
            peak_limit: Peaks above this (full scale = 1) are scaled down; some
                voices clip otherwise.
            first_clause_words: (min, max) words of a reply's first chunk, spoken
                before its first sentence is complete; None waits for the sentence.
            bot_voice: Told each text spoken, so the bot's own voice coming
                back through the user's microphone is not taken for a barge-in.
            **kwargs: Passed to ``TTSService``.
        """
        if voice not in kokoro.voices:
            raise ValueError(
                f"tts.voice '{voice}' is not in the voices file; choose one of {sorted(kokoro.voices)}"
            )
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,
            settings=TTSSettings(model="kokoro-82m", voice=voice, language=lang),
            **kwargs,
        )
        if first_clause_words:
            # pipecat has no constructor argument for the aggregator; it is this one attribute.
            self._text_aggregator = FirstClauseAggregator(
                min_words=first_clause_words[0],
                max_words=first_clause_words[1],
                aggregation_type=TextType.SENTENCE,
                language=self._text_aggregator.language,
            )
        self._bot_voice = bot_voice
        self._kokoro = kokoro
        self._voice = voice
        self._lang = lang
        self._speed = speed
        self._peak_limit = peak_limit
        # Seconds of audio already produced per context: word times are cumulative.
        self._context_offsets: dict[str, float] = {}

    def can_generate_metrics(self) -> bool:
        return True

    async def on_audio_context_interrupted(self, context_id: str):
        self._context_offsets.pop(context_id, None)

    async def on_audio_context_completed(self, context_id: str):
        self._context_offsets.pop(context_id, None)

    def _synthesize(self, text: str) -> tuple[np.ndarray, list]:
        audio, sample_rate, timings = self._kokoro.create_timed(
            text, self._voice, speed=self._speed, lang=self._lang
        )
        return np.asarray(audio, dtype=np.float32), timings

    async def _synthesize_keeping_context_alive(self, text: str, context_id: str) -> tuple[np.ndarray, list]:
        """Synthesize in a worker thread, telling pipecat meanwhile that the context is in use.

        pipecat ends an audio context that gets no audio for ``stop_frame_timeout_s``
        (3 s) and reports it as "completed with no audio"; a long sentence, or a CPU
        shared by several sessions, takes longer than that to synthesize.
        """
        task = asyncio.ensure_future(asyncio.to_thread(self._synthesize, text))
        interval = max(0.05, self._stop_frame_timeout_s / 3)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=interval)
                self._refresh_audio_context(context_id)
            return task.result()
        finally:
            task.cancel()  # on an interruption: the thread finishes, its result is dropped

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Synthesize one sentence off the event loop and stream it in 40 ms chunks."""
        text = text.strip()
        if not text:
            return
        if self._bot_voice is not None:
            self._bot_voice.add_text(text)
        try:
            await self.start_tts_usage_metrics(text)
            audio, timings = await self._synthesize_keeping_context_alive(text, context_id)
        except Exception as e:
            logger.exception(f"{self}: synthesis failed for {text!r}")
            yield ErrorFrame(error=f"Kokoro TTS failed: {e}")
            return
        finally:
            await self.stop_ttfb_metrics()

        offset = self._context_offsets.get(context_id, 0.0)
        if offset == 0.0:
            # Only the reply's first sentence: later leading silence is a natural pause.
            before = len(audio)
            audio = trim_leading_silence(audio, sample_rate=KOKORO_SAMPLE_RATE)
            shift = (before - len(audio)) / KOKORO_SAMPLE_RATE
            timings = [t.__class__(t.phoneme, t.start - shift, t.end - shift) for t in timings]
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak > self._peak_limit:
            audio = audio * (self._peak_limit / peak)
        duration = len(audio) / KOKORO_SAMPLE_RATE
        self._context_offsets[context_id] = offset + duration
        await self.add_word_timestamps(
            word_times(text, timings, offset=max(0.0, offset), duration=duration), context_id
        )

        if self.sample_rate != KOKORO_SAMPLE_RATE:
            audio = soxr.resample(audio, KOKORO_SAMPLE_RATE, self.sample_rate, quality="HQ")
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        step = int(self.sample_rate * _CHUNK_SECS) * 2
        for i in range(0, len(pcm), step):
            yield TTSAudioRawFrame(
                audio=pcm[i : i + step],
                sample_rate=self.sample_rate,
                num_channels=1,
                context_id=context_id,
            )
