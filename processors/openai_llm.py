"""A language model served elsewhere over the OpenAI API (vLLM, llama.cpp's server, Ollama).

pipecat's ``OpenAILLMService`` streams the reply; what a voice bot adds is what
the user hears when that server is down, stalls or answers nonsense: the
apology, within a bounded wait, instead of silence until the client gives up.
"""

from __future__ import annotations

import asyncio

import httpx
from loguru import logger
from openai import APIConnectionError, APIStatusError, APITimeoutError, AsyncOpenAI, DefaultAsyncHttpxClient

from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.openai.llm import OpenAILLMService

from processors.apology import APOLOGY, CUT_SHORT, FaultNoticeFrame


class RemoteLLMService(OpenAILLMService):
    """``OpenAILLMService`` whose failed turn is an apology the user hears, never a silence."""

    def __init__(self, *, base_url: str, timeout_s: float, **kwargs):
        """Initialize the service.

        Args:
            base_url: The server's OpenAI-compatible root, e.g. ``http://gpu:8000/v1``.
            timeout_s: Longest wait to connect, or for the next piece of the reply: a dead or
                stalled server costs the turn this long, not the client's default ten minutes.
            **kwargs: As for ``OpenAILLMService``.
        """
        self._timeout_s = timeout_s
        super().__init__(base_url=base_url, **kwargs)
        self._url = base_url
        self._said = False  # some of the reply in progress was pushed

    def create_client(self, api_key=None, base_url=None, **kwargs) -> AsyncOpenAI:
        # No retries: a voice user waits through each one; the next turn is the retry.
        return AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=httpx.Timeout(self._timeout_s),
            max_retries=0,
            http_client=DefaultAsyncHttpxClient(),
        )

    async def _push_llm_text(self, text: str):
        self._said = self._said or bool(text.strip())
        await super()._push_llm_text(text)

    async def _process_context(self, context: LLMContext):
        self._said = False
        try:
            await super()._process_context(context)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._fail(self._describe(e), exception=e)
            return
        if not self._said:
            await self._fail(f"the LLM server at {self._url} sent no reply text")

    def _describe(self, error: Exception) -> str:
        if isinstance(error, (APITimeoutError, httpx.TimeoutException)):  # the latter: a stall mid-stream
            return f"the LLM server at {self._url} did not answer within {self._timeout_s} s"
        if isinstance(error, APIConnectionError):
            return f"the LLM server at {self._url} is unreachable: {error.__cause__ or error}"
        if isinstance(error, APIStatusError):
            return f"the LLM server at {self._url} answered HTTP {error.status_code}: {str(error.message)[:200]}"
        return f"the LLM server at {self._url} sent a reply that could not be read: {error}"

    async def _fail(self, message: str, *, exception: Exception | None = None):
        """Say sorry, show why on the page, and let the session go on."""
        logger.warning(f"{self}: {message}")
        await self.push_error(error_msg=message, exception=exception)
        await self.push_frame(FaultNoticeFrame(message=f"the reply failed: {message}"))
        await self._push_llm_text(CUT_SHORT if self._said else APOLOGY)
