"""`voxbot trace`: latency traces (bot/tracing.py JSONL) drawn as a picture.

The top panel is a waterfall, one row per turn, every stage on one time axis with
the end of the user's speech at 0 ms, so where the time goes is seen at a glance.
The bottom panel is the voice-to-voice latency of each turn against p50, p95 and
the goal.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from bot.tracing import percentile

GOAL_MS = 800.0

# (label, start field, end field, color), in the order they happen. Each is drawn
# where the trace has both ends; "text aggregation" is the wait for the first
# clause the TTS can speak, between the LLM's first token and the TTS start.
SEGMENTS = (
    ("user speech", "user_speech_start_ms", "user_speech_end_ms", "#b8c2cc"),
    ("endpointing", "user_speech_end_ms", "transcript_ms", "#f4a259"),
    ("waiting for the LLM", "transcript_ms", "generation_start_ms", "#f6d57a"),
    ("LLM to first token", "generation_start_ms", "first_token_ms", "#8c6bc8"),
    ("text aggregation", "first_token_ms", "tts_start_ms", "#cdb9ec"),
    ("TTS to first audio", "tts_start_ms", "first_tts_audio_ms", "#2a9d8f"),
    ("output", "first_tts_audio_ms", "first_audio_out_ms", "#8fd6cb"),
    ("bot speaking", "first_audio_out_ms", "bot_end_ms", "#5b8fd6"),
)
_NUMBERS = {name for _, start, end, _ in SEGMENTS for name in (start, end)} | {"vad_stop_ms", "voice_to_voice_ms"}
_OK, _LATE, _INTERRUPTED = "#2b9348", "#d62828", "#c1121f"
# Most of the user's speech shown left of 0, also as a share of what is right of
# 0 (the latency is the point); longer speech is cut and labelled.
_SPEECH_SHOWN_MS = 1500.0
_SPEECH_SHARE = 0.4
_ROW_INCHES = 0.36
_LABEL_CHARS = 26


class TraceFileError(ValueError):
    """A trace file is missing or is not a latency trace; the message says which line."""


@dataclass
class Row:
    """One turn to draw: its label, its session's index and its trace record."""

    label: str
    session: int
    trace: dict
    interrupted: bool

    def rel(self, name: str) -> float | None:
        """A timestamp field in ms from the end of the user's speech, or None."""
        value, zero = self.trace.get(name), self.trace.get("user_speech_end_ms")
        return None if value is None or zero is None else value - zero

    @property
    def v2v(self) -> float | None:
        return self.trace.get("voice_to_voice_ms")


def load_traces(paths: list[Path]) -> dict[str, list[dict]]:
    """Every turn in the files, by session id, in file order.

    Raises:
        TraceFileError: naming the file (and line) that is missing or malformed.
    """
    sessions: dict[str, list[dict]] = {}
    for path in paths:
        if not path.is_file():
            raise TraceFileError(f"no such trace file: {path}")
        count = 0
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFileError(f"{path}:{number}: not JSON ({e.msg})") from None
            problem = _problem(record)
            if problem:
                raise TraceFileError(f"{path}:{number}: {problem}")
            # A session id run again (a repeated benchmark) appends to its file: a
            # turn number that does not go up starts another run.
            key, run = str(record["session_id"]), 1
            while sessions.get(key) and sessions[key][-1]["turn"] >= record["turn"]:
                run += 1
                key = f"{record['session_id']} (run {run})"
            sessions.setdefault(key, []).append(record)
            count += 1
        if count == 0:
            raise TraceFileError(f"{path}: no turns in this trace file")
    return sessions


def _problem(record) -> str | None:
    """What makes a parsed line unusable as a turn trace, if anything."""
    if not isinstance(record, dict) or "session_id" not in record or not isinstance(record.get("turn"), int):
        return "not a turn trace (needs session_id and an integer turn)"
    for name in sorted(_NUMBERS):
        if record.get(name) is not None and not isinstance(record[name], (int, float)):
            return f"{name} is not a number"
    return None


def _rows(sessions: dict[str, list[dict]]) -> list[Row]:
    """Rows labelled by turn (and by session letter when there are several)."""
    rows = []
    for i, turns in enumerate(sessions.values()):
        prefix = f"{chr(65 + i % 26)}·" if len(sessions) > 1 else ""
        for trace in turns:
            text = " ".join(str(trace.get("user_text") or "").split())
            if len(text) > _LABEL_CHARS:
                text = text[: _LABEL_CHARS - 1] + "…"
            label = f"{prefix}{trace['turn']}  {text}" if text else f"{prefix}{trace['turn']}"
            rows.append(Row(label=label, session=i, trace=trace, interrupted=bool(trace.get("interrupted"))))
    return rows


