"""Voxtral served by vLLM: one OpenAI-style transcription request per user turn."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import httpx
from loguru import logger

from pipecat.frames.frames import ErrorFrame, Frame, TranscriptionFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.time import time_now_iso8601

from processors.apology import transcription_failed


class VoxtralRemoteSTTService(SegmentedSTTService):
    """Transcribes each VAD segment through a vLLM server's ``POST /audio/transcriptions``.

    Many bot processes can share one GPU server this way. A failed request (an
    error status, an unreachable server, a timeout) ends only its own turn with
    an ``ErrorFrame`` naming the URL and the apology the user hears; the next turn
    tries again.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        language: str | None = "en",
        timeout_s: float = 10.0,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            base_url: The server's OpenAI-compatible root, e.g. ``http://gpu:8001/v1``.
            model: The model name the server serves.
            api_key: Sent as a bearer token (vLLM's ``--api-key``).
            language: ISO 639-1 code, or None to let the server detect it.
            timeout_s: Longest wait to connect, send or read; a dead server costs a turn
                about this long, not a hung session.
            **kwargs: Passed to ``SegmentedSTTService``.
        """
        super().__init__(settings=STTSettings(model=model, language=language), **kwargs)
        self._url = f"{base_url.rstrip('/')}/audio/transcriptions"
        self._model = model
        self._language = language
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"}
        )

    def can_generate_metrics(self) -> bool:
        return True

    async def cleanup(self):
        await self._cancel_segment_task()  # as in WhisperSTTService.cleanup
        await super().cleanup()
        await self._client.aclose()

    def _error(self, e: Exception) -> ErrorFrame:
        """What went wrong with the server, in words."""
        server = f"Voxtral server {self._url}"
        if isinstance(e, httpx.TimeoutException):
            return ErrorFrame(
                error=f"{server} did not answer within {self._timeout_s} s",
                exception=e,
                category=ErrorCategory.CONNECTIVITY,
            )
        if isinstance(e, httpx.TransportError):
            return ErrorFrame(error=f"{server} is unreachable: {e}", exception=e, category=ErrorCategory.CONNECTIVITY)
        if isinstance(e, httpx.HTTPStatusError):
            return ErrorFrame(
                error=f"{server} answered HTTP {e.response.status_code}: {e.response.text[:200]}", exception=e
            )
        return ErrorFrame(error=f"{server} sent no transcript: {e}", exception=e)

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Upload one user turn (a WAV file) and wait for its transcript."""
        fields = {"model": self._model, "response_format": "json"}
        if self._language:
            fields["language"] = self._language
        await self.start_processing_metrics()
        try:
            response = await self._client.post(
                self._url, data=fields, files={"file": ("turn.wav", audio, "audio/wav")}
            )
            response.raise_for_status()
            text = response.json()["text"].strip()
        except (httpx.HTTPError, ValueError, KeyError) as e:
            error = self._error(e)
            yield error
            # The user hears the apology: a dead server is no reason for silence.
            for frame in transcription_failed(RuntimeError(error.error)):
                yield frame
            return
        finally:
            await self.stop_processing_metrics()
        logger.debug(f"{self}: transcript [{text}]")
        if text:
            yield TranscriptionFrame(text, self._user_id, time_now_iso8601(), self._language)
