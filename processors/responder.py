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
# What a chat template adds around a message's text, in tokens (ChatML: 5; Llama 3: 5; Gemma: 6).
MESSAGE_OVERHEAD_TOKENS = 8
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


class RepeatGuard:
    """Ends a reply before it says a sentence twice.

    llama.cpp's repeat penalty stops most loops; a model that loops through it is cut here.
    The first sentence streams token by token (the first audio waits on it); each later one is
    released whole when it ends, unless it was already said. That holds back nothing the TTS
    would have spoken sooner: after the first clause it synthesizes sentence by sentence.
    """

    def __init__(self):
        self._said: set[str] = set()
        self._sentence = ""
        self._held = False  # past the first sentence: the current one waits for its end

    def feed(self, token: str) -> tuple[str, bool]:
        """The text to push now for ``token``, and whether the reply must stop before it."""
        out = ""
        if self._sentence.strip() and _ends_sentence(self._sentence, token):
            key = " ".join(self._sentence.lower().split())
            if self._held:
                if key in self._said:
                    return "", True
                out = self._sentence
            self._said.add(key)
            self._sentence, self._held = "", True
        self._sentence += token
        if not self._held:
            out += token
        return out, False

    def finish(self) -> str:
        """What is still held when the reply ends, unless it repeats."""
        key = " ".join(self._sentence.lower().split())
        return self._sentence if self._held and key and key not in self._said else ""


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


def fit_window(
    messages: list[dict], *, count, budget: int, dropped: int = 0, target: int | None = None, head: int | None = None
) -> int:
    """How many of the oldest messages after the head (the system prompt) to leave out so the rest fit.

    A long session keeps talking: llama.cpp refuses a prompt over its window, and every
    later turn of that session would fail. Exchanges go whole, oldest first, so the roles
    still alternate from a user message; the system prompt and the latest message stay.

    Args:
        messages: OpenAI-style messages, roles alternating after an optional system one.
        count: The model's token count of a text.
        budget: Tokens the prompt may take (the window less the longest reply).
        dropped: What earlier turns left out: kept while it fits, so the prompt begins
            the same and llama.cpp reuses what it evaluated of it.
        target: When more must go, drop down to this many tokens (default ``budget``):
            room for the next turns without changing the prompt's beginning again.
        head: Messages at the start always sent (default: the system prompt, if any).
    """
    if head is None:
        head = 1 if messages and messages[0]["role"] == "system" else 0
    sizes = [count(str(m.get("content") or "")) + MESSAGE_OVERHEAD_TOKENS for m in messages]
    first = min(head + dropped, max(head, len(messages) - 1))
    total = sum(sizes[:head]) + sum(sizes[first:])
    if total <= budget:
        return first - head
    goal = budget if target is None else min(target, budget)
    while total > goal and len(messages) - first > 1:
        total -= sizes[first]
        first += 1
        # Not left opening on the bot's words: drop through to the next user message.
        while len(messages) - first > 1 and messages[first]["role"] != "user":
            total -= sizes[first]
            first += 1
    return first - head


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
        repeat_penalty: float = 1.1,
        examples: list[tuple[str, str]] = (),
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
            repeat_penalty: llama.cpp's penalty on tokens of the last 64: greedy SmolLM2 says
                "I'm so sorry for any inconvenience." nine times over without it (1.0). It acts
                on each token as it is sampled, so no text is held back from the TTS.
            examples: (question, answer) exchanges sent after the system prompt, before the
                conversation, and never left out: a 135M model copies short, direct answers
                shown as turns better than it follows instructions (27 of 40 everyday questions
                answered acceptably against 21 without, tests/data/questions.yaml).
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
        self._repeat_penalty = repeat_penalty
        self._examples = [
            {"role": role, "content": text}
            for question, answer in examples
            for role, text in (("user", question), ("assistant", answer))
        ]
        self._dropped = 0  # the oldest messages no longer sent (the window is full)

    def _fit(self, messages: list[dict]) -> list[dict]:
        """The messages that fit the model's window with room for the longest reply.

        Once the window is full, half of it is cleared at a time: the turns after that reuse
        llama.cpp's evaluation of the unchanged beginning instead of re-reading the window.
        """
        budget = self._llm.n_ctx() - (self._max_tokens + _GRACE_TOKENS)

        def count(text: str) -> int:
            return len(self._llm.tokenize(text.encode(), add_bos=False, special=True))

        head = (1 if messages and messages[0]["role"] == "system" else 0) + len(self._examples)
        dropped = fit_window(
            messages, count=count, budget=budget, dropped=self._dropped, target=budget // 2, head=head
        )
        if dropped != self._dropped:
            logger.debug(f"{self}: the oldest {dropped} messages left out to fit {budget} tokens")
            self._dropped = dropped
        return messages[:head] + messages[head + dropped :]

    async def _messages(self, context: LLMContext) -> list[dict]:
        messages = merge_consecutive_turns(await self._openai_messages(context))
        system = 1 if messages and messages[0]["role"] == "system" else 0
        return messages[:system] + self._examples + messages[system:]

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
                        messages=self._fit(messages),
                        max_tokens=self._max_tokens + _GRACE_TOKENS,
                        temperature=self._temperature,
                        repeat_penalty=self._repeat_penalty,
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
        text, said, tokens = "", "", 0
        guard = RepeatGuard()
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
                release, repeated = guard.feed(item)
                if repeated:
                    logger.debug(f"{self}: the reply began to repeat itself; ended before it")
                    break
                if release:
                    said += release
                    await self._push_llm_text(release)
                self._tokens = tokens  # generated, pushed or held: what a cancelled reply wasted
            if rest := guard.finish():
                said += rest
                await self._push_llm_text(rest)
            if said.strip() and not said.rstrip().endswith(SENTENCE_ENDS):
                await self._push_llm_text(".")
        finally:
            stop.set()
            # The thread notices at its next token; wait so the lock is free for the next turn.
            await asyncio.shield(worker)
        logger.debug(f"{self}: replied in {tokens} tokens: {said.strip()!r}")
