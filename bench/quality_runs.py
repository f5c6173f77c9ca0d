"""Single runs of the DreamBooth quality task with any training setting changed: the
experiments the quality table's notes quote (README, *Training quality*), one line each.

    python bench/quality_runs.py "preset=Dedicated rank=4 alpha=4" "preset=Dedicated"
    python bench/quality_runs.py "network=locon steps=200 batch_size=16 learning_rate=2e-3 regularization=1" --class-images 32

Each argument is one run: ``Row`` fields (network, preset, text_encoder, pivotal, precision,
regularization, steps, learning_rate, batch_size) and any other ``TrainConfig`` field (rank,
alpha, text_encoder_lr…), as ``name=value``. Prints fidelity, class drift and unrelated
adherence read by the judge, as the table does, with fewer seeds by default.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quality import base_model, judge as judging  # noqa: E402
from quality.dreambooth import Probe, Row, figures, prepare_task, train_and_sample  # noqa: E402

ROW_FIELDS = {f.name for f in dataclasses.fields(Row)}


def parse_run(text: str) -> tuple[Row, dict]:
    """``"preset=Dedicated rank=4"`` → the Row and the TrainConfig changes on top of it."""
    values = {}
    for item in text.split():
        name, _, value = item.partition("=")
        try:
            values[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            values[name] = value  # a bare word: network=locon
    row = Row(**{k: v for k, v in values.items() if k in ROW_FIELDS})
    return row, {k: v for k, v in values.items() if k not in ROW_FIELDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help='one run each, e.g. "preset=Dedicated rank=4 alpha=4"')
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--unrelated-seeds", type=int, default=16)
    parser.add_argument("--class-images", type=int, default=4, help="the tab's default is 4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [parse_run(text) for text in args.runs]
    probe = Probe(args.seeds, args.unrelated_seeds)
    model, judge = base_model.load(), judging.load()
    with tempfile.TemporaryDirectory(prefix="quality-runs-") as work:
        base = prepare_task(model, work, probe, args.class_images)
        before = figures(judge, base, base, probe)
        print(f"{args.seeds} seeds, {args.unrelated_seeds} per unrelated prompt, {args.class_images} class images; "
              f"base: fidelity {before.fidelity:.0%}, unrelated {before.unrelated:.0%}", flush=True)
        for text, (row, changes) in zip(args.runs, runs):
            started = time.time()
            config = dataclasses.replace(row.config(os.path.join(work, "instance"), os.path.join(work, "class"), name="run"),
                                         **changes)
            after = figures(judge, train_and_sample(model, row, work, probe, config).samples, base, probe)
            print(f"{text}: fidelity {after.fidelity:.0%}, class drift {after.class_character:.0%}, "
                  f"TV {after.class_tv:.2f}, unrelated {after.unrelated:.0%} ({time.time() - started:.0f} s)", flush=True)
    command = "python bench/quality_runs.py " + " ".join(f'"{a}"' if " " in a else a for a in (argv or sys.argv[1:]))
    print(f"reproduce with: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
