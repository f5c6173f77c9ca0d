"""Engine progress → ``shared.state``, which A1111's progress bar (/internal/progress), its
/sdapi/v1/progress and the live preview read.

A training step is one A1111 "job" (``job_no`` of ``job_count``); ``sampling_step(s)`` are left
to the preview sampler, which moves them (and ``job_no``) while it runs, so every update
writes the whole picture again."""
from __future__ import annotations

import math
from typing import Optional

from PIL import Image
from modules import shared

from ..train import Progress


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


#: What the bar says in each phase before the first step (``train.PHASES``), so a user sees
#: why no step has come yet.
PHASE_TEXT = {
    "checking": "Checking the model…",
    "reading": "Reading images…",
    "encoding": "Encoding images and prompts…",
    "verifying": "Checking the model is unchanged…",
}

#: Phases whose ``Progress`` carries no step count of its own: the bar keeps the last one.
STEPLESS = ("checking", "reading", "verifying")


def describe(progress: Progress) -> str:
    """One line (A1111 shows textinfo in the bar only when it has no newline)."""
    if progress.phase == "encoding":
        return f"{PHASE_TEXT['encoding']} ({progress.step}/{progress.total} steps)"
    if progress.phase in PHASE_TEXT:
        return PHASE_TEXT[progress.phase]
    if progress.phase == "saving":
        return f"Saving after {progress.step}/{progress.total} steps…"
    loss = "–" if math.isnan(progress.loss) else f"{progress.loss:.4f}"
    return (f"Step {progress.step}/{progress.total} · loss {loss} · LR {progress.lr:.2e} · "
            f"ETA {format_eta(progress.eta_s)}")


class ProgressBridge:
    def __init__(self, total_steps: int):
        self.total = total_steps
        self.last: Optional[Progress] = None
        self.phase = "checking"
        self.text = PHASE_TEXT[self.phase]

    def start(self) -> None:
        self._write(0)

    def update(self, progress: Progress) -> None:
        self.phase = progress.phase
        self.text = describe(progress)
        if progress.phase not in STEPLESS:
            self.last = progress
            self.total = progress.total  # a resumed run counts on from the file's steps
        self.rewrite()

    def rewrite(self) -> None:
        """Put our numbers back after a preview render moved them."""
        self._write(self.last.step if self.last else 0)

    def show(self, image: Image.Image) -> None:
        shared.state.assign_current_image(image)

    def _write(self, step: int) -> None:
        state = shared.state
        state.job_count = self.total
        state.job_no = min(step, self.total)
        state.sampling_step = 0
        state.sampling_steps = 0
        state.textinfo = self.text
