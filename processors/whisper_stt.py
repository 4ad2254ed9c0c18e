"""Whisper speech-to-text over faster-whisper, one transcription per user turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import numpy as np
import soxr
from faster_whisper import WhisperModel
from loguru import logger

from pipecat.frames.frames import ErrorFrame, Frame, TranscriptionFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.utils.time import time_now_iso8601

WHISPER_SAMPLE_RATE = 16000


def pcm16_to_float(audio: bytes, *, sample_rate: int, target_rate: int) -> np.ndarray:
    """16-bit PCM to float32 at ``target_rate``, resampling only when the rates differ."""
    samples = np.frombuffer(audio, dtype=np.int16).astype(np.float32) / 32768.0
    if sample_rate != target_rate:
        samples = soxr.resample(samples, sample_rate, target_rate, quality="HQ")
    return samples


class WhisperSTTService(SegmentedSTTService):
    """Transcribes each VAD segment with a shared, already loaded faster-whisper model."""

    def __init__(
        self,
        *,
        model: WhisperModel,
        model_name: str = "whisper-tiny.en",
        language: str | None = "en",
        beam_size: int = 1,
        no_speech_prob: float = 0.6,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            model: A loaded faster-whisper model, shared across sessions.
            model_name: Reported in metrics.
            language: ISO code, or None to let Whisper detect it.
            beam_size: 1 is greedy decoding, the fastest.
            no_speech_prob: Segments Whisper deems likelier silence than this are dropped,
                so a cough does not become a hallucinated sentence.
            **kwargs: Passed to ``SegmentedSTTService``.
        """
        super().__init__(settings=STTSettings(model=model_name, language=language), **kwargs)
        self._model = model
        self._language = language
        self._beam_size = beam_size
        self._no_speech_prob = no_speech_prob

    @property
    def wants_wav_segments(self) -> bool:
        return False

    def can_generate_metrics(self) -> bool:
        return True

    def _transcribe(self, samples: np.ndarray) -> tuple[str, str | None]:
        """The kept text and the language Whisper used (detected when none is set)."""
        segments, info = self._model.transcribe(
            samples,
            language=self._language,
            beam_size=self._beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
        )
        text = " ".join(
            s.text.strip() for s in segments if s.no_speech_prob < self._no_speech_prob
        ).strip()
        return text, self._language or info.language

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Transcribe one user turn in a worker thread."""
        await self.start_processing_metrics()
        try:
            samples = pcm16_to_float(
                audio, sample_rate=self.sample_rate, target_rate=WHISPER_SAMPLE_RATE
            )
            text, language = await asyncio.to_thread(self._transcribe, samples)
        except Exception as e:
            logger.exception(f"{self}: transcription failed")
            yield ErrorFrame(error=f"Whisper STT failed: {e}")
            return
        finally:
            await self.stop_processing_metrics()
        logger.debug(f"{self}: transcript [{text}]")
        if text:
            yield TranscriptionFrame(text, self._user_id, time_now_iso8601(), language)
