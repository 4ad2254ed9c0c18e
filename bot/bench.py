"""`voxbot bench`: voice-to-voice latency of the real bot on scripted conversations.

Latency is measured on the audio (true end of the user's speech in the cue to the
first non-silent bot sample leaving the output transport), for ours and, in the
same run, for the stock pipecat bot on the same models.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import resource
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from bot import machine
from bot.config import Config
from bot.conversation import ConversationResult, build_bot, run_conversation
from bot.memory import collect_finished_session
from bot.models import Models
from bot.scenarios import Scenario, Speaker, barge_in_stop_ms, build_cues
from bot.tracing import percentile

# A gap in the bot's voice longer than this is a hole a listener hears.
HOLE_MS = 150.0
# A user who waited this long after a question and heard nothing was left unanswered (the p95
# goal); one who asked again sooner merged the two (two_quick_turns: one reply for both).
UNANSWERED_WAIT_MS = 2000.0


def unanswered(turns: list) -> int:
    """The user's turns that no reply followed before the user gave up waiting."""
    count = 0
    for turn, after in zip(turns, [*turns[1:], None]):
        if not turn.user_text or turn.trace.first_audio_out_ms is not None:
            continue
        end, next_start = turn.trace.user_speech_end_ms, after.trace.user_speech_start_ms if after else None
        if end is None or next_start is None or next_start - end >= UNANSWERED_WAIT_MS:
            count += 1
    return count


