"""`voxbot chat`: the bot's brain without its ears and voice.

A user trying a model or a prompt should not have to speak: typed lines go through the
same responder and context aggregators as a voice session (bot/pipeline.py builds both),
so what fits the window, the loop guard and the prompt behave exactly as they do on a call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMMessagesAppendFrame,
    LLMTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from bot.config import Config
from bot.models import Models
from processors.apology import FaultNoticeFrame

# A reply that has not ended by then never will (a remote server times out well before).
_REPLY_TIMEOUT_SECS = 300.0


@dataclass
class ChatReply:
    """One answer, timed from the moment the line was sent."""

    user: str
    reply: str
    first_token_ms: float | None
    reply_ms: float
    context_messages: int  # in the context after this reply: what the window must hold
    fault: str | None = None  # a model failure the bot apologized for

    def as_dict(self) -> dict:
        return asdict(self)


class ReplyCollector(FrameProcessor):
    """Gathers each reply's text between the responder's start and end frames."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._text: list[str] = []
        self._first_token_at: float | None = None
        self._fault: str | None = None
        self._done: asyncio.Queue[tuple[str, float | None, str | None]] = asyncio.Queue()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame):
            self._text, self._first_token_at, self._fault = [], None, None
        elif isinstance(frame, LLMTextFrame):
            if self._first_token_at is None:
                self._first_token_at = time.monotonic()
            self._text.append(frame.text)
        elif isinstance(frame, FaultNoticeFrame):
            self._fault = frame.message
        elif isinstance(frame, ErrorFrame) and self._fault is None:
            self._fault = frame.error
        elif isinstance(frame, LLMFullResponseEndFrame):
            self._done.put_nowait(("".join(self._text).strip(), self._first_token_at, self._fault))
        await self.push_frame(frame, direction)

    async def next_reply(self) -> tuple[str, float | None, str | None]:
        return await asyncio.wait_for(self._done.get(), _REPLY_TIMEOUT_SECS)


class ChatSession:
    """A running text-only pipeline: :meth:`ask` sends a line and waits for the whole reply."""

    def __init__(self, *, config: Config, models: Models):
        from bot.pipeline import build_chat

        self._collector = ReplyCollector()
        self._session = build_chat(config=config, models=models, collector=self._collector)
        self._run: asyncio.Task | None = None
        # Each reply is in the context before the next line is sent, so turns never interleave.
        self._kept: asyncio.Queue = asyncio.Queue()

        @self._session.assistant.event_handler("on_assistant_turn_stopped")
        async def _on_kept(aggregator, message):
            self._kept.put_nowait(message)

    async def __aenter__(self) -> ChatSession:
        started = asyncio.Event()

        @self._session.worker.event_handler("on_pipeline_started")
        async def _on_started(worker, frame):
            started.set()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self._session.worker)
        self._run = asyncio.create_task(runner.run())
        await asyncio.wait_for(started.wait(), 30)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.worker.cancel(reason="chat finished")
        if self._run is not None:
            await asyncio.wait_for(self._run, 10)

    @property
    def context(self):
        """The conversation so far, as the responder's context aggregators keep it."""
        return self._session.context

    async def ask(self, text: str) -> ChatReply:
        sent = time.monotonic()
        await self._session.worker.queue_frame(
            LLMMessagesAppendFrame(messages=[{"role": "user", "content": text}], run_llm=True)
        )
        reply, first_token_at, fault = await self._collector.next_reply()
        await asyncio.wait_for(self._kept.get(), _REPLY_TIMEOUT_SECS)
        return ChatReply(
            user=text,
            reply=reply,
            first_token_ms=None if first_token_at is None else round((first_token_at - sent) * 1000, 1),
            reply_ms=round((time.monotonic() - sent) * 1000, 1),
            context_messages=len(self.context.messages),
            fault=fault,
        )
