"""Engine progress → ``shared.state``, which A1111's progress bar (/internal/progress), its
/sdapi/v1/progress and the live preview read.

A1111's bar shows ``textinfo`` followed by its own percentage and ETA, both computed from
``job_no/job_count`` (plus ``sampling_step/sampling_steps`` within the current job) and the
time since the run began. So ``textinfo`` carries no ETA of its own (two would disagree), and
every preview is a job of its own beside the training steps: the preview sampler moves
``sampling_step`` and ends with ``state.nextjob()``, which then lands exactly on the next job,
and the bar never goes backwards. Every update writes the whole picture again."""
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
    return f"Step {progress.step}/{progress.total} · loss {loss} · LR {progress.lr:.2e}"


def planned_previews(first: int, total: int, every: int) -> int:
    """How many previews steps ``first+1 … total`` draw: every ``every`` steps and at the last
    step (loop.py's rule)."""
    if every <= 0 or total <= first:
        return 0
    return total // every - first // every + (1 if total % every else 0)


class ProgressBridge:
    """``steps``: this run's training steps; ``preview_every``: the config's."""

    def __init__(self, steps: int, preview_every: int = 0):
        self.steps, self.preview_every = steps, preview_every
        self.total = steps
        self.previews_done = 0
        self.last: Optional[Progress] = None
        self.phase = "checking"
        self.text = PHASE_TEXT[self.phase]

    @property
    def jobs(self) -> int:
        """Training steps and previews of this run: A1111's ``job_count``."""
        return self.steps + planned_previews(self.total - self.steps, self.total, self.preview_every)

    def start(self) -> None:
        self._write()

    def update(self, progress: Progress) -> None:
        self.phase = progress.phase
        self.text = describe(progress)
        if progress.phase not in STEPLESS:
            self.last = progress
            self.total = progress.total  # a resumed run counts on from the file's steps
        self._write()

    def begin_preview(self, step: int) -> None:
        """Before a preview renders: say so; the sampler fills this job's share of the bar."""
        self.text = f"Drawing the preview at step {step}/{self.total}…"
        self._write()

    def end_preview(self) -> None:
        """After a preview (drawn or cut short): the bar counts it done, the text is the step's."""
        self.previews_done += 1
        self.text = describe(self.last) if self.last else self.text
        self._write()

    def show(self, image: Image.Image) -> None:
        shared.state.assign_current_image(image)

    def _write(self) -> None:
        state = shared.state
        done = (self.last.step if self.last else self.total - self.steps) - (self.total - self.steps)
        state.job_count = self.jobs
        state.job_no = min(max(done, 0) + self.previews_done, state.job_count)
        state.sampling_step = 0
        state.sampling_steps = 0
        state.textinfo = self.text
