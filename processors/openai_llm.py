"""A language model served elsewhere over the OpenAI API (vLLM, llama.cpp's server, Ollama).

pipecat's ``OpenAILLMService`` streams the reply; what a voice bot adds is what
the user hears when that server is down, stalls or answers nonsense: the
apology, within a bounded wait, instead of silence until the client gives up;
and a conversation that keeps fitting the server's window however long the call.
"""

from __future__ import annotations

import asyncio
import math
import re

import httpx
from loguru import logger
from openai import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncOpenAI,
    AsyncStream,
    BadRequestError,
    DefaultAsyncHttpxClient,
)
from openai.types.chat import ChatCompletionChunk
from openai.types.completion_usage import CompletionUsage

from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.utils.types import assert_given, is_given

from processors.apology import APOLOGY, CUT_SHORT, FaultNoticeFrame
from processors.responder import MESSAGE_OVERHEAD_TOKENS, fit_window

# Tokens per character before the server has reported one prompt's size: English runs near
# 0.25 with the tokenizers of Llama 3, Qwen and Mistral; a third leaves room for the rest.
_TOKENS_PER_CHAR = 1 / 3
# What servers say when a prompt is over the window: vLLM ("maximum context length is 4096
# tokens"), llama.cpp's server ("exceeds the available context size"), OpenAI ("context_length_exceeded").
_OVERFLOW = re.compile(r"context length|context size|context window|context_length_exceeded|too many tokens", re.I)
_STATED_WINDOW = re.compile(r"maximum context length is (\d+)")


class RemoteLLMService(OpenAILLMService):
    """``OpenAILLMService`` whose failed turn is an apology the user hears, never a silence."""

    def __init__(self, *, base_url: str, timeout_s: float, context_window: int = 4096, **kwargs):
        """Initialize the service.

        Args:
            base_url: The server's OpenAI-compatible root, e.g. ``http://gpu:8000/v1``.
            timeout_s: Longest wait to connect, or for the next piece of the reply: a dead or
                stalled server costs the turn this long, not the client's default ten minutes.
            context_window: The served model's window in tokens (vLLM's ``--max-model-len``,
                llama.cpp's ``--n_ctx``, Ollama's ``num_ctx``): older exchanges are left out so
                the prompt and the longest reply fit. A server that refuses a prompt as too
                long anyway has its stated window believed, the context trimmed, the turn retried.
            **kwargs: As for ``OpenAILLMService``.
        """
        self._timeout_s = timeout_s
        super().__init__(base_url=base_url, **kwargs)
        self._url = base_url
        self._said = False  # some of the reply in progress was pushed
        self._window = context_window
        # The server's tokenizer is not here: its count of each prompt (the reply's usage)
        # calibrates ours, which counts characters until it first reports one.
        self._tokens_per_char = _TOKENS_PER_CHAR
        self._sent = (0, 0)  # the prompt in flight: characters, messages
        self._dropped = 0  # the oldest messages no longer sent

    def _count(self, text: str) -> int:
        return math.ceil(len(text) * self._tokens_per_char)

    def _fit(self, messages: list[dict]) -> list[dict]:
        """The messages that fit the window with room for the longest reply (as llama.cpp's do)."""
        reply = self._settings.max_tokens
        budget = self._window - (reply if is_given(reply) and reply else 0)
        dropped = fit_window(messages, count=self._count, budget=budget, dropped=self._dropped, target=budget // 2)
        if dropped != self._dropped:
            logger.debug(f"{self}: the oldest {dropped} messages left out to fit {budget} tokens")
            self._dropped = dropped
        head = 1 if messages and messages[0]["role"] == "system" else 0
        kept = messages[:head] + messages[head + dropped :]
        self._sent = (sum(len(str(m.get("content") or "")) for m in kept), len(kept))
        return kept

    def _token_usage(self, usage: CompletionUsage):
        # The prompt's true size, the chat template's overhead on each message set aside.
        chars, messages = self._sent
        if usage.prompt_tokens and chars:
            self._tokens_per_char = max(usage.prompt_tokens - MESSAGE_OVERHEAD_TOKENS * messages, 1) / chars
        return super()._token_usage(usage)

    async def get_chat_completions(self, context: LLMContext) -> AsyncStream[ChatCompletionChunk]:
        self._log_llm_response(context)
        params = await self.get_llm_adapter().get_llm_invocation_params(
            context,
            system_instruction=assert_given(self._settings.system_instruction),
            convert_developer_to_user=not self.supports_developer_role,
        )
        messages = list(params["messages"])
        try:
            return await self._client.chat.completions.create(
                **self.build_chat_completion_params({**params, "messages": self._fit(messages)})
            )
        except BadRequestError as e:
            if not _OVERFLOW.search(str(e.message)):
                raise
            stated = _STATED_WINDOW.search(str(e.message))
            self._window = int(stated.group(1)) if stated else self._window // 2
            self._tokens_per_char *= 1.25  # ours counted short
            logger.warning(f"{self}: the server refused the prompt as too long; retried within {self._window} tokens")
            return await self._client.chat.completions.create(
                **self.build_chat_completion_params({**params, "messages": self._fit(messages)})
            )

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
