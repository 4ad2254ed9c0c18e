"""A local GGUF language model (llama-cpp-python) as a streaming pipecat LLM service."""

from __future__ import annotations

import asyncio
import threading

from llama_cpp import Llama
from loguru import logger

from pipecat.processors.aggregators.llm_context import LLMContext

from processors.compute_budget import ComputeBudget
from processors.local_llm import LocalLLMService

SENTENCE_ENDS = (".", "!", "?")
# Past max_tokens a reply may run this many more tokens to reach a sentence end.
_GRACE_TOKENS = 24
# How often a reply waiting for the shared model checks whether it was cancelled.
_LOCK_POLL_SECS = 0.02
_DONE = object()


def _ends_sentence(text: str, next_token: str) -> bool:
    """Whether ``text`` ends a sentence, judged by the token that follows it.

    A mark only ends a sentence when whitespace follows: "3." before "14" does not.
    """
    return text.rstrip().endswith(SENTENCE_ENDS) and (
        text[-1:].isspace() or next_token[:1].isspace()
    )


def merge_consecutive_turns(messages: list[dict]) -> list[dict]:
    """Join back-to-back messages of one role into one.

    A user who pauses mid-sentence and goes on before the bot answered leaves two
    user messages; the model should read them as the one sentence they are (and
    chat templates expect the roles to alternate).
    """
    merged: list[dict] = []
    for message in messages:
        text = message.get("content")
        if merged and merged[-1]["role"] == message["role"] and isinstance(text, str) and isinstance(merged[-1].get("content"), str):
            merged[-1] = {**merged[-1], "content": f"{merged[-1]['content']} {text}"}
        else:
            merged.append(dict(message))
    return merged


class LlamaCppLLMService(LocalLLMService):
    """Streams a reply from a shared llama.cpp model, token by token, off the event loop.

    Replies are capped (a voice answer should be short) and always end at a
    sentence boundary, so TTS never speaks half a sentence. An interruption stops
    the generating thread at the next token: no CPU keeps burning on a dead reply.
    """

    engine_name = "llama.cpp"

    def __init__(
        self,
        *,
        llm: Llama,
        lock: threading.Lock,
        system_prompt: str,
        budget: ComputeBudget | None = None,
        model_name: str = "smollm2-135m-instruct",
        max_tokens: int = 48,
        temperature: float = 0.2,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            llm: A loaded llama.cpp model, shared across sessions.
            lock: Serializes use of ``llm``; a llama.cpp context is not thread-safe.
            system_prompt: Instructions prepended to every request.
            budget: The process's compute order: generation pauses between tokens
                while speech a listener is waiting for is synthesized.
            model_name: Reported in metrics.
            max_tokens: Soft reply cap; the reply then runs on to its sentence end.
            temperature: Sampling temperature.
            **kwargs: Passed to ``LocalLLMService``.
        """
        super().__init__(
            model_name=model_name,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            **kwargs,
        )
        self._llm = llm
        self._lock = lock
        self._budget = budget

    async def _messages(self, context: LLMContext) -> list[dict]:
        return merge_consecutive_turns(await self._openai_messages(context))

    async def _respond(self, context: LLMContext):
        messages = await self._messages(context)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def generate():
            try:
                # Another session may hold the model for seconds: a reply cancelled
                # meanwhile gives up waiting instead of running once the model is free.
                while not self._lock.acquire(timeout=_LOCK_POLL_SECS):
                    if stop.is_set():
                        return
                try:
                    if stop.is_set():
                        return
                    stream = self._llm.create_chat_completion(
                        messages=messages,
                        max_tokens=self._max_tokens + _GRACE_TOKENS,
                        temperature=self._temperature,
                        stream=True,
                    )
                    for chunk in stream:
                        if self._budget is not None:
                            self._budget.yield_to_speech(cancelled=stop.is_set)
                        if stop.is_set():
                            break
                        token = chunk["choices"][0]["delta"].get("content")
                        if token:
                            loop.call_soon_threadsafe(queue.put_nowait, token)
                finally:
                    self._lock.release()
            except BaseException as e:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        await self.start_ttfb_metrics()
        # While the reply's first words are spoken, the rest is written with what the cores leave.
        run = self._budget.background(generate) if self._budget is not None else asyncio.to_thread(generate)
        worker = asyncio.create_task(run)
        text, tokens = "", 0
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if tokens == 0:
                    await self.stop_ttfb_metrics()
                if tokens >= self._max_tokens and _ends_sentence(text, item):
                    break
                tokens += 1
                text += item
                await self._push_llm_text(item)
            if text.strip() and not text.rstrip().endswith(SENTENCE_ENDS):
                await self._push_llm_text(".")
        finally:
            stop.set()
            # The thread notices at its next token; wait so the lock is free for the next turn.
            await asyncio.shield(worker)
        logger.debug(f"{self}: replied in {tokens} tokens: {text.strip()!r}")
