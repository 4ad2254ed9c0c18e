"""`voxbot serve | talk | chat | prepare | bench | trace`."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import typer
from loguru import logger

from bot.assets import MissingModelError
from bot.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="A self-hosted voice bot on pipecat.")

ConfigOption = typer.Option(None, "--config", "-c", help="config.yaml (default ./config.yaml or $VOXBOT_CONFIG)")


def _log_to_stderr(level: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level)


def _config(path: Path | None, *, log_level: str = "INFO") -> Config:
    _log_to_stderr(log_level)
    try:
        return load_config(path)
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2)


def _load_models(config: Config, *, responder_only: bool = False):
    from bot.memory import freeze_loaded_models
    from bot.models import load_models, load_responder_models

    try:
        models = load_responder_models(config) if responder_only else load_models(config)
    except MissingModelError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(3)
    freeze_loaded_models()
    return models


def read_wav(path: Path, *, sample_rate: int) -> np.ndarray:
    """A WAV (any rate, any channels) as int16 mono at ``sample_rate``."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return (np.clip(mono, -1, 1) * 32767).astype(np.int16)


@app.command()
def serve(
    config_path: Path | None = ConfigOption,
    host: str | None = typer.Option(None, help="Overrides server.host"),
    port: int | None = typer.Option(None, help="Overrides server.port"),
):
    """Serve the bot: a web page at /, the voice WebSocket at /ws."""
    from bot.access import ExposedWithoutTokenError
    from bot.server import create_server

    config = _config(config_path)
    host = host or config.server.host
    port = port if port is not None else config.server.port
    try:
        server = create_server(config, host=host, port=port)
    except ExposedWithoutTokenError as e:
        typer.secho(f"voxbot: {e}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"voxbot: serving on http://{host}:{port} (models load in the background; see /ready)")
    server.run()


@app.command()
def prepare(config_path: Path | None = ConfigOption):
    """Locate every model the config needs (assembling Kokoro once) and load each once."""
    config = _config(config_path)
    models = _load_models(config)
    typer.echo(json.dumps({"prepared": models.describe()}, indent=2))
    typer.echo(models.synthesis_speed.describe())


@app.command()
def talk(
    wav: Path = typer.Argument(..., exists=True, dir_okay=False, help="The user's side of the conversation"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the bot's audio here"),
    as_json: bool = typer.Option(False, "--json", help="Print the turns as JSON"),
    config_path: Path | None = ConfigOption,
):
    """Run the full bot on a WAV file, in real time, and report each turn."""
    from bot.conversation import cues_from_wav, run_conversation

    config = _config(config_path, log_level="WARNING" if as_json else "INFO")
    audio = read_wav(wav, sample_rate=config.audio.in_sample_rate)
    models = _load_models(config)
    cues = cues_from_wav(audio, sample_rate=config.audio.in_sample_rate)
    result = asyncio.run(run_conversation(config=config, models=models, cues=cues))
    if out:
        sf.write(str(out), result.bot_audio(), config.audio.out_sample_rate, subtype="PCM_16")
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for i, t in enumerate(summary["turns"]):
            typer.echo(f"turn {i}: {t['voice_to_voice_ms']} ms\n  user: {t['user_text']}\n  bot:  {t['bot_text']}")


@app.command()
def chat(
    lines: list[str] = typer.Argument(None, help="Say these in order, then exit; without them, read lines from stdin"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per reply"),
    config_path: Path | None = ConfigOption,
):
    """Talk to the bot's brain in text: the same responder, prompt and context as a call."""
    from bot.chat import ChatSession

    config = _config(config_path, log_level="WARNING")
    models = _load_models(config, responder_only=True)
    interactive = not lines and sys.stdin.isatty()

    async def converse() -> None:
        typed: asyncio.Queue[str | None] = asyncio.Queue()
        for line in lines or []:
            typed.put_nowait(line)
        if lines:
            typed.put_nowait(None)
        else:
            _read_lines(sys.stdin, into=typed)
        async with ChatSession(config=config, models=models) as session:
            while True:
                if interactive:
                    typer.echo("you> ", nl=False)
                if (line := await typed.get()) is None:
                    break
                if not line.strip():
                    continue
                reply = await session.ask(line.strip())
                if as_json:
                    typer.echo(json.dumps(reply.as_dict()))
                else:
                    typer.echo(f"bot> {reply.reply}  [{reply.first_token_ms} ms to the first token]")
        if interactive:
            typer.echo()  # past the last prompt

    if interactive:
        typer.echo(f"voxbot chat: the {config.llm.engine} responder with the configured prompt; Ctrl-D to leave")
    try:
        asyncio.run(converse())
    except KeyboardInterrupt:
        pass


def _read_lines(stream, *, into: asyncio.Queue) -> None:
    """Feed ``stream``'s lines to ``into`` from a daemon thread, then None at its end.

    A blocking read stays off the event loop, and Ctrl-C does not wait for the next line.
    """
    loop = asyncio.get_running_loop()

    def read() -> None:
        for line in stream:
            loop.call_soon_threadsafe(into.put_nowait, line)
        loop.call_soon_threadsafe(into.put_nowait, None)

    threading.Thread(target=read, name="chat-stdin", daemon=True).start()


@app.command()
def bench(
    scenarios_dir: Path | None = typer.Option(None, "--scenarios", help="Folder of scenario YAMLs"),
    names: list[str] = typer.Option([], "--scenario", "-s", help="Run only these scenarios"),
    baseline: str | None = typer.Option(None, "--baseline", help="'stock': also run the stock pipecat bot"),
    sessions: int = typer.Option(1, "--sessions", min=1, help="Conversations at once in this process"),
    repeat: int = typer.Option(1, "--repeat", min=1, help="Run each scenario this many times"),
    minutes: float | None = typer.Option(None, "--minutes", min=0, help="Soak: go round the scenarios this long"),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary"),
    config_path: Path | None = ConfigOption,
):
    """Measure voice-to-voice latency on scripted conversations, ours vs stock."""
    from bot.bench import run_bench
    from bot.scenarios import DEFAULT_SCENARIOS, load_scenarios

    if baseline not in (None, "stock"):
        raise typer.BadParameter("only 'stock' is supported", param_hint="--baseline")
    if baseline == "stock":
        try:
            import bot.stock  # noqa: F401  (pipecat's own services, with their own needs)
        except ImportError as e:
            typer.secho(
                f"voxbot bench --baseline stock needs pipecat's stock services ({e}): "
                "pip install 'pipecat-ai[kokoro,whisper,openai]'",
                fg="red",
                err=True,
            )
            raise typer.Exit(3)
    config = _config(config_path, log_level="WARNING")
    scenarios = load_scenarios(scenarios_dir or DEFAULT_SCENARIOS, names=names or None)
    models = _load_models(config)
    summary = asyncio.run(
        run_bench(
            config=config,
            models=models,
            scenarios=scenarios,
            baseline=baseline,
            sessions=sessions,
            repeat=repeat,
            minutes=minutes,
        )
    )
    if as_json:
        typer.echo(json.dumps(summary))
        return
    m = summary["machine"]
    typer.echo(
        f"machine: {m['cpu']}, {m['cores']} cores; Kokoro real-time factor {m['tts_real_time_factor_at_start']}"
        f" at start, {m['tts_real_time_factor']} at the end"
    )
    for name in ("ours", "stock"):
        if name in summary:
            s = summary[name]
            typer.echo(
                f"{name:>5}: voice-to-voice p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms over {s['turns']} turns"
                f" ({s['unanswered_turns']} unanswered, {s['rounds']} rounds);"
                f" CPU {s['cpu_cores_busy']} of {m['cores']} cores busy;"
                f" barge-in stop p50 {s['barge_in_stop_p50_ms']} ms ({s['barge_in_missed']} missed);"
                f" {s['false_stops']} false stops; {s['turns_with_holes_over_150ms']} replies with a hole"
                f" over 150 ms (longest {s['longest_hole_ms']} ms); preemptive reply played in"
                f" {s['preemptive_adopted_share']} of turns, wasted {s['wasted_tokens_per_turn']} tokens and"
                f" {s['wasted_synthesis_ms_per_turn']} ms of synthesis per turn"
            )
            for t in s["per_turn"]:
                typer.echo(
                    f"       {t['scenario']}: {t['voice_to_voice_ms']} ms, {t['holes']} holes"
                    f" (longest {t['longest_hole_ms']} ms)"
                )
    if "ratio_p50" in summary:
        typer.echo(f"ours/stock p50 ratio: {summary['ratio_p50']}")
    typer.echo(f"peak RSS {summary['rss_mb']} MB, {summary['sessions']} session(s) at once")
    if soak := summary.get("soak"):
        typer.echo(
            f"soak: RSS {soak['rss_after_first_round_mb']} MB after the first round, {soak['rss_end_mb']} MB"
            f" after {soak['minutes']} min ({soak['rss_growth']:+.1%})"
        )


@app.command()
def trace(
    files: list[Path] = typer.Argument(..., help="Latency traces (<session>.jsonl, as written to tracing.dir)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="The PNG to write (default: the first file, .png)"),
):
    """Draw latency traces: a waterfall of every turn's stages and the latency per turn."""
    _log_to_stderr("WARNING")
    from bot.waterfall import TraceFileError, load_traces, render

    try:
        sessions = load_traces(files)
    except TraceFileError as e:
        typer.secho(f"voxbot trace: {e}", fg="red", err=True)
        raise typer.Exit(2)
    out = out or files[0].with_suffix(".png")
    drawn = render(sessions=sessions, out=out)
    figures = ""
    if drawn["answered"]:
        figures = f", p50 {drawn['p50_ms']:.0f} ms, p95 {drawn['p95_ms']:.0f} ms"
    typer.echo(f"wrote {out}: {drawn['turns']} turns, {drawn['answered']} answered{figures}")


if __name__ == "__main__":
    app()
