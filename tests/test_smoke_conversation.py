"""A whole scripted turn through bot/pipeline.py: hear, think, speak."""

import jiwer
import numpy as np
import soxr

from bot.conversation import run_conversation
from transports.scripted import Cue

# A reply in plain English words: a French name ("Le Grand Paris") is read back
# unreliably by Whisper tiny after English phonemization, which tests nothing of ours.
QUESTION = "Hello, can you hear me?"


def _normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


async def test_scripted_turn_hears_answers_and_speaks(base_config, models, speaker):
    cues = [Cue(audio=speaker(QUESTION), text=QUESTION, at=0.5)]
    result = await run_conversation(config=base_config, models=models, cues=cues)

    answered = [t for t in result.turns if t.bot_text]
    assert len(answered) == 1, result.summary()
    turn = answered[0]
    assert jiwer.wer(_normalize(QUESTION), _normalize(turn.user_text)) == 0
    assert turn.voice_to_voice_ms is not None and turn.voice_to_voice_ms > 0

    # Whisper reads the bot's recorded audio back: it must say what the bot meant.
    bot_audio = result.bot_audio().astype(np.float32) / 32768
    bot_16k = soxr.resample(bot_audio, base_config.audio.out_sample_rate, 16000)
    segments, _ = models.whisper.transcribe(bot_16k, language="en", beam_size=1)
    heard = " ".join(s.text for s in segments)
    assert jiwer.wer(_normalize(turn.bot_text), _normalize(heard)) < 0.25, (turn.bot_text, heard)

    # The conversation keeps both sides.
    roles = [m["role"] for m in result.messages]
    assert roles[-2:] == ["user", "assistant"]
