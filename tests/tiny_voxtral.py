"""A tiny random Voxtral checkpoint, built at test time, that runs the real code path offline.

The shapes are Voxtral's where the processor insists (128 mel bins, 30 s windows:
``max_source_positions=1500``, encoder ``intermediate_size`` = 4 x hidden so the
projector sees 375 audio tokens per window); everything else is as small as it
goes. The tokenizer is a v7 tekken.json, the oldest version mistral-common
accepts audio with.

Random weights say random things; to keep the flow deterministic the saved
generation config lets the model write only lowercase letters and a few
space-led words, so every transcript and reply is non-empty, never ends a
sentence on its own, and streams word by word.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from transformers import (
    MistralCommonBackend,
    VoxtralConfig,
    VoxtralForConditionalGeneration,
    VoxtralProcessor,
    WhisperFeatureExtractor,
)

# Tekken's pre-tokenizer pattern (as in Mistral's released tokenizers).
_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NUM_SPECIAL = 100
# Ranks as in Voxtral's own tekken.json; the rest are <SPECIAL_n> fillers.
_SPECIAL = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]",
    10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]",
    15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[ARGS]", 33: "[CALL_ID]",
    34: "[TRANSCRIBE]",
}  # fmt: skip
_MERGES = [b"th", b"he", b"in", b"er", b" t", b" th", b" he", b" in", b" a"]
_AUDIO_TOKEN_ID = 24


def _tekken() -> dict:
    pieces = [bytes([i]) for i in range(256)] + _MERGES
    return {
        "config": {
            "pattern": _PATTERN,
            "num_vocab_tokens": len(pieces),
            "default_vocab_size": len(pieces) + _NUM_SPECIAL,
            "default_num_special_tokens": _NUM_SPECIAL,
            "version": "v7",
        },
        "vocab": [
            {"rank": rank, "token_bytes": base64.b64encode(piece).decode(), "token_str": None}
            for rank, piece in enumerate(pieces)
        ],
        "special_tokens": [
            {"rank": i, "token_str": _SPECIAL.get(i, f"<SPECIAL_{i}>"), "is_control": True}
            for i in range(_NUM_SPECIAL)
        ],
        "audio": {
            "sampling_rate": 16000,
            "frame_rate": 12.5,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
            "chunk_length_s": 30.0,
            "transcription_format": "instruct",
        },
    }


def _allowed_token_ids() -> set[int]:
    """Letters a-z and the space-led merges (tekken ids follow the special tokens)."""
    letters = {_NUM_SPECIAL + b for b in range(ord("a"), ord("z") + 1)}
    words = {_NUM_SPECIAL + 256 + i for i, merge in enumerate(_MERGES) if merge.startswith(b" ")}
    return letters | words


def build_tiny_voxtral(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random Voxtral (weights, config, processor) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = _tekken()
    tekken = folder / "tekken.json"
    tekken.write_text(json.dumps(spec))
    processor = VoxtralProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=MistralCommonBackend(tokenizer_path=str(tekken)),
    )
    vocab_size = spec["config"]["default_vocab_size"]
    config = VoxtralConfig(
        audio_config={
            "hidden_size": 16,
            "intermediate_size": 64,  # 4 x hidden: the projector folds 4 frames into one
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_mel_bins": 128,
            "max_source_positions": 1500,  # the processor always pads to 30 s
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 2048,
        },
        audio_token_id=_AUDIO_TOKEN_ID,
    )
    torch.manual_seed(seed)
    model = VoxtralForConditionalGeneration(config)
    allowed = _allowed_token_ids()
    model.generation_config.suppress_tokens = [i for i in range(vocab_size) if i not in allowed]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
