"""The responder's answers to tests/data/questions.yaml, judged: right, refused, looped or empty.

Each question is asked in a conversation of its own, through `voxbot chat`'s pipeline (the
bot's context aggregators and responder). To compare system prompts on this CPU:

    python -m tests.answer_quality [--prompt "You are ..." ...] [--without-examples] [--show]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from loguru import logger

from bot.chat import ChatSession
from bot.config import Config, load_config
from bot.models import Models, load_responder_models
from bot.tracing import percentile

QUESTIONS = Path(__file__).parent / "data" / "questions.yaml"
REFUSAL = re.compile(
    r"\b(I'm sorry|I am sorry|I can't|I cannot|I'm not able|I am not able|I'm unable|unable to"
    r"|as an AI|I don't have (access|the ability|personal|real-time))",
    re.I,
)
_LOOP_WORDS = 6  # a run of this many words said twice is a loop


@dataclass
class Verdict:
    question: str
    reply: str
    first_token_ms: float | None
    missing: list[str] = field(default_factory=list)  # `must` patterns the reply lacks
    forbidden: list[str] = field(default_factory=list)  # `must_not` patterns it has
    refused: bool = False
    looped: bool = False
    empty: bool = False

    @property
    def acceptable(self) -> bool:
        return not (self.missing or self.forbidden or self.refused or self.looped or self.empty)


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    return yaml.safe_load(path.read_text())


def repeats(text: str) -> bool:
    """Whether ``text`` says a sentence, or a run of words, twice."""
    sentences = [" ".join(s.lower().split()) for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if len(set(sentences)) < len(sentences):
        return True
    words = re.findall(r"[\w']+", text.lower())
    runs = [tuple(words[i : i + _LOOP_WORDS]) for i in range(len(words) - _LOOP_WORDS + 1)]
    return len(set(runs)) < len(runs)


def judge(item: dict, reply: str, *, first_token_ms: float | None) -> Verdict:
    return Verdict(
        question=item["q"],
        reply=reply,
        first_token_ms=first_token_ms,
        missing=[p for p in item.get("must", []) if not re.search(p, reply, re.I)],
        forbidden=[p for p in item.get("must_not", []) if re.search(p, reply, re.I)],
        refused=bool(REFUSAL.search(reply)),
        looped=repeats(reply),
        empty=not reply.strip(),
    )


async def ask_all(*, config: Config, models: Models, questions: list[dict]) -> list[Verdict]:
    verdicts = []
    for item in questions:
        async with ChatSession(config=config, models=models) as session:
            reply = await session.ask(item["q"])
        verdicts.append(judge(item, reply.reply, first_token_ms=reply.first_token_ms))
    return verdicts


def summarize(verdicts: list[Verdict]) -> dict:
    return {
        "acceptable_share": round(sum(v.acceptable for v in verdicts) / len(verdicts), 3),
        "refusals": sum(v.refused for v in verdicts),
        "loops": sum(v.looped for v in verdicts),
        "empty": sum(v.empty for v in verdicts),
        "first_token_p50_ms": percentile([v.first_token_ms for v in verdicts if v.first_token_ms], 50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", action="append", help="A system prompt to try (default: config.yaml's)")
    parser.add_argument("--without-examples", action="store_true", help="Leave out llm.llama_cpp.examples")
    parser.add_argument("--show", action="store_true", help="Print every unacceptable answer")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    config = load_config(None)
    if args.without_examples:
        config.llm.llama_cpp.examples = []
    models = load_responder_models(config)
    questions = load_questions()
    for prompt in args.prompt or [config.llm.system_prompt]:
        config.llm.system_prompt = prompt
        verdicts = asyncio.run(ask_all(config=config, models=models, questions=questions))
        print(json.dumps({"prompt": prompt, **summarize(verdicts)}))
        if args.show:
            for v in verdicts:
                if not v.acceptable:
                    print("  ", json.dumps({k: val for k, val in asdict(v).items() if val}))


if __name__ == "__main__":
    main()
