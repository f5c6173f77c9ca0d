"""The "LoRA Train" tab (gradio 3.41, A1111's components and element-id conventions).

Left: dataset, class images, prompts (with the trigger check and "Show prior"), hyperparameters
(every TrainConfig field has a control ``#lora_train_<field>``; the resume fields are the
Resume group's). Right: Start / Add to queue / Cancel / Reset, A1111's progress bar and live
preview, the preview gallery, the loss curve, the log, "Send to txt2img", the run queue
(ui_queue), the last run's intermediate saves and the contamination grid (ui_tools). The
dataset tabs and the epoch line are ui_datasets'. Start runs through the shared runner
(``runner.run_now``), so its runs are listed with the queued ones.

Start, "Generate class images", "Show prior" and "Render grid" go through
``wrap_gradio_gpu_call`` with the page's ``task(<id>)`` (javascript/lora_train.js), like A1111's
own textual-inversion training; Cancel, refresh, the upload buttons, the trigger check and
"Promote" do not touch the GPU and skip the queue."""
from __future__ import annotations

import html
from typing import Any, Optional

import altair as alt
import gradio as gr
import pandas as pd
from modules import call_queue
from modules.ui_components import FormRow, ToolButton

from ..config import ConfigError, TrainConfig
from . import files, paths
from .job import FAILED, JobStatus, prepare_resume, request_problems
from .runner import QueueRunner
from .ui_datasets import ClassImagesSection, DatasetSection, EpochLine, dataset_html
from .ui_form import FORM_FIELDS, Form, class_images_hint, network_name
from .ui_queue import QueueSection
from .ui_tools import NO_RESUME, GridSection, IntermediatesSection, ResumeSection, TriggerCheck, problems_html


_ACTIVE = ("A training run is already active (a queued job, or one started through the API): "
           "wait for it, cancel it, or use Add to queue.")


def _failure_html(status: JobStatus) -> str:
    """A failed run's reason for the message area (a refused resume says what to change)."""
    if status.state != FAILED or not status.error:
        return ""
    return f"<div class='error'><p>Training failed:</p><p>{html.escape(status.error)}</p></div>"


def _loss_chart(status: JobStatus) -> alt.Chart:
    """The loss per step, whole steps on the x axis (gradio's LinePlot would tick 1.0, 1.1, …)."""
    frame = pd.DataFrame(status.losses, columns=["step", "loss"])
    return alt.Chart(frame).mark_line(point=len(frame) < 30).encode(
        x=alt.X("step:Q", axis=alt.Axis(format="d", tickMinStep=1), title="step"),
        y=alt.Y("loss:Q", title="loss"),
    ).properties(width=420, height=200)


def config_from_form(*values) -> tuple[Optional[TrainConfig], list[str]]:
    """The run the form's values (in FORM_FIELDS order) describe on the tab's images, checked
    against the loaded model; (None or config, problems)."""
    ws = paths.workspace()
    form = dict(zip(FORM_FIELDS, values))
    # The Resume group gives a LoRA's name; its optimizer state is looked up again now
    # (prepare_resume), as a run since the choice may have replaced the one shown.
    form["resume_from"] = "" if form["resume_from"] in (None, NO_RESUME) else form["resume_from"]
    form["resume_optimizer"] = ""
    form["network"] = network_name(form["network"])
    try:
        config = TrainConfig.from_dict({**form, "instance_dir": ws.instance_dir, "class_dir": ws.class_dir})
    except ConfigError as error:
        return None, error.problems
    return config, prepare_resume(config) + request_problems(config)


def _result_html(status: JobStatus) -> str:
    parts = [html.escape(status.text)] if status.text else []
    if status.error and status.error != status.text:
        parts.append(f"<span class='error'>{html.escape(status.error)}</span>")
    return "<br>".join(parts)


