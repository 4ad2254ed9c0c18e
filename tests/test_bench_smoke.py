"""`voxbot bench --json` end to end, as a user runs it: the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str, tmp_path: Path, timeout: float) -> dict:
    # `python -m` from the repository root: this checkout's bot, not an installed one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VOXBOT_TRACING__DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "bot.cli", "bench", "-s", "qa_capital", "--json", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_bench_json_summary(tmp_path):
    summary = _bench(tmp_path=tmp_path, timeout=300)

    assert {"ours", "rss_mb", "sessions"} <= set(summary)
    ours = summary["ours"]
    assert {"p50_ms", "p95_ms", "turns"} <= set(ours)
    assert ours["turns"] >= 1
    assert 0 < ours["p50_ms"] <= ours["p95_ms"]
    # Process CPU time over wall time: every model thread counts, and no more than the machine has.
    assert 0.05 < ours["cpu_cores_busy"] <= summary["machine"]["cores"], ours["cpu_cores_busy"]
    assert summary["rss_mb"] > 0
    assert summary["sessions"] == 1
    assert [Path(p).parent for p in summary["traces"]] == [tmp_path]


def test_bench_json_with_the_stock_baseline(tmp_path):
    """The stock pipecat bot on the same models (its llama.cpp server starts too): ~40 s here."""
    summary = _bench("--baseline", "stock", tmp_path=tmp_path, timeout=400)

    assert {"ours", "stock", "ratio_p50"} <= set(summary)
    assert {"p50_ms", "p95_ms", "turns"} <= set(summary["stock"])
    assert summary["stock"]["p50_ms"] > 0 and summary["ratio_p50"] > 0


def test_a_soak_goes_round_the_scenarios_until_its_minutes_are_up(tmp_path):
    summary = _bench("--minutes", "0.3", tmp_path=tmp_path, timeout=300)

    ours = summary["ours"]
    assert ours["rounds"] >= 2 and ours["turns"] == ours["rounds"], ours
    assert ours["unanswered_turns"] == 0
    soak = summary["soak"]
    assert soak["minutes"] == 0.3 and soak["rss_end_mb"] > 0
    assert soak["rss_growth"] == round(soak["rss_end_mb"] / soak["rss_after_first_round_mb"] - 1, 3)


def _turn(user_speech: tuple[float, float], *, answered_at: float | None):
    from bot.conversation import TurnResult
    from bot.tracing import TurnTrace

    trace = TurnTrace(
        session_id="s", turn=0, user_speech_start_ms=user_speech[0], user_speech_end_ms=user_speech[1],
        first_audio_out_ms=answered_at,
    )  # fmt: skip
    return TurnResult(
        user_text="a question", bot_text="", voice_to_voice_ms=None, trace_voice_to_voice_ms=None,
        interrupted=False, trace=trace,
    )  # fmt: skip


def test_a_question_left_in_silence_is_unanswered_and_one_asked_again_at_once_is_merged():
    from bot.bench import unanswered

    # Asked again 0.45 s later (two_quick_turns): one reply answers both.
    assert unanswered([_turn((500, 2100), answered_at=None), _turn((2550, 4000), answered_at=5000)]) == 0
    # Waited 3 s in silence, then asked something else: the first went unanswered.
    assert unanswered([_turn((500, 2100), answered_at=None), _turn((5100, 6000), answered_at=7000)]) == 1
    # The last question, never answered.
    assert unanswered([_turn((500, 2100), answered_at=3000), _turn((5100, 6000), answered_at=None)]) == 1
