"""The whole bot in one place: the data path from the user's audio to the bot's voice.

    transport.input() -> stt -> user aggregator (VAD, turns, barge-in)
      -> reply floor -> responder -> tts -> transport.output() -> assistant aggregator

and `voxbot chat`'s, the same brain without ears or voice:

    typed line -> user aggregator -> responder -> reply collector -> assistant aggregator
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.observers.base_observer import BaseObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.empty_user_turn import EmptyUserTurnConfig
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import (
    SpeechTimeoutUserTurnStopStrategy,
    TurnAnalyzerUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from bot.config import Config
from bot.models import Models
from processors.barge_in import BargeInUserTurnStartStrategy
from processors.bot_voice import BotVoice, PlaybackMonitor
from processors.kokoro_tts import KokoroTTSService
from processors.preemptive import PreemptiveUserTurnStopStrategy
from processors.reply_floor import ReplyFloor
from processors.responder import LlamaCppLLMService
from processors.speech_onset import OnsetSileroVADAnalyzer
from processors.voxtral_remote_stt import VoxtralRemoteSTTService
from processors.whisper_stt import WhisperSTTService


@dataclass
class BotSession:
    """One conversation: the pipeline worker to run and the context it keeps."""

    worker: PipelineWorker
    context: LLMContext
    assistant: LLMAssistantAggregator


def build_stt(config: Config, models: Models, *, bot_voice: BotVoice) -> FrameProcessor:
    """The STT service for the engine chosen at load time."""
    if models.stt_engine == "whisper":
        return WhisperSTTService(
            model=models.whisper,
            bot_voice=bot_voice,
            echo_gate=config.turns.echo_gate,
            language=config.stt.language,
            beam_size=config.stt.whisper.beam_size,
            no_speech_prob=config.stt.whisper.no_speech_prob,
            fit_window=config.stt.whisper.fit_window,
            speculate_after_secs=config.stt.whisper.speculate_after_secs,
            budget=models.budget,
            trailing_silence_secs=config.stt.trailing_silence_secs,
            # Its speculative transcript starts a preemptive reply.
            enable_eager_end_of_turn=config.turns.preemptive,
            preemptive_max_speech_secs=config.turns.preemptive_max_speech_secs,
        )
    if models.stt_engine == "voxtral":
        # torch and transformers are the optional `voxtral` extra: imported only when chosen.
        from processors.voxtral_stt import VoxtralSTTService

        return VoxtralSTTService(
            model=models.voxtral,
            language=config.stt.language,
            max_new_tokens=config.stt.voxtral.max_new_tokens,
            trailing_silence_secs=config.stt.trailing_silence_secs,
        )
    if models.stt_engine == "voxtral_remote":
        remote = config.stt.remote
        return VoxtralRemoteSTTService(
            base_url=remote.base_url,
            model=remote.model,
            api_key=remote.api_key,
            language=config.stt.language,
            timeout_s=remote.timeout_s,
            trailing_silence_secs=config.stt.trailing_silence_secs,
        )
    raise ValueError(f"stt engine {models.stt_engine!r} is not available in this build")


def build_responder(config: Config, models: Models) -> FrameProcessor:
    """The response generator: local GGUF, any OpenAI-compatible server, or Voxtral itself."""
    if config.llm.engine == "llama_cpp":
        return LlamaCppLLMService(
            llm=models.llm,
            lock=models.llm_lock,
            budget=models.budget,
            system_prompt=config.llm.system_prompt,
            max_tokens=config.llm.max_tokens,
            temperature=config.llm.temperature,
            repeat_penalty=config.llm.llama_cpp.repeat_penalty,
            examples=config.llm.llama_cpp.examples,
            # A preemptive reply's text goes on to the TTS, which holds its first audio.
            speculation_held_downstream=True,
        )
    if config.llm.engine == "openai":
        from processors.openai_llm import RemoteLLMService

        return RemoteLLMService(
            base_url=config.llm.openai.base_url,
            api_key=config.llm.openai.api_key,
            timeout_s=config.llm.openai.timeout_s,
            context_window=config.llm.openai.context_window,
            settings=RemoteLLMService.Settings(
                model=config.llm.openai.model,
                system_instruction=config.llm.system_prompt,
                max_tokens=config.llm.max_tokens,
                temperature=config.llm.temperature,
            ),
        )
    if config.llm.engine == "voxtral":
        from processors.voxtral_responder import VoxtralLLMService

        return VoxtralLLMService(
            model=models.voxtral,
            system_prompt=config.llm.system_prompt,
            max_tokens=config.llm.max_tokens,
            temperature=config.llm.temperature,
            speculation_held_downstream=True,
        )
    raise ValueError(f"llm.engine {config.llm.engine!r} is not available in this build")


def build_turn_strategies(config: Config, *, bot_voice: BotVoice, vad: OnsetSileroVADAnalyzer) -> UserTurnStrategies:
    """When a user turn starts (and may interrupt the bot) and when it ends."""
    turns = config.turns
    if turns.barge_in == "words":
        start = [
            BargeInUserTurnStartStrategy(
                bot_voice=bot_voice,
                min_words=turns.barge_in_min_words,
                min_secs=turns.barge_in_min_secs,
                vad_start_secs=config.vad.start_secs,
                pause_playback=turns.pause_on_speech,
                resume_after_secs=turns.resume_after_secs,
                max_pause_secs=turns.max_pause_secs,
                echo_gate=turns.echo_gate,
                vad=vad,
                enable_interruptions=turns.interruptions,
            )
        ]
    else:
        start = [VADUserTurnStartStrategy(enable_interruptions=turns.interruptions)]
    if turns.stop_strategy == "smart_turn":
        from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

        stop = [TurnAnalyzerUserTurnStopStrategy(turn_analyzer=LocalSmartTurnAnalyzerV3())]
    elif turns.preemptive:
        # The speech timeout ends the turn; Whisper's early transcript starts the reply before it.
        stop = [
            PreemptiveUserTurnStopStrategy(
                user_speech_timeout=turns.user_speech_timeout, max_attempts=turns.preemptive_max_attempts
            )
        ]
    else:
        stop = [SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=turns.user_speech_timeout)]
    return UserTurnStrategies(start=start, stop=stop)


def import_session_modules() -> None:
    """Import what pipecat imports lazily when the first session is built.

    Its LLM adapter pulls in the openai package (1.7 s on a 2-core AMD EPYC): done at start-up,
    the first caller's words do not queue behind it.
    """
    importlib.import_module("pipecat.adapters.llm.services.open_ai_adapter")


def build_pipeline(
    *,
    config: Config,
    transport: BaseTransport,
    models: Models,
    observers: list[BaseObserver] | None = None,
    extra_processors: list[FrameProcessor] | None = None,
) -> BotSession:
    """Assemble one session's pipeline around shared, already loaded models.

    Called on the event loop between accepting a socket and reading it: a message that
    arrives meanwhile waits unread in the socket (in a worker thread it would meet a
    protocol that is not yet listening).
    """
    context = LLMContext()
    # What the bot says and plays, so its echo in the user's microphone is not a barge-in.
    bot_voice = BotVoice()
    vad = OnsetSileroVADAnalyzer(
        params=VADParams(
            confidence=config.vad.confidence,
            start_secs=config.vad.start_secs,
            stop_secs=config.vad.stop_secs,
            min_volume=config.vad.min_volume,
        )
    )
    user, assistant = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=vad,
            user_turn_strategies=build_turn_strategies(config, bot_voice=bot_voice, vad=vad),
            # With barge-in on words a turn with no words never cuts a reply, so there is
            # nothing to recover by asking the LLM to guess (a failed transcription says
            # its own apology, processors/apology.py); on voice alone pipecat's recovery stays.
            empty_user_turn=None if config.turns.barge_in == "words" else EmptyUserTurnConfig(),
        ),
    )
    tts = KokoroTTSService(
        kokoro=models.kokoro_stream,
        budget=models.budget,
        speed_model=models.synthesis_speed,
        voice=config.tts.voice,
        lang=config.tts.lang,
        speed=config.tts.speed,
        peak_limit=config.tts.peak_limit,
        first_clause_words=config.tts.first_clause_words,
        first_chunk_frames=config.tts.first_chunk_frames,
        min_chunk_frames=config.tts.min_chunk_frames,
        max_buffer_secs=config.tts.max_buffer_secs,
    )
    pipeline = Pipeline(
        [
            transport.input(),
            build_stt(config, models, bot_voice=bot_voice),
            user,
            ReplyFloor(statement_wait_secs=config.turns.statement_wait_secs),
            build_responder(config, models),
            tts,
            transport.output(),
            PlaybackMonitor(bot_voice=bot_voice),
            assistant,
            *(extra_processors or []),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=config.audio.in_sample_rate,
            audio_out_sample_rate=config.audio.out_sample_rate,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        observers=observers or [],
        enable_rtvi=False,
        idle_timeout_secs=config.server.session_timeout_s,
    )
    return BotSession(worker=worker, context=context, assistant=assistant)


def build_chat(*, config: Config, models: Models, collector: FrameProcessor) -> BotSession:
    """A text conversation through the voice bot's responder and context handling.

    Args:
        collector: Sees each reply's frames before the assistant aggregator keeps its text.
    """
    context = LLMContext()
    # Typed lines arrive as whole messages: no VAD, no turn model to load.
    user, assistant = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            user_turn_strategies=UserTurnStrategies(
                start=[VADUserTurnStartStrategy()], stop=[SpeechTimeoutUserTurnStopStrategy()]
            )
        ),
    )
    pipeline = Pipeline([user, build_responder(config, models), collector, assistant])
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(enable_metrics=True),
        enable_rtvi=False,
        cancel_on_idle_timeout=False,
    )
    return BotSession(worker=worker, context=context, assistant=assistant)

