"""Scripted conversations (tests/scenarios/*.yaml) through the real bot.

Each scenario's ``expect`` block is checked on the recorded bot audio, the
latency traces and the conversation context — never on log text.
"""

import operator

import pytest

from bot.conversation import run_conversation
from bot.scenarios import Speaker, barge_in_stop_ms, build_cues, kept_talking, load_scenarios
from processors.barge_in import words_of
from tests.conftest import SLOW_FACTOR

SCENARIOS = load_scenarios()


@pytest.fixture(scope="module")
def scenario_speaker(models, base_config):
    return Speaker(kokoro=models.kokoro, sample_rate=base_config.audio.in_sample_rate)


@pytest.mark.parametrize("synthesis", ["models", "slow_models"], ids=["this-cpu", f"synthesis-{SLOW_FACTOR}x-slower"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_scenario(scenario, synthesis, request, base_config, scenario_speaker):
    """Each conversation as scripted, on this machine and on one that synthesizes 2.5x slower."""
    rate = base_config.audio.in_sample_rate
    result = await run_conversation(
        config=base_config,
        models=request.getfixturevalue(synthesis),
        cues=build_cues(scenario, speaker=scenario_speaker, sample_rate=rate),
        echo_gain=scenario.echo_gain,
        session_id=f"test-{scenario.name}",
    )
    check_scenario(scenario, result, sample_rate=rate)


def check_scenario(scenario, result, *, sample_rate: int, same_words=operator.eq) -> None:
    """What the scenario's ``expect`` block asks of the conversation (tests/test_telephony.py reuses it).

    ``same_words(heard, said)`` compares the user's transcribed words with the script's
    (over a phone line Whisper may mishear a word: the check there allows that).
    """
    rate = sample_rate
    expect = scenario.expect
    user_messages = [m["content"] for m in result.messages if m["role"] == "user"]
    assistant_messages = [m["content"] for m in result.messages if m["role"] == "assistant"]
    report = {"turns": result.summary()["turns"], "messages": result.messages}
    assert all(c.started is not None for c in result.cues), "every cue was played"

    if "answered_turns" in expect:
        # Each reply is measured once, from the end of the words it answers.
        answered = [t for t in result.turns if t.voice_to_voice_ms is not None]
        assert len(answered) == expect["answered_turns"] and all(t.bot_text for t in answered), report

    if "barge_in" in expect:
        index = expect["barge_in"]
        stop_ms = barge_in_stop_ms(result, index, sample_rate=rate)
        # The bot stopped while the user was still talking, not after.
        cue = result.cues[index]
        assert stop_ms is not None and stop_ms < (cue.speech_end - cue.started) * 1000 - 300, (stop_ms, report)
        interrupted = [t for t in result.turns if t.interrupted]
        assert interrupted, report
        # The context keeps only what was heard: a part of what the model generated.
        cut = interrupted[0]
        heard, generated = words_of(cut.bot_text), words_of(cut.trace.generated_text)
        assert len(heard) < len(generated), report
        assert heard == generated[: len(heard)], report
        assert not heard or any(words_of(m) == heard for m in assistant_messages), report

    if expect.get("answered_after"):
        last = result.cues[-1]
        assert result.recording.first_sound_after(last.speech_end) is not None, report
        assert assistant_messages and result.messages[-1]["role"] == "assistant", report

    said_first_only = same_words(words_of(" ".join(user_messages)), words_of(result.cues[0].text))
    for index in expect.get("keeps_talking", []):
        assert kept_talking(result, index), (index, report)
        assert not any(t.interrupted for t in result.turns), report
        assert said_first_only, report  # the backchannel or noise never became user words

    if expect.get("no_interruption"):
        assert not any(t.interrupted for t in result.turns), report
        assert said_first_only, report

    if expect.get("silent_until_last"):
        first, last = result.cues[0], result.cues[-1]
        assert result.recording.last_sound_between(first.started, last.speech_end) is None, report

    if "user_said" in expect:
        said = words_of(" ".join(user_messages))
        assert same_words(said, words_of(expect["user_said"])), report

    if "last_user_mentions" in expect:
        assert expect["last_user_mentions"] in words_of(user_messages[-1]), report
