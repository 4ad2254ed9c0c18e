"""What every in-process language model service shares: settings, framing, errors."""

from __future__ import annotations

import asyncio

from loguru import logger

from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings

from processors.apology import APOLOGY, CUT_SHORT, FaultNoticeFrame
from processors.preemptive import PreemptionWasteFrame, SpeculativeReplyFrame


class LocalLLMService(LLMService):
    """A model running in this process answers each context, streamed token by token.

    Subclasses implement :meth:`_respond`, which pushes the reply's text; this
    class frames it with the response start/end frames and metrics, and turns a
    failure into an error frame so the session goes on.

    A speculative response (a preemptive reply, on a turn not yet confirmed) is held
    by pipecat's gate in this service, unless ``speculation_held_downstream``: then its
    text streams on to a TTS that holds the audio instead, so the first audio can be
    made before the turn is confirmed. Either way a withdrawn one stops at its next token.
    """

    engine_name = "local model"

    def __init__(
        self,
        *,
        model_name: str,
        system_prompt: str,
        max_tokens: int,
        temperature: float,
        speculation_held_downstream: bool = False,
        **kwargs,
    ):
        super().__init__(
            settings=LLMSettings(
                model=model_name,
                system_instruction=system_prompt,
                temperature=temperature,
                max_tokens=max_tokens,
                top_p=None,
                top_k=None,
                frequency_penalty=None,
                presence_penalty=None,
                seed=None,
                filter_incomplete_user_turns=False,
                user_turn_completion_config=None,
            ),
            **kwargs,
        )
        self._system_prompt = system_prompt
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._held_downstream = speculation_held_downstream
        self._speculative = False  # the response in progress answers an unconfirmed turn
        self._tokens = 0  # tokens of the response in progress

    def can_generate_metrics(self) -> bool:
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, EagerEndOfTurnCancelFrame) and self._speculative:
            # Before the base class, whose gate no longer knows this reply is speculative.
            self._speculative = False
            logger.debug(f"{self}: preemptive reply cancelled after {self._tokens} tokens")
            await self._start_interruption()
            await self.stop_all_metrics()
            await self.push_frame(PreemptionWasteFrame(tokens=self._tokens))
        elif isinstance(frame, (UserStoppedSpeakingFrame, InterruptionFrame)):
            self._speculative = False
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            # The gate knows whether the turn ended before this inference reached it.
            if self._held_downstream and self._speculation_gate.is_speculating:
                self._speculation_gate.begin_speculation(False)
                self._speculative = True
                await self.push_frame(SpeculativeReplyFrame())
            self._tokens = 0
            await self.push_frame(LLMFullResponseStartFrame())
            await self.start_processing_metrics()
            try:
                await self._respond(frame.context)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self.push_error(error_msg=f"{self.engine_name} generation failed: {e}", exception=e)
                # Said, not left in silence; the apology joins the context like any reply.
                await self.push_frame(FaultNoticeFrame(message=f"the reply failed: {e}"))
                await self._push_llm_text(CUT_SHORT if self._tokens else APOLOGY)
            finally:
                await self.stop_processing_metrics()
                await self.push_frame(LLMFullResponseEndFrame())
        else:
            await self.push_frame(frame, direction)

    async def _openai_messages(self, context: LLMContext) -> list[dict]:
        """The context as OpenAI-style messages, the system prompt first."""
        params = await self.get_llm_adapter().get_llm_invocation_params(
            context, system_instruction=self._system_prompt, convert_developer_to_user=True
        )
        return list(params["messages"])

    async def _push_llm_text(self, text: str):
        self._tokens += 1
        await super()._push_llm_text(text)

    async def _respond(self, context: LLMContext):
        raise NotImplementedError