class _RunPanel:
    """The right column: Start / Cancel / Reset / refresh around the shared job with the
    message line right under them, A1111's progress area, previews, loss curve, result with
    "Send to txt2img", the tools' sections and the log.

    Start is two events. The first (no queue) checks the form and puts the reason it refuses,
    or nothing, in the message line at once, and sets ``go``; the second (the GPU queue, with
    the page's progress bar) trains only when ``go`` is set, and sets ``ran`` to its job id, so
    what follows a run (the grid, the Lora lists) knows a refused Start ran nothing."""

    def __init__(self, runner: QueueRunner, queue: QueueSection):
        self.runner, self.job, self.queue = runner, runner.job, queue

    def build(self, intermediates: IntermediatesSection, grid: GridSection, defaults: TrainConfig) -> None:
        with gr.Row():
            self.start = gr.Button("Start training", variant="primary", elem_id="lora_train_start")
            self.queue.build_button()
            # A1111's key handler (script.js) clicks the tab's button[id$=_interrupt] on Esc while
            # its style.display is "block" (javascript/lora_train.js sets that during a run).
            self.cancel = gr.Button("Cancel", elem_id="lora_train_interrupt")
            self.reset = gr.Button("Reset", elem_id="lora_train_reset")
            self.refresh = ToolButton("🔄", elem_id="lora_train_refresh")
        self.error = gr.HTML(elem_id="lora_train_error")
        self.output = gr.Text(value="", show_label=False, elem_id="lora_train_output")
        self.result = gr.HTML(elem_id="lora_train_result")
        self.previews = gr.Gallery(label="Previews", columns=4, height=360, elem_id="lora_train_previews")
        self.loss = gr.Plot(_loss_chart(JobStatus()), label="Loss", elem_id="lora_train_loss")
        with FormRow():
            self.lora_prompt = gr.Textbox(label="Prompt for txt2img", interactive=False,
                                          elem_id="lora_train_lora_prompt")
            self.send = gr.Button("Send to txt2img", elem_id="lora_train_send")
        self.queue.build()
        intermediates.build()
        grid.build(defaults.trigger, defaults.class_prompt)
        self.log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id="lora_train_log")
        self.go = gr.Textbox(visible=False, elem_id="lora_train_go")
        self.ran = gr.Textbox(visible=False, elem_id="lora_train_ran")

    def wire(self, tab: gr.Blocks, task_id: gr.Textbox, form: Form, datasets: tuple[DatasetSection, ...]) -> Any:
        """Wires the buttons; returns Start's run event (the tools refresh when a run ends)."""
        view = [self.output, self.result, self.lora_prompt, self.previews, self.loss, self.log]
        controls = form.controls(FORM_FIELDS)
        self.unchanged = [gr.update()] * (len(view) + 2)
        # The error HTML comes last: A1111's wrapper appends its timing there, and on an
        # exception puts its message there after ``extra_outputs``.
        gpu_start = call_queue.wrap_gradio_gpu_call(self.on_start, extra_outputs=[gr.update()] * (len(view) + 1))
        run = self.start.click(self.check_start, inputs=controls, outputs=[self.error, self.go], queue=False,
                               show_progress=False).then(
            lambda id_task, go, *values: gpu_start(id_task, *values) if go else self.unchanged,
            _js="lora_train_start", inputs=[task_id, self.go, *controls], outputs=[*view, self.ran, self.error],
            show_progress=False)  # A1111's bar and live preview show the run, no spinners over it
        self.cancel.click(self.on_cancel, outputs=[self.error], queue=False)
        self.refresh.click(self.on_refresh, outputs=view, queue=False, show_progress=False)
        shown = [c for d in datasets for c in (d.gallery, d.info)]
        # The page is built once, when A1111 starts; each page load shows what is on disk now.
        tab.load(self.on_load, inputs=[*form.epoch_line.inputs, form.fields["regularization"]],
                 outputs=[*view, *shown, form.epoch_line.html, form.class_hint], queue=False)
        self.reset_outputs = [*shown, *view[1:], form.epoch_line.html, self.error]
        self.reset.click(self.on_reset, inputs=form.epoch_line.inputs, outputs=self.reset_outputs)
        self.send.click(fn=None, _js="lora_train_send_to_txt2img", inputs=[self.lora_prompt], outputs=[])
        return run

    def _config(self, values: tuple) -> tuple[Optional[TrainConfig], list[str]]:
        """(config, []) for the form's values, or (None, every problem)."""
        config, problems = config_from_form(*values)
        if not problems and self.job.active:
            problems = [_ACTIVE]
        return (None, problems) if problems else (config, [])

    def check_start(self, *values) -> tuple[str, str]:
        """The message line and ``go`` for Start's run event."""
        _config, problems = self._config(values)
        return (problems_html(problems, "started"), "") if problems else ("", "go")

    def on_start(self, id_task: str, *values) -> tuple:
        config, problems = self._config(values)  # checked again: a queued or API run may have started since
        status = self.runner.run_now(config, paths.workspace()) if config is not None else None
        if status is None:
            return (*self.unchanged[:-2], "", problems_html(problems or [_ACTIVE], "started"))
        return (*self._view(status), status.job, _failure_html(status))

    def on_cancel(self) -> str:
        if self.job.cancel():
            return "<p class='lora-train-info'>Stopping after this step; what was trained is saved.</p>"
        return "<p class='lora-train-info'>No training is running.</p>"

    def on_refresh(self) -> tuple:
        return self._view(self.job.status())

    def on_load(self, steps, batch_size, accumulation, regularization) -> tuple:
        """What the page built at A1111's start no longer knows: the datasets on disk, the
        last run and the epoch line."""
        ws = paths.workspace()
        shown = (files.list_images(ws.instance_dir), dataset_html(ws.instance_dir),
                 files.list_images(ws.class_dir), dataset_html(ws.class_dir))
        return (*self.on_refresh(), *shown, EpochLine.text(steps, batch_size, accumulation),
                class_images_hint(regularization))

    @staticmethod
    def _view(status: JobStatus) -> tuple:
        """Values for: output text, result, LoRA prompt, previews, loss curve, log."""
        return ("", _result_html(status), status.lora_prompt, status.previews, _loss_chart(status),
                "\n".join(status.log))

    def on_reset(self, steps, batch_size, accumulation) -> tuple:
        """Empties both datasets and forgets the last run; refused (nothing changed) while one runs."""
        if self.job.active:
            unchanged = [gr.update()] * (len(self.reset_outputs) - 1)
            return (*unchanged, problems_html(["Cancel the running training first."], "started"))
        ws = paths.workspace()
        files.clear_folder(ws.instance_dir)
        files.clear_folder(ws.class_dir)
        self.job.reset()
        return ([], dataset_html(ws.instance_dir), [], dataset_html(ws.class_dir),
                *self._view(self.job.status())[1:], EpochLine.text(steps, batch_size, accumulation), "")


