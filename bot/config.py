"""Typed configuration: config.yaml first, then VOXBOT_* environment overrides.

A nested key is overridden with a double underscore, e.g.
``VOXBOT_STT__ENGINE=whisper`` or ``VOXBOT_LLM__LLAMA_CPP__N_THREADS=4``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG_PATH = Path("config.yaml")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_sessions: int = Field(8, ge=1)
    session_timeout_s: int = Field(900, ge=1)
    drain_s: float = Field(10.0, ge=0)
    admit_max_voice_to_voice_ms: float | None = Field(2000.0, gt=0)
    admit_max_loop_lag_ms: float = Field(250.0, gt=0)
    max_message_bytes: int = Field(64_000, ge=1024)
    allowed_origins: list[str] = Field(default_factory=list)
    auth_token: SecretStr | None = None
    allow_anonymous: bool = False


class AudioConfig(_Section):
    in_sample_rate: Literal[8000, 16000] = 16000
    out_sample_rate: int = Field(24000, ge=8000, le=48000)


class VADConfig(_Section):
    confidence: float = Field(0.7, gt=0, le=1)
    start_secs: float = Field(0.1, ge=0)
    stop_secs: float = Field(0.2, ge=0)
    min_volume: float = Field(0.3, ge=0, le=1)


class TurnsConfig(_Section):
    stop_strategy: Literal["speech_timeout", "smart_turn"] = "speech_timeout"
    user_speech_timeout: float = Field(0.05, ge=0)
    statement_wait_secs: float = Field(0.8, ge=0)
    interruptions: bool = True
    barge_in: Literal["words", "vad"] = "words"
    barge_in_min_words: int = Field(1, ge=1)
    barge_in_min_secs: float = Field(0.6, ge=0)
    echo_gate: float = Field(0.5, ge=0, le=1)
    pause_on_speech: bool = True
    resume_after_secs: float = Field(0.5, ge=0)
    max_pause_secs: float = Field(2.0, gt=0)
    preemptive: bool = True
    preemptive_max_attempts: int = Field(2, ge=1)
    preemptive_max_speech_secs: float = Field(10.0, gt=0)


class WhisperConfig(_Section):
    model_path: Path | None = None
    compute_type: str = "int8"
    beam_size: int = Field(1, ge=1)
    cpu_threads: int = Field(2, ge=1)
    no_speech_prob: float = Field(0.6, ge=0, le=1)
    fit_window: bool = True
    speculate_after_secs: float | None = Field(0.06, gt=0)


class VoxtralConfig(_Section):
    model_id: str = "mistralai/Voxtral-Mini-3B-2507"
    model_path: Path | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    max_new_tokens: int = Field(128, ge=1)


class RemoteSTTConfig(_Section):
    base_url: str = "http://127.0.0.1:8001/v1"
    model: str = "mistralai/Voxtral-Mini-3B-2507"
    api_key: str = "EMPTY"
    timeout_s: float = Field(10.0, gt=0)


class STTConfig(_Section):
    engine: Literal["auto", "whisper", "voxtral", "voxtral_remote"] = "auto"
    language: str | None = "en"
    trailing_silence_secs: float = Field(0.1, ge=0)
    whisper: WhisperConfig = WhisperConfig()
    voxtral: VoxtralConfig = VoxtralConfig()
    remote: RemoteSTTConfig = RemoteSTTConfig()


class LlamaCppConfig(_Section):
    model_path: Path | None = None
    n_ctx: int = Field(2048, ge=256)
    n_threads: int = Field(1, ge=1)
    repeat_penalty: float = Field(1.1, ge=1.0)
    # Exchanges shown to the model before every conversation (processors/responder.py).
    examples: list[tuple[str, str]] = [
        ("What is the capital of Italy?", "The capital of Italy is Rome."),
        ("What's four plus four?", "Four plus four is eight."),
        ("What should I wear today?", "Check the weather first; a light jacket is a safe choice."),
        ("Tell me something fun.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ]


class OpenAIConfig(_Section):
    base_url: str = "http://127.0.0.1:11434/v1"
    model: str = "llama3.2"
    api_key: str = "EMPTY"
    timeout_s: float = Field(10.0, gt=0)
    context_window: int = Field(4096, ge=256)


class LLMConfig(_Section):
    engine: Literal["llama_cpp", "openai", "voxtral"] = "llama_cpp"
    system_prompt: str = (
        "You are a friendly voice assistant. Answer in one or two short, plain sentences. "
        "Never use lists, markdown or emojis."
    )
    max_tokens: int = Field(48, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    llama_cpp: LlamaCppConfig = LlamaCppConfig()
    openai: OpenAIConfig = OpenAIConfig()


class TTSConfig(_Section):
    voice: str = "jf_alpha"
    lang: str = "en-us"
    speed: float = Field(1.0, ge=0.5, le=2.0)
    model_path: Path | None = None
    voices_path: Path | None = None
    threads: int = Field(2, ge=1)
    peak_limit: float = Field(0.95, gt=0, le=1)
    first_clause_words: tuple[int, int] | None = (2, 4)
    first_chunk_frames: int = Field(16, ge=4)
    min_chunk_frames: int = Field(12, ge=4)
    max_buffer_secs: float = Field(30.0, ge=0)


class TwilioConfig(_Section):
    enabled: bool = True
    # Both from the Twilio console; secrets belong in the environment
    # (VOXBOT_TELEPHONY__TWILIO__AUTH_TOKEN) and are never logged.
    account_sid: str | None = None
    auth_token: SecretStr | None = None  # null: webhook signatures unchecked, no REST hang-up
    rest_base_url: str = "https://api.twilio.com"


class TelnyxConfig(_Section):
    enabled: bool = True
    api_key: SecretStr | None = None  # answers calls and hangs up through call control
    public_key: str | None = None  # base64 Ed25519 key from the portal; null: webhooks unchecked
    rest_base_url: str = "https://api.telnyx.com"
    codec: Literal["PCMU", "PCMA"] = "PCMU"
    max_clock_skew_s: float = Field(300.0, gt=0)


class TelephonyConfig(_Section):
    # The URL the carrier calls (what Twilio signs); null: taken from each request's Host.
    public_base_url: str | None = None
    stream_token_ttl_s: float = Field(30.0, gt=0)
    idle_hangup_secs: float | None = Field(30.0, gt=0)
    farewell: str = "Thanks for calling. Goodbye."
    goodbye_words: list[str] = Field(default_factory=lambda: ["goodbye", "bye"])
    hangup_mark_timeout_s: float = Field(3.0, ge=0)
    twilio: TwilioConfig = TwilioConfig()
    telnyx: TelnyxConfig = TelnyxConfig()


class TracingConfig(_Section):
    dir: Path = Path("logs/latency")
    status_turns: int = Field(50, ge=1)


class Config(BaseSettings):
    """Every knob of the bot; defaults are the embedded offline stack."""

    model_config = SettingsConfigDict(
        env_prefix="VOXBOT_",
        env_nested_delimiter="__",
        env_parse_none_str="null",  # VOXBOT_STT__WHISPER__MODEL_PATH=null, as in the YAML
        extra="forbid",
        yaml_file=None,
    )

    server: ServerConfig = ServerConfig()
    audio: AudioConfig = AudioConfig()
    vad: VADConfig = VADConfig()
    turns: TurnsConfig = TurnsConfig()
    stt: STTConfig = STTConfig()
    llm: LLMConfig = LLMConfig()
    tts: TTSConfig = TTSConfig()
    tracing: TracingConfig = TracingConfig()
    telephony: TelephonyConfig = TelephonyConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then the environment, then the YAML file.
        yaml_file = settings_cls.model_config.get("yaml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_config(path: str | Path | None = None, **overrides) -> Config:
    """Load config.yaml (or ``$VOXBOT_CONFIG``) with environment overrides.

    Raises:
        ConfigError: naming every invalid key, so a bad value stops start-up clearly.
    """
    path = Path(path or os.environ.get("VOXBOT_CONFIG") or DEFAULT_CONFIG_PATH)
    if not path.exists() and path != DEFAULT_CONFIG_PATH:
        raise ConfigError(f"config file not found: {path}")

    class _FileConfig(Config):
        model_config = SettingsConfigDict(yaml_file=path if path.exists() else None)

    try:
        return _FileConfig(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid config ({path}): {problems}") from None