@dataclass
class StackResult:
    """Latency figures of one bot over all scenarios."""

    latencies_ms: list[float] = field(default_factory=list)
    turns: int = 0
    unanswered: int = 0  # turns the user finished, then waited for in silence
    rounds: int = 0
    rss_after_first_round_mb: float | None = None
    rss_by_round_mb: list[float] = field(default_factory=list)  # a soak's: a plateau, or a leak
    # The process's CPU time (every thread: ONNX, llama.cpp) over the wall time of the run.
    cpu_s: float = 0.0
    wall_s: float = 0.0
    # Per answered turn: the scenario, voice-to-voice and the holes in the reply.
    per_turn: list[dict] = field(default_factory=list)
    barge_in_stop_ms: list[float] = field(default_factory=list)
    barge_in_missed: int = 0
    false_stops: int = 0
    traces: list[str] = field(default_factory=list)

    def add(self, result: ConversationResult, *, scenario: Scenario, sample_rate: int) -> None:
        self.latencies_ms += [
            t.voice_to_voice_ms for t in result.turns if t.voice_to_voice_ms is not None
        ]
        self.turns += len(result.turns)
        self.unanswered += unanswered(result.turns)
        self.per_turn += [
            {
                "scenario": scenario.name,
                "voice_to_voice_ms": t.voice_to_voice_ms,
                "holes": len(t.holes_ms),
                "longest_hole_ms": max(t.holes_ms, default=0.0),
                "preemptive_attempts": t.trace.preemptive_attempts,
                "preemptive_adopted": t.trace.preemptive_adopted,
                "wasted_tokens": t.trace.preemptive_wasted_tokens,
                "wasted_synthesis_ms": t.trace.preemptive_wasted_synthesis_ms,
            }
            for t in result.turns
            if t.voice_to_voice_ms is not None
        ]
        expect = scenario.expect
        if "barge_in" in expect:
            index = expect["barge_in"]
            cue = result.cues[index]
            stop = barge_in_stop_ms(result, index, sample_rate=sample_rate)
            # Still talking until the user's last word: the barge-in was missed.
            if stop is None or stop >= (cue.speech_end - cue.started) * 1000 - 100:
                self.barge_in_missed += 1
            else:
                self.barge_in_stop_ms.append(stop)
        if expect.get("keeps_talking") or expect.get("no_interruption"):
            self.false_stops += sum(1 for t in result.turns if t.interrupted)
        if result.trace_path:
            self.traces.append(result.trace_path)

    def summary(self) -> dict:
        return {
            "p50_ms": _round(percentile(self.latencies_ms, 50)),
            "p95_ms": _round(percentile(self.latencies_ms, 95)),
            "turns": len(self.latencies_ms),
            "unanswered_turns": self.unanswered,
            "rounds": self.rounds,
            "cpu_cores_busy": round(self.cpu_s / self.wall_s, 2) if self.wall_s else None,
            "turns_with_holes_over_150ms": sum(1 for t in self.per_turn if t["longest_hole_ms"] > HOLE_MS),
            "longest_hole_ms": max((t["longest_hole_ms"] for t in self.per_turn), default=0.0),
            "per_turn": self.per_turn,
            # Preemptive replies: the share of answered turns that played one, and what the cancelled cost.
            "preemptive_adopted_share": (
                round(sum(t["preemptive_adopted"] for t in self.per_turn) / len(self.per_turn), 2) if self.per_turn else None
            ),
            "wasted_tokens_per_turn": _round(sum(t["wasted_tokens"] for t in self.per_turn) / max(1, len(self.per_turn))),
            "wasted_synthesis_ms_per_turn": _round(
                sum(t["wasted_synthesis_ms"] for t in self.per_turn) / max(1, len(self.per_turn))
            ),
            "barge_in_stop_p50_ms": _round(percentile(self.barge_in_stop_ms, 50)),
            "barge_in_missed": self.barge_in_missed,
            "false_stops": self.false_stops,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_now_mb() -> float:
    """Resident memory of this process now, MB: what a soak watches grow."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


async def _run_stack(
    *,
    name: str,
    config: Config,
    models: Models,
    scenarios: list[Scenario],
    speaker: Speaker,
    repeat: int,
    minutes: float | None,
    sessions: int,
    build,
    progress: tqdm,
) -> StackResult:
    stack = StackResult()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    cpu_start, wall_start = time.process_time(), time.monotonic()
    until = time.monotonic() + minutes * 60 if minutes else 0.0
    for round_ in itertools.count():
        if round_ >= repeat and time.monotonic() >= until:
            break
        if round_ == 1 and minutes:
            stack.rss_after_first_round_mb = rss_now_mb()  # warm: what later rounds must not outgrow
        for scenario in scenarios:
            progress.set_postfix_str(f"{name}: {scenario.name}")
            results = await asyncio.gather(
                *(
                    run_conversation(
                        config=config,
                        models=models,
                        cues=build_cues(scenario, speaker=speaker, sample_rate=config.audio.in_sample_rate),
                        echo_gain=scenario.echo_gain,
                        session_id=f"bench-{run_id}-{name}-{scenario.name}-r{round_}-s{i}",
                        build=build,
                    )
                    for i in range(sessions)
                )
            )
            for result in results:
                stack.add(result, scenario=scenario, sample_rate=config.audio.in_sample_rate)
            del results, result
            collect_finished_session(scenario.name)  # as the server does when a session ends
            progress.update(1)
        stack.rounds += 1
        if minutes:
            stack.rss_by_round_mb.append(rss_now_mb())
    stack.cpu_s, stack.wall_s = time.process_time() - cpu_start, time.monotonic() - wall_start
    return stack


async def run_bench(
    *,
    config: Config,
    models: Models,
    scenarios: list[Scenario],
    baseline: str | None = None,
    sessions: int = 1,
    repeat: int = 1,
    minutes: float | None = None,
    show_progress: bool = True,
) -> dict:
    """Run every scenario through our bot (and the stock one) and summarize.

    With ``minutes`` (a soak), ours goes round the scenarios, ``repeat`` times at least,
    until that long has passed, and the summary says how its memory grew after the first round.
    """
    speaker = Speaker(kokoro=models.kokoro, sample_rate=config.audio.in_sample_rate)
    # Measured at load; the bench's own runs keep correcting it (the figure at the end).
    start_rtf = round(models.synthesis_speed.real_time_factor, 3) if models.synthesis_speed else None
    stacks = 2 if baseline == "stock" else 1
    progress = tqdm(
        total=len(scenarios) * repeat * stacks, desc="bench", unit="scenario", disable=not show_progress
    )
    common = dict(
        config=config, models=models, scenarios=scenarios, speaker=speaker,
        repeat=repeat, progress=progress,
    )  # fmt: skip
    try:
        ours = await _run_stack(name="ours", sessions=sessions, minutes=minutes, build=build_bot, **common)
        summary: dict = {"ours": ours.summary(), "sessions": sessions, "scenarios": [s.name for s in scenarios]}
        if ours.rss_after_first_round_mb is not None:
            end = rss_now_mb()
            summary["soak"] = {
                "minutes": minutes,
                "rss_after_first_round_mb": ours.rss_after_first_round_mb,
                "rss_end_mb": end,
                "rss_growth": round(end / ours.rss_after_first_round_mb - 1, 3),
                "rss_by_round_mb": ours.rss_by_round_mb,
            }
        if baseline == "stock":
            from bot.stock import llama_server, stock_builder

            with llama_server(config) as base_url:
                stock = await _run_stack(
                    name="stock", sessions=sessions, minutes=None, build=stock_builder(base_url), **common
                )
            summary["stock"] = stock.summary()
            if ours.latencies_ms and stock.latencies_ms:
                summary["ratio_p50"] = round(summary["ours"]["p50_ms"] / summary["stock"]["p50_ms"], 3)
    finally:
        progress.close()
    summary["machine"] = {
        **machine.describe(synthesis_speed=models.synthesis_speed),
        "tts_real_time_factor_at_start": start_rtf,
    }
    summary["rss_mb"] = rss_mb()
    summary["traces"] = ours.traces
    return summary
