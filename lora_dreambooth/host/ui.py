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

import dataclasses
import html
from typing import Any, Optional

import gradio as gr
import pandas as pd
from modules import call_queue
from modules.ui_components import FormRow, ToolButton

from .. import networks
from ..config import (LR_SCHEDULES, OPTIMIZERS, PRECISIONS,
                      PRESETS, ConfigError, TrainConfig, apply_preset)
from ..export import SAVE_DTYPES
from ..families import FAMILY_FIELDS
from . import a1111, files, paths, settings
from .job import FAILED, JobStatus, prepare_resume, request_problems
from .runner import QueueRunner
from .ui_datasets import ClassImagesSection, DatasetSection, EpochLine, dataset_html
from .ui_queue import QueueSection
from .ui_tools import NO_RESUME, GridSection, IntermediatesSection, ResumeSection, TriggerCheck, problems_html

PROMPT_FIELDS = ("trigger", "class_prompt", "preview_prompt", "preview_negative_prompt", "name", "overwrite")
MAIN_FIELDS = ("steps", "learning_rate", "batch_size", "gradient_accumulation", "rank", "alpha",
               "regularization", "network", "train_text_encoder", "preview_every", "preview_seed",
               "resolution")
_NOT_IN_FORM = ("instance_dir", "class_dir")  # folders come from the workspace
ADVANCED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                        if f.name not in PROMPT_FIELDS + MAIN_FIELDS + _NOT_IN_FORM)
#: Order of the Start button's inputs after the task id.
FORM_FIELDS = PROMPT_FIELDS + MAIN_FIELDS + ADVANCED_FIELDS
#: Advanced fields whose controls are the Resume group's (ui_tools.ResumeSection), not text boxes.
RESUME_FIELDS = ("resume_from", "resume_optimizer")
PRESET_FIELDS = tuple(dict.fromkeys(k for values in PRESETS.values() for k in values))

_CHOICES = {"network": networks.NAMES, "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS,
            "precision": PRECISIONS, "save_dtype": tuple(SAVE_DTYPES)}
_SLIDERS = {"rank": (1, 128, 1), "batch_size": (1, 16, 1), "resolution": (64, 2048, 64)}
_MULTILINE = ("preview_negative_prompt", "comment")
_LABELS = {
    "trigger": "Trigger word (your subject's token, e.g. wpg)",
    "class_prompt": "Class prompt (e.g. woman)",
    "preview_prompt": "Preview prompt",
    "preview_negative_prompt": "Preview negative prompt",
    "name": "LoRA name",
    "overwrite": "Overwrite a LoRA with this name",
    "steps": "Training steps",
    "gradient_accumulation": "Gradient accumulation",
    "rank": "LoRA rank (higher: more capacity, larger file)",
    "alpha": "LoRA alpha",
    "regularization": "Regularization strength (0 = off: Dedicated; 0.1–1 with class images: Generative)",
    "network": "Network type",
    "train_text_encoder": "Train the text encoder",
    "preview_every": "Preview every N steps (0 = no previews)",
    "lr_schedule": "LR schedule",
    "lr_warmup_steps": "LR warmup steps",
    "max_grad_norm": "Gradient clipping norm (0 = off)",
    "conv_rank": f"Convolution rank ({networks.conv_labels()})",
    "conv_alpha": "Convolution alpha",
    "text_encoder_lr": "Text encoder learning rate",
    "pivotal": "Pivotal tuning (train an embedding for the trigger, bundled in the LoRA)",
    "embedding_lr": "Embedding learning rate",
    "buckets": "Aspect-ratio buckets",
    "augment": "Augment (flip, small rotation, scale crops)",
    "flip": "Horizontal flip",
    "shuffle_tags": "Shuffle caption tags at every use (kohya shuffle_caption)",
    "keep_tokens": "Keep the first N tags in place (1 = the trigger; never dropped)",
    "tag_dropout": "Tag dropout (probability of dropping each other tag at every use)",
    "seed": "Training seed",
    "gradient_checkpointing": "Gradient checkpointing (less VRAM, slower)",
    "min_snr_gamma": "Min-SNR gamma (0 = off)",
    "preview_cfg": "Preview CFG scale",
    "save_every": "Save every N steps (0 = only the final file)",
    "save_dtype": "Save precision",
    "save_optimizer": "Save optimizer state (for exact resume)",
    "comment": "Comment (stored in the file's metadata)",
}
_PLACEHOLDERS = {"preview_prompt": "(empty: the trigger word)", "name": "(empty: the trigger word)"}


def _label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " ").capitalize())


