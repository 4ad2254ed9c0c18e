"""Loads each model once per process; every session shares them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger

from bot import assets
from bot.config import Config
from processors.compute_budget import ComputeBudget


@dataclass
class Models:
    """The loaded models and what was chosen, for the pipeline and /status."""

    stt_engine: str
    stt_reason: str
    stt_device: str | None = None
    stt_dtype: str | None = None
    whisper: Any = None
    # processors.voxtral_stt.VoxtralModel: the STT and, with llm.engine voxtral, the responder.
    voxtral: Any = None
    llm: Any = None
    llm_lock: threading.Lock = field(default_factory=threading.Lock)
    kokoro: Any = None
    # processors.kokoro_stream.KokoroStream: Kokoro split at its decoder, for streamed synthesis.
    kokoro_stream: Any = None
    # How fast this machine synthesizes (processors.synthesis_speed), measured at load.
    synthesis_speed: Any = None
    # Who computes next on the cores (processors.compute_budget), shared by every session.
    budget: ComputeBudget = field(default_factory=ComputeBudget)
    load_seconds: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "stt": {
                "engine": self.stt_engine,
                "reason": self.stt_reason,
                "device": self.stt_device,
                "dtype": self.stt_dtype,
                "gpu_memory_bytes": (
                    self.voxtral.gpu_memory_bytes() if self.voxtral is not None else None
                ),
            },
            "tts": {
                "real_time_factor": (
                    round(self.synthesis_speed.real_time_factor, 3) if self.synthesis_speed else None
                ),
                "speed": self.synthesis_speed.describe() if self.synthesis_speed else None,
            },
            "load_seconds": self.load_seconds,
        }


def choose_stt_engine(config: Config) -> tuple[str, str]:
    """Pick the STT engine and say why, so the start-up log explains the choice.

    ``auto`` takes Voxtral only where it is fast (a CUDA GPU) and its weights are
    already on this machine; otherwise the bundled Whisper, which always works.
    """
    engine = config.stt.engine
    if engine != "auto":
        return engine, f"stt.engine is set to {engine}"
    whisper = "the bundled Whisper tiny.en (CPU)"
    voxtral = config.stt.voxtral
    if voxtral.device == "cpu":
        return "whisper", f"auto: stt.voxtral.device is cpu (too slow for Voxtral); using {whisper}"
    try:
        import torch
    except ImportError:
        return "whisper", f"auto: torch is not installed (the voxtral extra); using {whisper}"
    if not torch.cuda.is_available():
        return "whisper", f"auto: no CUDA GPU for Voxtral; using {whisper}"
    try:
        path = assets.voxtral_model_dir(model_id=voxtral.model_id, configured=voxtral.model_path)
    except assets.MissingModelError as e:
        return "whisper", f"auto: CUDA GPU found but {e} Using {whisper}"
    return "voxtral", f"auto: CUDA GPU and Voxtral weights at {path}"


def _timed(name: str, seconds: dict[str, float], fn):
    start = time.perf_counter()
    result = fn()
    seconds[name] = round(time.perf_counter() - start, 3)
    logger.info(f"Loaded {name} in {seconds[name]:.2f} s")
    return result


def load_whisper(config: Config):
    from faster_whisper import WhisperModel

    path = assets.whisper_model_dir(config.stt.whisper.model_path)
    return WhisperModel(
        str(path),
        device="cpu",
        compute_type=config.stt.whisper.compute_type,
        cpu_threads=config.stt.whisper.cpu_threads,
        local_files_only=True,
    )


def load_llama(config: Config):
    from llama_cpp import Llama

    path = assets.llm_gguf_path(config.llm.llama_cpp.model_path)
    return Llama(
        model_path=str(path),
        n_ctx=config.llm.llama_cpp.n_ctx,
        n_threads=config.llm.llama_cpp.n_threads,
        verbose=False,
    )


def load_voxtral(config: Config):
    """Voxtral through transformers from a local folder or the HF cache: bf16 on CUDA, fp32 on CPU.

    Raises:
        assets.MissingModelError: the weights are not on this machine; the message names the fix.
        ImportError: torch or transformers (the ``voxtral`` extra) is not installed.
        ValueError: stt.voxtral.device is cuda but torch sees no CUDA GPU.
    """
    voxtral = config.stt.voxtral
    path = assets.voxtral_model_dir(model_id=voxtral.model_id, configured=voxtral.model_path)
    try:
        import torch
        from transformers import AutoProcessor, VoxtralForConditionalGeneration

        from processors.voxtral_stt import VoxtralModel
    except ImportError as e:
        raise ImportError(
            f"Voxtral needs the voxtral extra: pip install 'voxbot[voxtral]' ({e})"
        ) from e

    cuda = torch.cuda.is_available()
    if voxtral.device == "cuda" and not cuda:
        raise ValueError("stt.voxtral.device is cuda but torch sees no CUDA GPU")
    device = torch.device("cuda" if cuda and voxtral.device != "cpu" else "cpu")
    # Voxtral ships in bf16 (half of fp32's GPU memory); CPUs lack fast bf16 kernels.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = VoxtralForConditionalGeneration.from_pretrained(
        path, dtype=dtype, device_map=str(device), local_files_only=True
    ).eval()
    logger.info(f"Voxtral {voxtral.model_id} from {path} on {device} ({dtype})")
    return VoxtralModel(
        model=model, processor=processor, model_id=voxtral.model_id, device=device, dtype=dtype
    )


def load_kokoro(config: Config):
    import onnxruntime as ort
    from kokoro_onnx import Kokoro

    model = assets.kokoro_model_path(config.tts.model_path)
    voices = assets.kokoro_voices_path(config.tts.voices_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.tts.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    kokoro = Kokoro.from_session(session, str(voices))
    if config.tts.voice not in kokoro.voices:
        raise ValueError(
            f"tts.voice '{config.tts.voice}' is not in {voices}; choose one of {sorted(kokoro.voices)}"
        )
    return kokoro


def load_kokoro_stream(config: Config, kokoro):
    """Kokoro cut at its decoder's inputs (cut once, then cached), sharing ``kokoro``'s voices."""
    from processors.kokoro_stream import load_kokoro_stream as load

    front, decoder = assets.kokoro_split_paths(assets.kokoro_model_path(config.tts.model_path))
    return load(kokoro=kokoro, front_path=front, decoder_path=decoder, threads=config.tts.threads)


def load_models(config: Config) -> Models:
    """Load (and warm) every model the config asks for.

    Raises:
        assets.MissingModelError: a model's weights are absent; the message names the fix.
    """
    engine, reason = choose_stt_engine(config)
    logger.info(f"STT engine: {engine} ({reason})")
    models = Models(stt_engine=engine, stt_reason=reason)
    seconds = models.load_seconds
    if engine == "whisper":
        models.whisper = _timed("whisper", seconds, lambda: load_whisper(config))
        models.stt_device, models.stt_dtype = "cpu", config.stt.whisper.compute_type
    if engine == "voxtral" or config.llm.engine == "voxtral":
        # One Voxtral in memory, whether it hears, answers or both.
        models.voxtral = _timed("voxtral", seconds, lambda: load_voxtral(config))
    if engine == "voxtral":
        models.stt_device = str(models.voxtral.device)
        models.stt_dtype = str(models.voxtral.dtype).removeprefix("torch.")
    if engine == "voxtral_remote":
        models.stt_device = f"remote: {config.stt.remote.base_url}"
    if config.llm.engine == "llama_cpp":
        models.llm = _timed("llama_cpp", seconds, lambda: load_llama(config))
    models.kokoro = _timed("kokoro", seconds, lambda: load_kokoro(config))
    models.kokoro_stream = _timed("kokoro_stream", seconds, lambda: load_kokoro_stream(config, models.kokoro))
    _timed("warmup", seconds, lambda: warm_up(models, config))
    models.synthesis_speed = _timed(
        "synthesis_speed", seconds, lambda: models.kokoro_stream.measure_speed(voice=config.tts.voice)
    )
    logger.info(models.synthesis_speed.describe())
    return models


def load_responder_models(config: Config) -> Models:
    """Only what the responder needs: `voxbot chat` answers in seconds, with no ears or voice.

    Raises:
        assets.MissingModelError: the model's weights are absent; the message names the fix.
    """
    models = Models(stt_engine="none", stt_reason="text chat: no speech recognition")
    if config.llm.engine == "llama_cpp":
        models.llm = _timed("llama_cpp", models.load_seconds, lambda: load_llama(config))
    if config.llm.engine == "voxtral":
        models.voxtral = _timed("voxtral", models.load_seconds, lambda: load_voxtral(config))
    return models


def warm_up(models: Models, config: Config) -> None:
    """Run each model once so the first user does not pay for lazy initialization."""
    if models.whisper is not None:
        segments, _ = models.whisper.transcribe(
            np.zeros(16000, dtype=np.float32), language=config.stt.language, beam_size=1
        )
        list(segments)
    if models.voxtral is not None:
        models.voxtral.transcribe(
            np.zeros(16000, dtype=np.float32), language=config.stt.language, max_new_tokens=1
        )
    if models.llm is not None:
        with models.llm_lock:
            models.llm.create_chat_completion(
                messages=[
                    {"role": "system", "content": config.llm.system_prompt},
                    {"role": "user", "content": "Hi"},
                ],
                max_tokens=1,
            )
    # Kokoro is warmed by measuring its speed (load_models), on the halves that serve.
