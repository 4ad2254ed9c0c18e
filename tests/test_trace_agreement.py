"""The latency trace agrees with the latency measured on the audio of a real scripted run."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from bot.conversation import run_conversation
from bot.tracing import STAGES, TurnTrace
from tests.conftest import TURN_EVENTS
from transports.scripted import Cue

QUESTION = "What is the capital of France?"
# Trace and audio agree to this: a 20 ms input frame, the first quiet samples of a reply.
AGREEMENT_MS = 50


@pytest.mark.parametrize("preemptive", [False, True], ids=["plain", "preemptive"])
async def test_trace_agrees_with_the_audio(base_config, models, speaker, preemptive):
    config = base_config.model_copy(deep=True)
    config.turns.preemptive = preemptive
    cues = [Cue(audio=speaker(QUESTION), text=QUESTION, at=0.5)]
    session_id = f"agreement-{'preemptive' if preemptive else 'plain'}"
    result = await run_conversation(config=config, models=models, cues=cues, session_id=session_id)

    answered = [t for t in result.turns if t.bot_text]
    assert len(answered) == 1, result.summary()
    path = Path(result.trace_path)
    assert path == Path(base_config.tracing.dir) / f"{session_id}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(answered)

    for record, turn in zip(records, answered):
        assert set(record) == {f.name for f in fields(TurnTrace)}
        assert set(record["stages"]) == set(STAGES)
        assert record["preemptive_adopted"] == preemptive, record
        events = TURN_EVENTS
        if record["preemptive_adopted"]:
            # Its generation began on the early transcript while the turn end was being confirmed:
            # that confirmation comes after the speech and before any of the reply is heard.
            confirmed = ["vad_stop_ms", "transcript_ms"]
            for name in confirmed:
                assert record["user_speech_end_ms"] <= record[name] <= record["first_audio_out_ms"], (name, record)
            events = [name for name in TURN_EVENTS if name not in confirmed]
        times = [record[name] for name in events]
        assert None not in times and times == sorted(times), dict(zip(events, times))
        assert record["voice_to_voice_ms"] == turn.trace_voice_to_voice_ms
        assert turn.voice_to_voice_ms is not None
        assert abs(turn.trace_voice_to_voice_ms - turn.voice_to_voice_ms) <= AGREEMENT_MS, (
            f"trace {turn.trace_voice_to_voice_ms} ms vs audio {turn.voice_to_voice_ms} ms"
        )