def _title(sessions: dict[str, list[dict]], values: list[float]) -> str:
    if len(sessions) == 1:
        who = f"session {next(iter(sessions))}"
    else:
        key = ", ".join(f"{chr(65 + i % 26)} = {sid}" for i, sid in enumerate(sessions))
        who = f"{len(sessions)} sessions\n" + "\n".join(textwrap.wrap(key, 100, break_on_hyphens=False))
    if not values:
        return f"Voice-to-voice latency, {who}\nno answered turn"
    p50, p95 = percentile(values, 50), percentile(values, 95)
    return f"Voice-to-voice latency, {who}\np50 {p50:.0f} ms, p95 {p95:.0f} ms over {len(values)} answered turns"


def _session_breaks(ax: Axes, rows: list[Row], *, vertical: bool) -> None:
    """A faint line between sessions, so turns of different sessions are not read as one."""
    for y in range(1, len(rows)):
        if rows[y].session != rows[y - 1].session:
            line = ax.axvline if vertical else ax.axhline
            line(y - 0.5, color="#9aa5b1", linewidth=0.8, linestyle="-")


def _x_range(rows: list[Row]) -> tuple[float, float]:
    """From some user speech to past the slowest first audio, the goal always in view."""
    reached = [
        r.rel(name)
        for r in rows
        for name in ("first_audio_out_ms", "first_tts_audio_ms", "tts_start_ms", "transcript_ms")
        if r.rel(name) is not None
    ]
    right = max(max(reached, default=0.0), GOAL_MS) * 1.12 + 300
    speech = [-r.rel("user_speech_start_ms") for r in rows if r.rel("user_speech_start_ms") is not None]
    left = min(max(speech, default=500.0), _SPEECH_SHOWN_MS, _SPEECH_SHARE * right)
    return -left * 1.06, right


def _draw_waterfall(ax: Axes, rows: list[Row]) -> None:
    xmin, xmax = _x_range(rows)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    # Data units per point of width, to tell whether a label fits inside its bar.
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    ms_per_pt = (xmax - xmin) / width_pt
    right_column = blended_transform_factory(ax.transAxes, ax.transData)

    for y, row in enumerate(rows):
        v2v = row.v2v
        ax.text(
            1.01, y, "no reply" if v2v is None else f"{v2v:.0f} ms", transform=right_column,
            va="center", ha="left", fontsize=9, fontweight="bold",
            color="#777" if v2v is None else (_OK if v2v <= GOAL_MS else _LATE),
        )  # fmt: skip
        if row.rel("user_speech_end_ms") is None:
            ax.text(0, y, "  no end of speech in this trace", va="center", fontsize=8, color="#666")
            continue
        for label, start_name, end_name, color in SEGMENTS:
            start, end = row.rel(start_name), row.rel(end_name)
            if start is None or end is None or end < start:
                continue
            speaking = label == "bot speaking"
            ax.barh(
                y, max(end - start, 2 * ms_per_pt), left=start, height=0.62, color=color,
                edgecolor=_INTERRUPTED if speaking and row.interrupted else "white",
                hatch="///" if speaking and row.interrupted else None, linewidth=0.6,
            )  # fmt: skip
            _label_bar(ax, y, label, start, end, xmin=xmin, xmax=xmax, ms_per_pt=ms_per_pt, row=row)
        vad_stop = row.rel("vad_stop_ms")
        if vad_stop is not None:
            ax.plot([vad_stop, vad_stop], [y - 0.36, y + 0.36], color="#333", linewidth=1.2)

    _session_breaks(ax, rows, vertical=False)
    ax.axvline(0, color="#222", linewidth=1)
    ax.axvline(GOAL_MS, color=_LATE, linestyle="--", linewidth=1.3)
    ax.text(GOAL_MS, -0.5, f" goal {GOAL_MS:.0f} ms", color=_LATE, fontsize=8, va="bottom", ha="left")
    ax.text(1.01, -0.5, "voice to\nvoice", transform=right_column, fontsize=8, va="bottom", color="#444")
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8)
    for tick, row in zip(ax.get_yticklabels(), rows):
        if row.interrupted:
            tick.set_color(_INTERRUPTED)
    ax.set_xlabel("time from the end of the user's speech (ms)")
    ax.grid(axis="x", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    handles = [Patch(facecolor=color, label=label) for label, _, _, color in SEGMENTS]
    handles += [
        Patch(facecolor=SEGMENTS[-1][3], edgecolor=_INTERRUPTED, hatch="///", label="interrupted"),
        Line2D([], [], color="#333", linewidth=1.2, label="VAD stop"),
    ]
    ax.legend(
        handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0, 1, 0.1), ncol=5, mode="expand",
        frameon=False, fontsize=8, handlelength=1.6, borderaxespad=1.2,
    )  # fmt: skip


