"""`voxbot trace`: latency traces drawn to a PNG, and clear errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bot.waterfall import TraceFileError, load_traces, render

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _turn(turn: int, *, at: float, **changes) -> dict:
    """A trace line like bot/tracing.py writes, ``at`` ms into the session."""
    record = {
        "session_id": "synthetic",
        "turn": turn,
        "user_speech_start_ms": at,
        "vad_stop_ms": at + 1600,
        "user_speech_end_ms": at + 1400,
        "transcript_ms": at + 1750,
        "generation_start_ms": at + 1760,
        "first_token_ms": at + 1900,
        "tts_start_ms": at + 2000,
        "first_tts_audio_ms": at + 2300,
        "first_audio_out_ms": at + 2310,
        "bot_end_ms": at + 4500,
        "interrupted": False,
        "user_text": "What is the capital of France?",
        "bot_text": "The capital of France is Paris.",
        "stages": {"endpointing_ms": 350.0},
        "voice_to_voice_ms": 910.0,
    }
    record.update(changes)
    return record


@pytest.fixture
def trace_file(tmp_path) -> Path:
    """Four turns: answered, interrupted, with stages missing, and unanswered."""
    lines = [
        _turn(0, at=1000),
        _turn(1, at=6000, interrupted=True, bot_end_ms=8900),
        _turn(2, at=11000, tts_start_ms=None, first_tts_audio_ms=None),
        _turn(3, at=16000, generation_start_ms=None, first_token_ms=None, tts_start_ms=None,
              first_tts_audio_ms=None, first_audio_out_ms=None, bot_end_ms=None, voice_to_voice_ms=None),
    ]  # fmt: skip
    del lines[2]["transcript_ms"]  # an older or partial writer: the key is absent
    path = tmp_path / "synthetic.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _assert_png(path: Path, *, min_height: int) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert 20_000 < path.stat().st_size < 5_000_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 1000 and height >= min_height


def test_render_draws_every_kind_of_turn(trace_file, tmp_path):
    out = tmp_path / "out" / "waterfall.png"
    drawn = render(sessions=load_traces([trace_file]), out=out)

    assert drawn == {"turns": 4, "answered": 3, "p50_ms": 910.0, "p95_ms": 910.0}
    _assert_png(out, min_height=600)


def test_render_without_any_answer(tmp_path):
    path = tmp_path / "silent.jsonl"
    record = {"session_id": "silent", "turn": 0, "user_speech_start_ms": None, "voice_to_voice_ms": None}
    path.write_text(json.dumps(record) + "\n")
    drawn = render(sessions=load_traces([path]), out=tmp_path / "silent.png")

    assert drawn["answered"] == 0 and drawn["p50_ms"] is None
    _assert_png(tmp_path / "silent.png", min_height=300)


def test_load_traces_keeps_sessions_and_runs_apart(trace_file, tmp_path):
    other = tmp_path / "other.jsonl"
    # The same session id run twice appends to one file.
    other.write_text("".join(json.dumps(_turn(t, at=1000 * t, session_id="bench-x")) + "\n" for t in (0, 1, 0)))
    sessions = load_traces([trace_file, other])

    assert {k: len(v) for k, v in sessions.items()} == {"synthetic": 4, "bench-x": 2, "bench-x (run 2)": 1}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such trace file"),
        ('{"session_id": "s", "turn": 0}\n{not json\n', ":2: not JSON"),
        ('["a", "list"]\n', ":1: not a turn trace"),
        ('{"session_id": "s"}\n', ":1: not a turn trace"),
        ('{"session_id": "s", "turn": 0, "vad_stop_ms": "soon"}\n', ":1: vad_stop_ms is not a number"),
        ("\n\n", "no turns"),
    ],
)
def test_load_traces_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TraceFileError, match=message):
        load_traces([path])


def _voxbot(*args: str) -> subprocess.CompletedProcess:
    # `python -m` from the repository root: this checkout's bot, not an installed one.
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_trace_writes_the_png(trace_file, tmp_path):
    out = tmp_path / "cli.png"
    run = _voxbot("trace", str(trace_file), "--out", str(out))

    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"wrote {out}: 4 turns, 3 answered, p50 910 ms, p95 910 ms"
    _assert_png(out, min_height=600)


@pytest.mark.parametrize("problem", ["malformed", "missing"])
def test_cli_trace_bad_file_is_one_clear_line(tmp_path, problem):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(_turn(0, at=0)) + "\n")
    bad = tmp_path / "bad.jsonl"
    if problem == "malformed":
        bad.write_text("this is not a trace\n")
    run = _voxbot("trace", str(good), str(bad))

    expected = f"{bad}:1: not JSON (Expecting value)" if problem == "malformed" else f"no such trace file: {bad}"
    assert run.returncode == 2
    assert run.stderr.strip() == f"voxbot trace: {expected}"
    assert run.stdout == ""
    assert not good.with_suffix(".png").exists()
