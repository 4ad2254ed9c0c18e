"""Voxtral speech-to-text through transformers, one transcription per user turn."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import numpy as np
import torch
from loguru import logger
from transformers import VoxtralForConditionalGeneration, VoxtralProcessor

from pipecat.frames.frames import ErrorFrame, Frame, TranscriptionFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.utils.time import time_now_iso8601

from processors.apology import transcription_failed
from processors.whisper_stt import pcm16_to_float

VOXTRAL_SAMPLE_RATE = 16000


@dataclass
class VoxtralModel:
    """A loaded Voxtral checkpoint, shared by every session for STT and chat.

    One model on one device runs one ``generate`` at a time: ``lock`` serializes
    the sessions (and the STT and responder of one session) that share it.
    """

    model: VoxtralForConditionalGeneration
    processor: VoxtralProcessor
    model_id: str
    device: torch.device
    dtype: torch.dtype
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gpu_memory_bytes(self) -> int | None:
        """Memory the process holds on the model's GPU; None on a CPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(self.device)

    def transcribe(self, samples: np.ndarray, *, language: str | None, max_new_tokens: int) -> str:
        """Transcribe 16 kHz float audio; blocks, so call it off the event loop.

        Args:
            samples: Mono float32 audio at 16 kHz.
            language: ISO 639-1 code, or None to let Voxtral detect it.
            max_new_tokens: Cap on the transcript length in tokens.
        """
        inputs = self.processor.apply_transcription_request(
            language=language,
            audio=samples,
            sampling_rate=VOXTRAL_SAMPLE_RATE,
            format="WAV",
            model_id=self.model_id,
        ).to(self.device, dtype=self.dtype)
        with self.lock, torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()


class VoxtralSTTService(SegmentedSTTService):
    """Transcribes each VAD segment with a shared, already loaded Voxtral model."""

    def __init__(
        self,
        *,
        model: VoxtralModel,
        language: str | None = "en",
        max_new_tokens: int = 128,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            model: A loaded Voxtral model, shared across sessions.
            language: ISO 639-1 code, or None to let Voxtral detect it.
            max_new_tokens: Cap on a transcript's length, so noise cannot run on.
            **kwargs: Passed to ``SegmentedSTTService``.
        """
        super().__init__(settings=STTSettings(model=model.model_id, language=language), **kwargs)
        self._model = model
        self._language = language
        self._max_new_tokens = max_new_tokens

    @property
    def wants_wav_segments(self) -> bool:
        return False

    async def cleanup(self):
        await self._cancel_segment_task()  # as in WhisperSTTService.cleanup
        await super().cleanup()

    def can_generate_metrics(self) -> bool:
        return True

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Transcribe one user turn in a worker thread."""
        await self.start_processing_metrics()
        try:
            samples = pcm16_to_float(
                audio, sample_rate=self.sample_rate, target_rate=VOXTRAL_SAMPLE_RATE
            )
            text = await asyncio.to_thread(
                self._model.transcribe,
                samples,
                language=self._language,
                max_new_tokens=self._max_new_tokens,
            )
        except Exception as e:
            logger.exception(f"{self}: transcription failed")
            yield ErrorFrame(error=f"Voxtral STT failed: {e}", exception=e)
            for frame in transcription_failed(e):
                yield frame
            return
        finally:
            await self.stop_processing_metrics()
        logger.debug(f"{self}: transcript [{text}]")
        if text:
            yield TranscriptionFrame(text, self._user_id, time_now_iso8601(), self._language)