def _field_component(name: str, value: Any) -> gr.components.Component:
    common = {"label": _label(name), "elem_id": f"lora_train_{name}"}
    if name in _CHOICES:
        return gr.Dropdown(choices=list(_CHOICES[name]), value=value, **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **common)
    if name in _SLIDERS:
        low, high, step = _SLIDERS[name]
        return gr.Slider(minimum=low, maximum=high, step=step, value=value, **common)
    if isinstance(value, (int, float)):
        return gr.Number(value=value, precision=0 if isinstance(value, int) else None, **common)
    return gr.Textbox(value=value, lines=3 if name in _MULTILINE else 1,
                      placeholder=_PLACEHOLDERS.get(name, ""), **common)


def _failure_html(status: JobStatus) -> str:
    """A failed run's reason for the error area (a refused resume says what to change)."""
    if status.state != FAILED or not status.error:
        return ""
    return f"<div class='error'><p>Training failed:</p><p>{html.escape(status.error)}</p></div>"


def _family_html(label: Optional[str]) -> str:
    if label is None:
        return "<p>Loaded model: none that can be trained (see the messages on Start).</p>"
    return f"<p>Loaded model: {html.escape(label)}</p>"


def _loss_frame(status: JobStatus) -> pd.DataFrame:
    return pd.DataFrame(status.losses, columns=["step", "loss"])


def config_from_form(*values) -> tuple[Optional[TrainConfig], list[str]]:
    """The run the form's values (in FORM_FIELDS order) describe on the tab's images, checked
    against the loaded model; (None or config, problems)."""
    ws = paths.workspace()
    form = dict(zip(FORM_FIELDS, values))
    # The Resume group gives a LoRA's name; its optimizer state is looked up again now
    # (prepare_resume), as a run since the choice may have replaced the one shown.
    form["resume_from"] = "" if form["resume_from"] in (None, NO_RESUME) else form["resume_from"]
    form["resume_optimizer"] = ""
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