def create_tab(runner: QueueRunner) -> list[tuple[gr.Blocks, str, str]]:
    """on_ui_tabs callback body: the tab for A1111's tab bar."""
    job = runner.job
    form, panel = Form(), _RunPanel(runner, QueueSection(runner))
    instance, classes = DatasetSection("instance"), ClassImagesSection(job)
    trigger_check, grid = TriggerCheck(job), GridSection(job)
    resume, intermediates = ResumeSection(), IntermediatesSection(job)
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact"):
                with gr.Tabs(elem_id="lora_train_tabs"):
                    with gr.Tab("Dataset", elem_id="lora_train_dataset_tab"):
                        instance.build()
                    with gr.Tab("Class images", elem_id="lora_train_class_tab"):
                        classes.build()
                    with gr.Tab("Prompts", elem_id="lora_train_prompts_tab"):
                        form.build_prompts(trigger_check)
                    with gr.Tab("Hyperparameters", elem_id="lora_train_hyper_tab"):
                        form.build_hyperparameters(resume)
            with gr.Column():
                panel.build(intermediates, grid, form.defaults)
        task_id = gr.Textbox(visible=False, elem_id="lora_train_task_id")

        form.wire()
        instance.wire(form.epoch_line)
        classes.wire()
        form.wire_class_images(classes.info)
        render = form.controls(("preview_negative_prompt", "preview_seed", "preview_steps", "preview_cfg", "resolution"))
        classes.wire_generate(task_id, form.fields["class_prompt"], [render[0], render[4], *render[2:4]], panel.error)
        run = panel.wire(tab, task_id, form, (instance, classes))
        trigger_check.wire(form.fields["trigger"], form.fields["class_prompt"], render, task_id, panel.error)
        grid.wire([render[0], *render[2:]], task_id, panel.error, run, form.fields["class_prompt"], panel.ran)
        resume.wire(run)
        intermediates.wire(form.fields["overwrite"], panel.error, run, resume, grid)
        panel.queue.wire(form.controls(FORM_FIELDS), config_from_form, run)
    return [(tab, "LoRA Train", "lora_train")]
