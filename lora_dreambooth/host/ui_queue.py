"""The tab's run queue: *Add to queue* beside *Start*, and the Queue section — every job with
its state, checkpoint and result, *Start queue*, and for the chosen job *Remove* (a queued
one leaves the queue, a finished one the list), *Resume* (an interrupted, cancelled or failed
one, from its last save) and *Copy as command* (its ``run.json`` and the headless command).

None of these touch the GPU: *Add to queue* copies the images and hands the job to the
runner, which trains it under A1111's queue lock when its turn comes."""
from __future__ import annotations

import html
from typing import Any, Callable, Optional

import gradio as gr
from modules.ui_components import FormRow, ToolButton

from ..config import TrainConfig
from .runner import QueueRunner
from .ui_tools import problems_html

#: (config, problems) from the form's values (the tab's own reading of its controls).
ConfigFromForm = Callable[..., tuple[Optional[TrainConfig], list[str]]]


def _cell(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def queue_html(jobs: list[dict[str, Any]], paused: bool, notice: str) -> str:
    """The job list: one row per job, newest last."""
    if not jobs:
        return "<p>No jobs yet: <b>Add to queue</b> queues the settings and images above.</p>"
    rows = []
    for job in jobs:
        place = f"#{job['position']}" if job["position"] else ""
        result = job["output"] or ""
        error = f"<span class='error'>{_cell(job['error'])}</span>" if job["error"] else ""
        rows.append(f"<tr><td>{place}</td><td>{_cell(job['job'])}</td><td>{_cell(job['name'] or '')}</td>"
                    f"<td>{_cell(job['state'])}</td><td>{_cell(job['checkpoint'])}</td>"
                    f"<td>{_cell(job['text'])}<br>{_cell(result)}{error}</td></tr>")
    head = "<tr><th></th><th>job</th><th>LoRA</th><th>state</th><th>checkpoint</th><th>result</th></tr>"
    lines = [f"<p class='error'>{_cell(notice)}</p>" if notice else "",
             "<p>The queue is paused: press <b>Start queue</b>.</p>" if paused and any(j["state"] == "queued"
                                                                                        for j in jobs) else "",
             f"<table class='lora-train-queue'>{head}{''.join(rows)}</table>"]
    return "".join(lines)


class QueueSection:
    def __init__(self, runner: QueueRunner):
        self.runner = runner

    def build_button(self) -> None:
        """*Add to queue*, in the row of *Start*."""
        self.add = gr.Button("Add to queue", elem_id="lora_train_queue_add")

    def build(self) -> None:
        with gr.Accordion("Queue", open=True, elem_id="lora_train_queue_section"):
            self.table = gr.HTML(elem_id="lora_train_queue")
            with FormRow():
                self.choice = gr.Dropdown(label="Job", choices=[], elem_id="lora_train_queue_job")
                self.refresh = ToolButton("🔄", elem_id="lora_train_queue_refresh")
            with gr.Row():
                self.start = gr.Button("Start queue", elem_id="lora_train_queue_start")
                self.remove = gr.Button("Remove", elem_id="lora_train_queue_remove")
                self.resume = gr.Button("Resume", elem_id="lora_train_queue_resume")
                self.command_button = gr.Button("Copy as command", elem_id="lora_train_queue_command")
            self.command = gr.Textbox(label="Headless command (its run.json is written in the job's folder)",
                                      interactive=False, show_copy_button=True,
                                      elem_id="lora_train_queue_command_text")
            self.message = gr.HTML(elem_id="lora_train_queue_message")

    def wire(self, form_inputs: list, config_from_form: ConfigFromForm, run: Any) -> None:
        """``run``: Start's event; the list refreshes when that run ends."""
        self.config_from_form = config_from_form
        listing = [self.table, self.choice]
        self.add.click(self.on_add, inputs=form_inputs, outputs=[*listing, self.message], queue=False)
        self.refresh.click(self.on_refresh, outputs=listing, queue=False)
        self.start.click(self.on_start_queue, outputs=[*listing, self.message], queue=False)
        for button, action in ((self.remove, self.runner.remove), (self.resume, self.runner.resume)):
            button.click(self._action(action), inputs=[self.choice], outputs=[*listing, self.message], queue=False)
        self.command_button.click(self.on_command, inputs=[self.choice], outputs=[self.command, self.message],
                                  queue=False)
        run.then(self.on_refresh, outputs=listing, queue=False)

    def on_refresh(self) -> tuple:
        """The list, and the job choices (the chosen one kept when it is still there)."""
        self.runner.dispatch()  # a job waiting for its checkpoint may run now
        jobs = self.runner.jobs()
        queue = self.runner.queue
        choices = [f"{job['job']} · {job['name'] or ''} · {job['state']}" for job in jobs]
        return queue_html(jobs, queue.paused, queue.notice), gr.update(choices=choices)

    def on_add(self, *values) -> tuple:
        config, problems = self.config_from_form(*values)
        if problems:
            return (*self.on_refresh(), problems_html(problems, "queued"))
        record = self.runner.add(config, "tab queue")
        described = self.runner.describe(record)
        place = "started" if described["state"] != "queued" else f"#{described['position']} in the queue"
        message = f"<p>Job {html.escape(record.id)} ({html.escape(config.output_name)}): {place}. " \
                  f"{html.escape(described['text'])}</p>"
        return (*self.on_refresh(), message)

    def on_start_queue(self) -> tuple:
        self.runner.start()
        return (*self.on_refresh(), "<p>Queue started.</p>")

    @staticmethod
    def _job_id(choice: Optional[str]) -> str:
        return (choice or "").split(" ", 1)[0]

    def _action(self, action: Callable[[str], tuple[bool, str]]) -> Callable:
        def on_click(choice: Optional[str]) -> tuple:
            if not self._job_id(choice):
                return (*self.on_refresh(), problems_html(["Choose a job first."], "done"))
            done, message = action(self._job_id(choice))
            shown = f"<p>{html.escape(message)}</p>" if done else problems_html([message], "done")
            return (*self.on_refresh(), shown)
        return on_click

    def on_command(self, choice: Optional[str]) -> tuple:
        written = self.runner.write_run_json(self._job_id(choice)) if self._job_id(choice) else None
        if written is None:
            return "", problems_html(["Choose a job first."], "shown")
        path, command = written
        return command, f"<p>Settings written to {html.escape(path)}</p>"
