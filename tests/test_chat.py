"""`voxbot chat` as a user runs it: the real CLI in a subprocess, on the real SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    # `python -m` from the repository root: this checkout's bot, not an installed one.
    run = subprocess.run(
        [sys.executable, "-m", "bot.cli", "chat", *args],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, input=stdin,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_chat_answers_each_line_in_one_conversation_as_json():
    """Lines given on the command line are one conversation: the context grows by an exchange each."""
    run = _chat("--json", "What is the capital of France?", "Thank you!")

    replies = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["user"] for r in replies] == ["What is the capital of France?", "Thank you!"]
    assert "paris" in replies[0]["reply"].lower(), replies[0]
    assert all(r["reply"].strip() and r["fault"] is None for r in replies), replies
    assert [r["context_messages"] for r in replies] == [2, 4]
    assert all(0 < r["first_token_ms"] <= r["reply_ms"] for r in replies), replies


def test_chat_reads_a_script_from_stdin_and_skips_blank_lines():
    """A script piped in: one reply per non-blank line, and the same answer as on the command line."""
    piped = _chat(stdin="What is the capital of France?\n\n   \nThank you!\n")
    given = _chat("What is the capital of France?")

    lines = piped.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("bot> ") for line in lines), lines
    assert lines[0].split("  [")[0] == given.stdout.splitlines()[0].split("  [")[0]  # greedy: the same reply
    assert "you>" not in piped.stdout  # no prompt when nobody is typing
