"""``python -m lora_dreambooth train --settings run.json --checkpoint MODEL.safetensors --out DIR
[--webui A1111_DIR]``: the tab's run without A1111, on one process or, under ``accelerate
launch --num_processes N``, data-parallel on N (see ``distributed``).

``run.json`` holds the tab's / API's settings (``TrainConfig.to_dict()``, as the job's
settings endpoint gives them). The run writes what the tab writes: ``DIR/<name>.safetensors``,
its sidecar and card, and the run folder ``DIR/<name>-<YYYYmmdd-HHMMSS>/``. Ctrl-C or SIGTERM
stops after the current micro-batch and saves what was trained, as Cancel does; the exit code
is then 128 + the signal's number. Bad input is reported before any training, with exit code 1.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Optional

import torch

from . import checkpoint, distributed, export
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, TrainConfig
from .data import NoImagesError
from .embedding import PivotError
from .resume import ResumeError
from .run_files import new_run_dir
from .train import Progress, TrainCallbacks, TrainingError, TrainResult, train_lora

#: What a user can get wrong: reported in one line, without a traceback.
INPUT_ERRORS = (CheckpointError, ConfigError, NoImagesError, PivotError, ResumeError, TrainingError, OSError)


class InputError(ValueError):
    """A problem with the command line's files or folders."""


def read_settings(path: str) -> TrainConfig:
    """The settings file as a checked config: every unknown key and every invalid value named."""
    try:
        with open(path, encoding="utf-8") as f:
            values: Any = json.load(f)
    except OSError as error:
        raise InputError(f"cannot read the settings file {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise InputError(f"the settings file {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise InputError(f"the settings file {path} must hold one JSON object of settings")
    config = TrainConfig.from_dict(values)
    problems = config.problems()
    for label, folder, needed in (("instance image", config.instance_dir, True),
                                  ("class image", config.class_dir, config.prior_preservation)):
        if needed and not os.path.isdir(folder):
            problems.append(f"the {label} folder '{folder}' does not exist")
    if problems:
        raise ConfigError(problems)
    return config


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and prove a file can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise InputError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None


class StopOnSignal:
    """SIGINT and SIGTERM ask the run to stop and save (every later one too: ``accelerate
    launch`` passes a Ctrl-C on to its processes, which the terminal already sent them)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say: Callable[[str], None]):
        self.received: Optional[int] = None
        self._event = threading.Event()
        self._say = say
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            self._say(f"{signal.Signals(signum).name}: stopping after this micro-batch and saving what was trained")
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


class ProgressBar:
    """tqdm over the run's steps, with the phase, loss and learning rate."""

    def __init__(self) -> None:
        self.bar = None
        self.phase = ""
        self.last: Optional[Progress] = None

    def __call__(self, progress: Progress) -> None:
        from tqdm import tqdm

        if progress.phase != "training":
            if self.bar is not None:
                self.bar.set_description(progress.phase)
            elif progress.phase != self.phase:
                say(f"{progress.phase}…")
            self.phase = progress.phase
            return
        if self.bar is None:
            self.bar = tqdm(total=progress.total, initial=progress.step - 1, unit="step", desc="training",
                            dynamic_ncols=True)
        self.bar.set_postfix(loss=f"{progress.loss:.4f}", lr=f"{progress.lr:.2e}",
                             samples_s=f"{progress.samples_per_s:.2f}", refresh=False)
        self.bar.update(progress.step - self.bar.n)
        self.last = progress

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(message: str) -> None:
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_dreambooth train", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="run.json: the tab's settings (TrainConfig fields)")
    parser.add_argument("--checkpoint", required=True, help="the model, a .safetensors checkpoint")
    parser.add_argument("--out", required=True, help="folder for the LoRA, its sidecar and the run folder")
    parser.add_argument("--webui", help="an A1111 folder: its ldm/sgm and configs load the checkpoint")
    parser.add_argument("--no-half", action="store_true", help="keep the model in fp32 on a GPU (A1111's --no-half)")
    args = parser.parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # before the processes know each other
    try:
        config = read_settings(args.settings)
        checkpoint.inspect(args.checkpoint)
        check_writable(args.out)
        parallel = distributed.for_this_process()
        try:
            return _train(config, args, parallel)
        finally:
            parallel.close()
    except (InputError, *INPUT_ERRORS) as error:
        if main_process:
            problems = getattr(error, "problems", None)
            if problems and len(problems) > 1:
                print("error: the settings cannot train:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
            else:
                print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing trained yet (later it stops the run)
        if main_process:
            print("interrupted before training: nothing saved", file=sys.stderr)
        return 128 + signal.SIGINT


def _train(config: TrainConfig, args: argparse.Namespace, parallel: distributed.SingleProcess) -> int:
    device = parallel.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    talk = say if parallel.is_main else (lambda message: None)
    talk(f"loading {args.checkpoint}" + (f" with {args.webui}'s ldm/sgm" if args.webui else ""))
    quiet = contextlib.nullcontext() if parallel.is_main else contextlib.redirect_stdout(io.StringIO())
    with quiet:  # ldm prints as it builds the model: once is enough
        model = load_checkpoint(args.checkpoint, args.webui, device, half=not args.no_half)
    if parallel.num_processes > 1:
        talk(f"data-parallel on {parallel.num_processes} processes: each step takes batch × accumulation "
             "samples from each")
    bar = ProgressBar()
    with StopOnSignal(talk) as stop:
        callbacks = TrainCallbacks(on_progress=bar if parallel.is_main else None, should_stop=stop,
                                   on_log=talk)
        run_dir = new_run_dir(args.out, config.output_name)
        try:
            result = train_lora(model, config, args.out, run_dir, callbacks, parallel=parallel)
        finally:
            bar.close()
    if parallel.is_main:
        _report(result, bar.last)
    return 128 + stop.received if stop.received is not None else 0


def _report(result: TrainResult, last: Optional[Progress]) -> None:
    card = os.path.splitext(result.path)[0] + ".png" if result.path else None
    if card and result.previews:  # the card A1111 shows, as the tab writes it
        from PIL import Image
        with Image.open(result.previews[-1]) as image:
            cover = image.copy()
        export.atomic_write(card, lambda tmp: cover.save(tmp, format="PNG"))
    elif card and os.path.exists(card):  # an overwritten LoRA's card would show another run
        os.remove(card)
    rate = f" at {last.samples_per_s:.2f} samples/s" if last is not None else ""
    state = "stopped" if result.cancelled else "finished"
    print(f"{state} after {result.resumed_steps + result.steps_done} steps{rate}", flush=True)
    if result.path:
        print(f"saved {result.path}\nsaved {result.sidecar_path}", flush=True)
    else:
        print("nothing saved", flush=True)
    print(f"run folder {result.run_dir}", flush=True)
