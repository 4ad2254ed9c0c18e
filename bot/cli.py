"""`voxbot serve | talk | prepare | bench | trace`."""

from __future__ import annotations

import asyncio
import json
import sys
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


def _config(path: Path | None, *, log_level: str = "INFO") -> Config:
    logger.remove()
    logger.add(sys.stderr, level=log_level)
    try:
        return load_config(path)
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2)


def _load_models(config: Config):
    from bot.models import load_models

    try:
        return load_models(config)
    except MissingModelError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(3)


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
    from bot.server import create_server

    config = _config(config_path)
    host = host or config.server.host
    port = port if port is not None else config.server.port
    typer.echo(f"voxbot: serving on http://{host}:{port} (models load in the background; see /ready)")
    create_server(config, host=host, port=port).run()


@app.command()
def prepare(config_path: Path | None = ConfigOption):
    """Locate every model the config needs (assembling Kokoro once) and load each once."""
    config = _config(config_path)
    models = _load_models(config)
    typer.echo(json.dumps({"prepared": models.describe()}, indent=2))


@app.command()
def talk(
    wav: Path = typer.Argument(..., exists=True, dir_okay=False, help="The user's side of the conversation"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the bot's audio here"),
    as_json: bool = typer.Option(False, "--json", help="Print the turns as JSON"),
    config_path: Path | None = ConfigOption,
):
    """Run the full bot on a WAV file, in real time, and report each turn."""
    from bot.conversation import run_conversation

    config = _config(config_path, log_level="WARNING" if as_json else "INFO")
    audio = read_wav(wav, sample_rate=config.audio.in_sample_rate)
    models = _load_models(config)
    result = asyncio.run(run_conversation(config=config, models=models, audio=audio))
    if out:
        sf.write(str(out), result.bot_audio(), config.audio.out_sample_rate, subtype="PCM_16")
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for i, t in enumerate(summary["turns"]):
            typer.echo(f"turn {i}: {t['voice_to_voice_ms']} ms\n  user: {t['user_text']}\n  bot:  {t['bot_text']}")


if __name__ == "__main__":
    app()
