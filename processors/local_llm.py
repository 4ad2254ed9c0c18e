"""What every in-process language model service shares: settings, framing, errors."""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings


class LocalLLMService(LLMService):
    """A model running in this process answers each context, streamed token by token.

    Subclasses implement :meth:`_respond`, which pushes the reply's text; this
    class frames it with the response start/end frames and metrics, and turns a
    failure into an error frame so the session goes on.
    """

    engine_name = "local model"

    def __init__(
        self,
        *,
        model_name: str,
        system_prompt: str,
        max_tokens: int,
        temperature: float,
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

    def can_generate_metrics(self) -> bool:
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            await self.push_frame(LLMFullResponseStartFrame())
            await self.start_processing_metrics()
            try:
                await self._respond(frame.context)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self.push_error(error_msg=f"{self.engine_name} generation failed: {e}", exception=e)
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

    async def _respond(self, context: LLMContext):
        raise NotImplementedError