def _label_bar(
    ax: Axes, y: float, label: str, start: float, end: float, *, xmin: float, xmax: float, ms_per_pt: float, row: Row
) -> None:
    """The duration inside a bar, the longest wording that fits; none if nothing does."""
    seconds, cut = (end - start) / 1000, label == "bot speaking" and row.interrupted
    if label == "user speech":
        texts = [f"speech {seconds:.1f} s", f"{seconds:.1f} s"]
    elif cut:
        texts = [f"speaking {seconds:.1f} s, interrupted", "interrupted"]
    elif label == "bot speaking":
        texts = [f"speaking {seconds:.1f} s", f"{seconds:.1f} s"]
    else:
        texts = [f"{end - start:.0f} ms", f"{end - start:.0f}"]
    shown_start = max(start, xmin)
    room_pt = (min(end, xmax) - shown_start) / ms_per_pt
    fitting = [t for t in texts if 4.6 * len(t) + 6 <= room_pt]
    if not fitting:
        return
    ax.text(
        shown_start + 3 * ms_per_pt, y, fitting[0], va="center", ha="left", fontsize=7.5, clip_on=True,
        color=_INTERRUPTED if cut else "#1d1d1d", fontweight="bold" if cut else "normal",
        # Over the hatching, the words need a ground of their own.
        bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85) if cut else None,
    )  # fmt: skip


def _draw_latency(ax: Axes, rows: list[Row]) -> None:
    points = [(i, r) for i, r in enumerate(rows) if r.v2v is not None]
    values = [r.v2v for _, r in points]
    for session in sorted({r.session for r in rows}):
        line = [(i, r.v2v) for i, r in points if r.session == session]
        ax.plot([i for i, _ in line], [v for _, v in line], color="#9aa5b1", linewidth=1, zorder=1)
    _session_breaks(ax, rows, vertical=True)
    for i, r in points:
        color = _OK if r.v2v <= GOAL_MS else _LATE
        ax.scatter(
            i, r.v2v, s=38, zorder=3, marker="D" if r.interrupted else "o",
            facecolor="white" if r.interrupted else color, edgecolor=color, linewidth=1.4,
        )  # fmt: skip
    handles = [
        Line2D([], [], marker="o", linestyle="", color=_OK, label=f"≤ goal ({GOAL_MS:.0f} ms)"),
        Line2D([], [], marker="o", linestyle="", color=_LATE, label="over the goal"),
        Line2D([], [], marker="D", linestyle="", markerfacecolor="white", color="#555", label="interrupted"),
        Line2D([], [], color=_LATE, linestyle="--", label=f"goal {GOAL_MS:.0f} ms"),
    ]
    if values:
        p50, p95 = percentile(values, 50), percentile(values, 95)
        ax.axhline(p50, color="#1d3557", linestyle="--", linewidth=1.2)
        ax.axhline(p95, color="#1d3557", linestyle=":", linewidth=1.4)
        handles += [
            Line2D([], [], color="#1d3557", linestyle="--", label=f"p50 {p50:.0f} ms"),
            Line2D([], [], color="#1d3557", linestyle=":", label=f"p95 {p95:.0f} ms"),
        ]
    ax.axhline(GOAL_MS, color=_LATE, linestyle="--", linewidth=1.1, alpha=0.8)
    top = max(values + [GOAL_MS]) * 1.15
    ax.set_ylim(0, top)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xticks(range(len(rows)), [r.label.split()[0] for r in rows], fontsize=8)
    ax.set_title("voice to voice, turn by turn", loc="left", fontsize=10)
    ax.set_xlabel("turn")
    ax.set_ylabel("voice to voice (ms)")
    ax.grid(axis="y", color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)


def render(*, sessions: dict[str, list[dict]], out: Path) -> dict:
    """Draw the waterfall and the latency-per-turn plot to a PNG.

    Returns:
        What was drawn: ``{"turns", "answered", "p50_ms", "p95_ms"}``.
    """
    rows = _rows(sessions)
    values = [r.v2v for r in rows if r.v2v is not None]
    waterfall_in = 1.2 + _ROW_INCHES * len(rows)
    latency_in = 2.8
    fig = Figure(figsize=(13, waterfall_in + latency_in + 1.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, height_ratios=[waterfall_in, latency_in])
    fig.suptitle(_title(sessions, values), fontsize=12, fontweight="bold")
    _draw_waterfall(top, rows)
    _draw_latency(bottom, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return {
        "turns": len(rows),
        "answered": len(values),
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
    }