class _Form:
    """Every TrainConfig control (``#lora_train_<field>``) on the Prompts and Hyperparameters
    tabs, starting from the default preset and the loaded model's family defaults, with the
    preset drop-down, "Defaults for the loaded model" and the epoch line."""

    def __init__(self) -> None:
        preset = settings.get(settings.DEFAULT_PRESET)
        self.preset_name = preset if preset in PRESETS else next(iter(PRESETS))
        self.family, family_defaults = a1111.loaded_family()
        self.defaults = dataclasses.replace(apply_preset(TrainConfig(), self.preset_name), **family_defaults)
        self.fields: dict[str, gr.components.Component] = {}
        self.epoch_line = EpochLine()

    def controls(self, names: tuple[str, ...]) -> list[gr.components.Component]:
        return [self.fields[name] for name in names]

    def _add(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.fields[name] = _field_component(name, getattr(self.defaults, name))

    def build_prompts(self, trigger_check: TriggerCheck) -> None:
        self._add(PROMPT_FIELDS[:1])  # the trigger, with its check right under it
        trigger_check.build(self.defaults.trigger)
        self._add(PROMPT_FIELDS[1:])

    def build_hyperparameters(self, resume: ResumeSection) -> None:
        with FormRow():
            self.family_line = gr.HTML(_family_html(self.family), elem_id="lora_train_family")
            self.family_button = gr.Button("Defaults for the loaded model", elem_id="lora_train_family_defaults")
        self.preset = gr.Dropdown(choices=list(PRESETS), value=self.preset_name, label="Preset",
                                  elem_id="lora_train_preset")
        self.epoch_line.build(self.defaults.steps, self.defaults.batch_size, self.defaults.gradient_accumulation)
        self._add(MAIN_FIELDS)
        with gr.Accordion("Advanced", open=False, elem_id="lora_train_advanced"):
            self._add(tuple(f for f in ADVANCED_FIELDS if f not in RESUME_FIELDS))
            resume.build()
            self.fields["resume_from"], self.fields["resume_optimizer"] = resume.lora, resume.state

    def wire(self) -> None:
        self.epoch_line.wire(*self.controls(("steps", "batch_size", "gradient_accumulation")))
        self.family_button.click(self.family_values, outputs=[self.family_line, *self.controls(FAMILY_FIELDS)],
                                 queue=False)
        self.preset.change(self.preset_values, inputs=[self.preset], outputs=self.controls(PRESET_FIELDS), queue=False)

    @staticmethod
    def preset_values(name: str) -> list:
        config = apply_preset(TrainConfig(), name)
        return [getattr(config, field) for field in PRESET_FIELDS]

    @staticmethod
    def family_values() -> list:
        """The loaded model's family line, and its defaults in the family fields."""
        label, defaults = a1111.loaded_family()
        values = [defaults.get(field, gr.update()) for field in FAMILY_FIELDS]
        return [_family_html(label), *values]


class _RunPanel:
    """The right column: Start / Cancel / Reset / refresh around the shared job, A1111's
    progress area, previews, loss curve, result with "Send to txt2img", the tools' sections,
    the log and the error area."""

    def __init__(self, runner: QueueRunner, queue: QueueSection):
        self.runner, self.job, self.queue = runner, runner.job, queue

    def build(self, intermediates: IntermediatesSection, grid: GridSection, defaults: TrainConfig) -> None:
        with gr.Row():
            self.start = gr.Button("Start training", variant="primary", elem_id="lora_train_start")
            self.queue.build_button()
            self.cancel = gr.Button("Cancel", elem_id="lora_train_cancel")
            self.reset = gr.Button("Reset", elem_id="lora_train_reset")
            self.refresh = ToolButton("🔄", elem_id="lora_train_refresh")
        self.output = gr.Text(value="", show_label=False, elem_id="lora_train_output")
        self.progress = gr.HTML(elem_id="lora_train_progress")
        self.previews = gr.Gallery(label="Previews", columns=4, height=360, elem_id="lora_train_previews")
        self.loss = gr.LinePlot(value=_loss_frame(JobStatus()), x="step", y="loss", title="Loss",
                                width=480, height=240, elem_id="lora_train_loss")
        self.result = gr.HTML(elem_id="lora_train_result")
        with FormRow():
            self.lora_prompt = gr.Textbox(label="Prompt for txt2img", interactive=False,
                                          elem_id="lora_train_lora_prompt")
            self.send = gr.Button("Send to txt2img", elem_id="lora_train_send")
        self.queue.build()
        intermediates.build()
        grid.build(defaults.trigger, defaults.class_prompt)
        self.log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id="lora_train_log")
        self.error = gr.HTML(elem_id="lora_train_error")

    def wire(self, task_id: gr.Textbox, form: _Form, datasets: tuple[DatasetSection, ...]) -> Any:
        """Wires the buttons; returns Start's event (the tools refresh when a run ends)."""
        view = [self.output, self.result, self.lora_prompt, self.previews, self.loss, self.log]
        run = self.start.click(call_queue.wrap_gradio_gpu_call(self.on_start, extra_outputs=[gr.update()] * len(view)),
                               _js="lora_train_start", inputs=[task_id, *form.controls(FORM_FIELDS)],
                               outputs=[*view, self.error])
        self.cancel.click(self.on_cancel, outputs=[self.progress], queue=False)
        self.refresh.click(self.on_refresh, outputs=view, queue=False)
        self.reset_outputs = [*(c for d in datasets for c in (d.gallery, d.info)), *view[1:], form.epoch_line.html,
                              self.error]
        self.reset.click(self.on_reset, inputs=form.epoch_line.inputs, outputs=self.reset_outputs)
        self.send.click(fn=None, _js="lora_train_send_to_txt2img", inputs=[self.lora_prompt], outputs=[])
        return run

    def on_start(self, id_task: str, *values) -> tuple:
        config, problems = config_from_form(*values)
        if problems:
            return self._refused(problems)
        status = self.runner.run_now(config, paths.workspace())
        if status is None:
            return self._refused(["A training run is already active (a queued job, or one started through "
                                  "the API): wait for it, cancel it, or use Add to queue."])
        return (*self._view(status), _failure_html(status))

    def _refused(self, problems: list[str]) -> tuple:
        return (*[gr.update()] * len(self._view(JobStatus())), problems_html(problems, "started"))

    def on_cancel(self) -> str:
        return "Stopping after this step; what was trained is saved." if self.job.cancel() else "No training is running."

    def on_refresh(self) -> tuple:
        return self._view(self.job.status())

    @staticmethod
    def _view(status: JobStatus) -> tuple:
        """Values for: output text, result, LoRA prompt, previews, loss curve, log."""
        return ("", _result_html(status), status.lora_prompt, status.previews, _loss_frame(status),
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
    form, panel = _Form(), _RunPanel(runner, QueueSection(runner))
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
        render = form.controls(("preview_negative_prompt", "preview_seed", "preview_steps", "preview_cfg", "resolution"))
        classes.wire_generate(task_id, form.fields["class_prompt"], [render[0], render[4], *render[2:4]], panel.error)
        run = panel.wire(task_id, form, (instance, classes))
        trigger_check.wire(form.fields["trigger"], form.fields["class_prompt"], render, task_id, panel.error)
        grid.wire([render[0], *render[2:]], task_id, panel.error, run, form.fields["class_prompt"])
        resume.wire(run)
        intermediates.wire(form.fields["overwrite"], panel.error, run, resume, grid)
        panel.queue.wire(form.controls(FORM_FIELDS), config_from_form, run)
    return [(tab, "LoRA Train", "lora_train")]
