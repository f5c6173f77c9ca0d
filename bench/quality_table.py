"""The DreamBooth quality table (issue 14): does a LoRA trained by this tab learn the subject,
keep the class, and leave everything else alone? Measured on the world's base model
(``quality/``) with its judge, on CPU.

    python bench/quality_table.py                 # the whole table (about 55 min on 2 cores)
    python bench/quality_table.py --rows presets  # Dedicated and Generative only
    python bench/quality_table.py --rows longer --first-seed 5000   # the longer runs, other seeds

Prints the judge's held-out accuracy, the base model's prompt adherence, then one line per
run; writes the table (Markdown and JSON) and a picture of samples before and after training
to ``bench/results/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quality import base_model, judge as judging, world  # noqa: E402
from quality.dreambooth import (Figures, Probe, Row, Samples, applied_like_a1111, draw_samples, figures,  # noqa: E402
                                prepare_task, train_and_sample)
from quality import sampling  # noqa: E402
from lora_dreambooth.model import make_backend  # noqa: E402

PRESET_ROWS = [Row(preset="Dedicated"), Row(preset="Generative"), Row(preset="Generative", regularization=1.0),
               Row(preset="Dedicated", pivotal=True), Row(preset="Generative", regularization=1.0, pivotal=True)]
#: The presets with a longer training budget: in this world even full fine-tuning of the
#: UNet needs about 800 steps to learn the subject (``bench/quality_budget.py``; README,
#: *Training quality*), so the presets' 200 and 400 steps are read next to these.
#: Batch 16 at 2e-3 gives the subject the same 3200 samples as 1600 steps of batch 2, in a
#: quarter of the time on this CPU (a step's cost is mostly fixed here).
LONGER_ROWS = [Row(preset="Dedicated", steps=1600), Row(network="locon", steps=800),
               Row(preset="Generative", regularization=1.0, pivotal=True, steps=800, learning_rate=1e-3),
               Row(network="locon", steps=200, batch_size=16, learning_rate=2e-3),
               Row(network="locon", steps=200, batch_size=16, learning_rate=2e-3, regularization=1.0)]
ROWS = PRESET_ROWS + LONGER_ROWS + [
    Row(network="locon"), Row(network="loha"), Row(network="lokr"), Row(network="dora"),
    Row(text_encoder=True), Row(precision="bf16"),
]
#: Rows whose written file is also applied the A1111 way, at these weights.
A1111_OF = [(LONGER_ROWS[0], (1.0, 0.5)), (LONGER_ROWS[1], (1.0,)), (LONGER_ROWS[3], (1.0,))]
#: Rows whose samples the picture shows (after the base model's).
PICTURED = [PRESET_ROWS[0]] + LONGER_ROWS


def base_adherence(model, judge, seeds: int) -> float:
    things = [t for t in world.ALL_THINGS for _ in range(seeds)]
    pictures = sampling.sample(make_backend(model), [t.caption for t in things],
                               [5_000 + i for i in range(len(things))])
    return judging.read(judge, pictures).adherence(things)


def orange_circle_floor(model, judge, seeds: int) -> float:
    """How often the judge calls the base model's own orange circles the character: the
    fidelity a LoRA would score that only painted circles orange."""
    pictures = sampling.sample(make_backend(model), ["a orange circle"] * seeds, [9_000 + i for i in range(seeds)])
    return judging.read(judge, pictures).fraction_character()


def strips_of(label: str, samples: Samples, unrelated_seeds: int) -> list[tuple[str, torch.Tensor]]:
    """Picture rows of one run: ``wpg circle``, ``a circle``, and every other unrelated thing
    (its first seed), where a subject that leaks into other prompts shows."""
    every_other_thing = samples.unrelated[::2 * unrelated_seeds] if unrelated_seeds else samples.unrelated
    return [(f"{label}: wpg circle", samples.fidelity), (f"{label}: a circle", samples.klass),
            (f"{label}: unrelated", every_other_thing)]


def picture_strip(rows: list[tuple[str, torch.Tensor]], count: int = 9) -> Image.Image:
    """One row of ``count`` pictures per label, 2× enlarged, labels in a column on the left
    as wide as the longest label."""
    from PIL import ImageDraw
    cell = world.SIZE * 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 12 + max(int(measure.textlength(label)) for label, _ in rows)
    strip = Image.new("RGB", (left + cell * count, cell * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for r, (label, pictures) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), label, fill="black")
        for c, picture in enumerate(pictures[:count]):
            image = Image.fromarray(picture.permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            strip.paste(image, (left + c * cell, r * cell))
    return strip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=("all", "presets", "longer"), default="all")
    # 384 seeds: a binomial 95% interval of at most ±5 points on every fraction
    parser.add_argument("--seeds", type=int, default=384, help="pictures of 'wpg circle' and of 'a circle' per run")
    parser.add_argument("--unrelated-seeds", type=int, default=16, help="pictures of each of the 18 unrelated things")
    parser.add_argument("--first-seed", type=int, default=1_000, help="first sampling seed (to check the spread)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    command = "python bench/quality_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    probe = Probe(args.seeds, args.unrelated_seeds, args.first_seed)

    lines: list[dict] = []
    report: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        report.append(text)

    judge = judging.load()
    models = {"fp32": base_model.load()}
    accuracy = judging.report_accuracy(judge, models["fp32"])
    for kind, acc in accuracy.items():
        say(f"judge, held-out {kind} pictures: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    adherence = base_adherence(models["fp32"], judge, seeds=16)
    say(f"base model prompt adherence (24 prompts × 16 seeds, DPM++ 2M 20 steps CFG 5): {adherence:.1%}")
    floor = orange_circle_floor(models["fp32"], judge, args.seeds)
    say(f"judge on the base model's 'a orange circle' pictures ({args.seeds} seeds): {floor:.0%} called the character "
        f"(the fidelity of a LoRA that only paints circles orange)")

    header = ("| run | fidelity before → after | class: character | class: TV distance | grid 'moved' % "
              "| unrelated adherence before → after |\n|---|---|---|---|---|---|")
    say("")
    say(header)
    with tempfile.TemporaryDirectory(prefix="quality-") as work:
        base_samples = {"fp32": prepare_task(models["fp32"], work, probe)}
        before = {"fp32": figures(judge, base_samples["fp32"], base_samples["fp32"], probe)}
        strips = strips_of("base", base_samples["fp32"], probe.unrelated_seeds)
        files = {}

        def emit(label: str, precision: str, after: Figures) -> None:
            b = before[precision]
            line = {"run": label, "precision": precision, **dataclasses.asdict(after),
                    "fidelity_before": b.fidelity, "unrelated_before": b.unrelated}
            lines.append(line)
            say(f"| {label} | {b.fidelity:.0%} → {after.fidelity:.0%} | {b.class_character:.0%} → "
                  f"{after.class_character:.0%} | {after.class_tv:.2f} | {after.class_moved:.1f} | "
                  f"{b.unrelated:.0%} → {after.unrelated:.0%} |")

        for row in {"all": ROWS, "presets": PRESET_ROWS, "longer": LONGER_ROWS}[args.rows]:
            if row.precision not in models:
                models[row.precision] = base_model.load(dtype=getattr(torch, {"bf16": "bfloat16"}[row.precision]))
                base_samples[row.precision] = draw_samples(models[row.precision], probe)
                before[row.precision] = figures(judge, base_samples[row.precision], base_samples[row.precision], probe)
            run = train_and_sample(models[row.precision], row, work, probe)
            files[row] = run.path
            emit(row.label + " (in process)", row.precision, figures(judge, run.samples, base_samples[row.precision], probe))
            if row in PICTURED:
                strips += strips_of(row.label, run.samples, probe.unrelated_seeds)
        for row, multipliers in A1111_OF:
            if row not in files:
                continue
            for multiplier in multipliers:
                with applied_like_a1111(models["fp32"], files[row], multiplier):
                    samples = draw_samples(models["fp32"], probe)
                emit(f"{row.label} file, A1111 @ {multiplier:g}", "fp32", figures(judge, samples, base_samples["fp32"], probe))

    elapsed = time.time() - started
    say("")
    say(f"{elapsed / 60:.1f} min on {os.cpu_count()} cores; reproduce with: {command}")
    os.makedirs(args.out, exist_ok=True)
    suffix = ("" if args.rows == "all" else f"_{args.rows}") + ("" if args.first_seed == 1_000 else f"_seed{args.first_seed}")
    stem = os.path.join(args.out, "quality_table" + suffix)
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump({"command": command, "minutes": round(elapsed / 60, 1), "judge_accuracy": accuracy,
                   "base_adherence": adherence, "orange_circle_floor": floor, "probe": dataclasses.asdict(probe), "runs": lines}, f, indent=2)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write("\n".join(report) + "\n")
    picture_strip(strips).save(stem + "_samples.png")
    print(f"wrote {stem}.md, {stem}.json and {stem}_samples.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
