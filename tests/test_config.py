"""Typed config: the shipped config.yaml, VOXBOT_* overrides, and errors that name the key."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_YAML = REPO / "config.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Overrides from the developer's shell must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("VOXBOT_"):
            monkeypatch.delenv(name)


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_config_is_the_defaults():
    """config.yaml documents every knob with the embedded offline defaults, and loads."""
    config = load_config(CONFIG_YAML)

    assert config.model_dump() == Config().model_dump()
    assert config.stt.engine == "auto"
    assert config.llm.engine == "llama_cpp"
    assert config.tts.voice == "jf_alpha"
    assert config.audio.in_sample_rate == 16000 and config.audio.out_sample_rate == 24000


def test_environment_overrides_nested_keys(monkeypatch, tmp_path):
    """VOXBOT_A__B__C beats the YAML, and the YAML's sibling keys survive the merge."""
    path = _yaml(tmp_path, "stt:\n  engine: auto\n  language: de\nllm:\n  max_tokens: 20\n  llama_cpp:\n    n_ctx: 1024\n")
    monkeypatch.setenv("VOXBOT_STT__ENGINE", "whisper")
    monkeypatch.setenv("VOXBOT_LLM__LLAMA_CPP__N_THREADS", "1")

    config = load_config(path)

    assert config.stt.engine == "whisper"
    assert config.llm.llama_cpp.n_threads == 1
    assert config.stt.language == "de"
    assert config.llm.max_tokens == 20
    assert config.llm.llama_cpp.n_ctx == 1024


def test_environment_null_clears_an_optional_key(monkeypatch):
    monkeypatch.setenv("VOXBOT_STT__WHISPER__SPECULATE_AFTER_SECS", "null")
    assert load_config().stt.whisper.speculate_after_secs is None


def test_voxbot_config_names_the_file(monkeypatch, tmp_path):
    path = _yaml(tmp_path, "server:\n  port: 9123\n")
    monkeypatch.setenv("VOXBOT_CONFIG", str(path))
    assert load_config().server.port == 9123


@pytest.mark.parametrize(
    "text, key",
    [
        ("stt:\n  engine: nonsense\n", "stt.engine"),
        ("server:\n  port: -1\n", "server.port"),
        ("tts:\n  voicee: jf_alpha\n", "tts.voicee"),
        ("llm:\n  llama_cpp:\n    n_threads: 0\n", "llm.llama_cpp.n_threads"),
        ("audio:\n  in_sample_rate: 44100\n", "audio.in_sample_rate"),
    ],
)
def test_bad_value_raises_config_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(_yaml(tmp_path, text))
    assert key in str(err.value)


def test_bad_environment_value_names_the_key(monkeypatch):
    monkeypatch.setenv("VOXBOT_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(CONFIG_YAML)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_serve_with_bad_config_fails_fast(tmp_path):
    """`voxbot serve` stops before serving with the key in its message and no traceback."""
    path = _yaml(tmp_path, "server:\n  port: 8000\nstt:\n  engine: nonsense\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBOT_")} | {"HF_HUB_OFFLINE": "1"}

    start = time.monotonic()
    # `python -m bot.cli` is the `voxbot` entry point, run from this checkout.
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "serve", "--config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start

    assert proc.returncode != 0
    assert "stt.engine" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "serving on" not in proc.stdout
    assert elapsed < 30, elapsed
