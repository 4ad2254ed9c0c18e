"""Voxtral in chat mode as a streaming pipecat LLM service: the STT's model also answers."""

from __future__ import annotations

import asyncio
import threading

import torch
from loguru import logger
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from pipecat.processors.aggregators.llm_context import LLMContext

from processors.local_llm import LocalLLMService
from processors.responder import SENTENCE_ENDS
from processors.voxtral_stt import VoxtralModel

# Past max_tokens a reply may run this many more tokens to reach a sentence end.
_GRACE_TOKENS = 24
_DONE = object()


def fold_system_prompt(messages: list[dict]) -> list[dict]:
    """Move system instructions to the head of the first user turn.

    Voxtral's chat template (tokenizer v7) refuses a system message next to audio,
    so the instructions travel inside the user turn instead.
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    chat = [m for m in messages if m["role"] != "system"]
    if not system:
        return chat
    for i, message in enumerate(chat):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                content = f"{system}\n\n{content}"
            else:
                content = [{"type": "text", "text": system}, *content]
            chat[i] = {**message, "content": content}
            return chat
    return [*chat, {"role": "user", "content": system}]


class _LoopStreamer(TextStreamer):
    """Hands each decoded word from the generating thread straight to the event loop."""

    def __init__(self, *, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._loop = loop
        self._queue = queue

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, text)


class _ReplyStop(StoppingCriteria):
    """Ends generation on interruption, or past the soft cap at a sentence end."""

    def __init__(self, *, stop: threading.Event, tokenizer, prompt_tokens: int, max_tokens: int):
        self._stop = stop
        self._tokenizer = tokenizer
        self._prompt_tokens = prompt_tokens
        self._max_tokens = max_tokens

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self._stop.is_set()
        if not done and input_ids.shape[1] - self._prompt_tokens >= self._max_tokens:
            last = self._tokenizer.decode(input_ids[0, -1:].tolist(), skip_special_tokens=True)
            done = last.rstrip().endswith(SENTENCE_ENDS)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class VoxtralLLMService(LocalLLMService):
    """Streams a reply from the shared Voxtral model, word by word, off the event loop.

    With Voxtral as the STT, the same weights answer: one model in memory for
    both. Replies are capped and end at a sentence boundary, as in
    ``LlamaCppLLMService``; an interruption stops the generating thread at its
    next token, so no GPU or CPU keeps burning on a dead reply.
    """

    engine_name = "Voxtral"

    def __init__(
        self,
        *,
        model: VoxtralModel,
        system_prompt: str,
        max_tokens: int = 48,
        temperature: float = 0.2,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            model: The loaded Voxtral model, shared with the STT and across sessions.
            system_prompt: Instructions, sent at the head of the first user turn.
            max_tokens: Soft reply cap; the reply then runs on to its sentence end.
            temperature: Sampling temperature; 0 decodes greedily.
            **kwargs: Passed to ``LocalLLMService``.
        """
        super().__init__(
            model_name=model.model_id,
            system_prompt=system_prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            **kwargs,
        )
        self._model = model

    def _inputs(self, messages: list[dict]):
        """The prompt's tensors, the oldest exchanges left out until it fits the model's window.

        Counted by the chat template itself (mistral-common's tokenizer), so audio chunks and
        the folded system prompt count as what they are; a fitting prompt is tokenized once.
        """
        processor = self._model.processor
        window = self._model.model.config.text_config.max_position_embeddings
        budget = window - (self._max_tokens + _GRACE_TOKENS)
        head = 1 if messages and messages[0]["role"] == "system" else 0
        first = head
        while True:
            kept = messages[:head] + messages[first:]
            inputs = processor.apply_chat_template(
                fold_system_prompt(kept), tokenize=True, return_dict=True, return_tensors="pt"
            )
            if inputs["input_ids"].shape[1] <= budget or len(messages) - first <= 1:
                break
            # Whole exchanges go, so the kept turns still open on the user's.
            first += 1
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                first += 1
        if first > head:
            logger.debug(f"{self}: the oldest {first - head} messages left out to fit {budget} tokens")
        return inputs

    async def _respond(self, context: LLMContext):
        vox = self._model
        messages = await self._openai_messages(context)
        # Tokenizing a long conversation takes a while: off the event loop.
        inputs = (await asyncio.to_thread(self._inputs, messages)).to(vox.device, dtype=vox.dtype)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        tokenizer = vox.processor.tokenizer
        criteria = _ReplyStop(
            stop=stop,
            tokenizer=tokenizer,
            prompt_tokens=inputs["input_ids"].shape[1],
            max_tokens=self._max_tokens,
        )

        sampling = (
            {"do_sample": True, "temperature": self._temperature}
            if self._temperature > 0
            else {"do_sample": False}
        )

        def generate():
            try:
                with vox.lock, torch.inference_mode():
                    vox.model.generate(
                        **inputs,
                        max_new_tokens=self._max_tokens + _GRACE_TOKENS,
                        **sampling,
                        streamer=_LoopStreamer(tokenizer=tokenizer, loop=loop, queue=queue),
                        stopping_criteria=StoppingCriteriaList([criteria]),
                    )
            except BaseException as e:  # handed to the event loop, raised there
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        await self.start_ttfb_metrics()
        worker = asyncio.create_task(asyncio.to_thread(generate))
        text = ""
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                if not text:
                    await self.stop_ttfb_metrics()
                text += item
                await self._push_llm_text(item)
            if text.strip() and not text.rstrip().endswith(SENTENCE_ENDS):
                await self._push_llm_text(".")
        finally:
            stop.set()
            # The thread notices at its next token; wait so the lock is free for the next turn.
            await asyncio.shield(worker)
        logger.debug(f"{self}: replied {text.strip()!r}")
