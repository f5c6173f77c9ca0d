"""The "LoRA Train" tab (gradio 3.41, A1111's components and element-id conventions).

Left: dataset, class images, prompts (with the trigger check and "Show prior"), hyperparameters
(every TrainConfig field has a control ``#lora_train_<field>``; the resume fields are the
Resume group's). Right: Start / Cancel / Reset, A1111's progress bar and live preview, the
preview gallery, the loss curve, the log, "Send to txt2img", the last run's intermediate saves
and the contamination grid (ui_tools).

Start, "Generate class images", "Show prior" and "Render grid" go through
``wrap_gradio_gpu_call`` with the page's ``task(<id>)`` (javascript/lora_train.js), like A1111's
own textual-inversion training; Cancel, refresh, the upload buttons, the trigger check and
"Promote" do not touch the GPU and skip the queue."""
from __future__ import annotations

import dataclasses
import html
from typing import Any, Callable, Optional

import gradio as gr
import pandas as pd
from modules import call_queue, shared
from modules.ui_components import FormRow, ToolButton

from ..config import (LR_SCHEDULES, NETWORK_TYPES, OPTIMIZERS, PRECISIONS,
                      PRESETS, ConfigError, TrainConfig, apply_preset, epoch_arithmetic)
from ..export import SAVE_DTYPES
from ..families import FAMILY_FIELDS
from . import a1111, class_images, files, paths, settings
from .job import FAILED, JobStatus, RunRequest, TrainingJob, prepare_resume, request_problems
from .ui_tools import NO_RESUME, GridSection, IntermediatesSection, ResumeSection, TriggerCheck

PROMPT_FIELDS = ("trigger", "class_prompt", "preview_prompt", "preview_negative_prompt", "name", "overwrite")
MAIN_FIELDS = ("steps", "learning_rate", "batch_size", "gradient_accumulation", "rank", "alpha",
               "regularization", "network", "train_text_encoder", "preview_every", "preview_seed",
               "resolution")
_NOT_IN_FORM = ("instance_dir", "class_dir", "extra")  # folders come from the workspace
ADVANCED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                        if f.name not in PROMPT_FIELDS + MAIN_FIELDS + _NOT_IN_FORM)
#: Order of the Start button's inputs after the task id.
FORM_FIELDS = PROMPT_FIELDS + MAIN_FIELDS + ADVANCED_FIELDS
#: Advanced fields whose controls are the Resume group's (ui_tools.ResumeSection), not text boxes.
RESUME_FIELDS = ("resume_from", "resume_optimizer")
PRESET_FIELDS = tuple(dict.fromkeys(k for values in PRESETS.values() for k in values))

_CHOICES = {"network": NETWORK_TYPES, "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS,
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
    "conv_rank": "Convolution rank (LoCon/LoHa/LoKr)",
    "conv_alpha": "Convolution alpha",
    "text_encoder_lr": "Text encoder learning rate",
    "pivotal": "Pivotal tuning (train an embedding for the trigger, bundled in the LoRA)",
    "embedding_lr": "Embedding learning rate",
    "buckets": "Aspect-ratio buckets",
    "augment": "Augment (flip, small rotation, scale crops)",
    "flip": "Horizontal flip",
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
DEFAULT_CLASS_COUNT = 4


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


def _error_html(problems: list[str]) -> str:
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return f"<div class='error'><p>Nothing was started:</p><ul>{items}</ul></div>"


def _failure_html(status: JobStatus) -> str:
    """A failed run's reason for the error area (a refused resume says what to change)."""
    if status.state != FAILED or not status.error:
        return ""
    return f"<div class='error'><p>Training failed:</p><p>{html.escape(status.error)}</p></div>"


def _dataset_html(folder: str, report: Optional[files.UploadReport] = None) -> str:
    count = len(files.list_images(folder))
    text = f"<p>{count} image{'s' if count != 1 else ''} in {html.escape(folder)}</p>"
    if report and report.skipped:
        items = "".join(f"<li>{html.escape(name)}: {html.escape(reason)}</li>" for name, reason in report.skipped)
        text += f"<p>Skipped:</p><ul>{items}</ul>"
    return text


def arithmetic_text(images: int, batch_size: Any, accumulation: Any, steps: Any) -> str:
    """The lecture's line: '4 images, batch 2, accumulation 1, 400 steps → … epochs'."""
    try:
        batch, acc, total = int(batch_size), int(accumulation), int(steps)
    except (TypeError, ValueError):
        return "Enter whole numbers for steps, batch size and accumulation."
    return epoch_arithmetic(images, batch, acc, total).describe(batch, acc, total)


def _family_html(label: Optional[str]) -> str:
    if label is None:
        return "<p>Loaded model: none that can be trained (see the messages on Start).</p>"
    return f"<p>Loaded model: {html.escape(label)}</p>"


def _loss_frame(status: JobStatus) -> pd.DataFrame:
    return pd.DataFrame(status.losses, columns=["step", "loss"])


def _result_html(status: JobStatus) -> str:
    parts = [html.escape(status.text)] if status.text else []
    if status.error and status.error != status.text:
        parts.append(f"<span class='error'>{html.escape(status.error)}</span>")
    return "<br>".join(parts)


class _Handlers:
    """The tab's event handlers around the shared job."""

    def __init__(self, job: TrainingJob):
        self.job = job

    # --- datasets ---------------------------------------------------------------------------

    @staticmethod
    def _folder(kind: str) -> str:
        ws = paths.workspace()
        return ws.instance_dir if kind == "instance" else ws.class_dir

    def upload(self, kind: str) -> Callable:
        def handler(uploaded, *arith_inputs):
            folder = self._folder(kind)
            sources = [(f.name, getattr(f, "orig_name", None) or f.name) for f in uploaded or []]
            report = files.add_files(sources, folder)
            return (None, files.list_images(folder), _dataset_html(folder, report),
                    *self._arith(kind, arith_inputs))
        return handler

    def delete(self, kind: str) -> Callable:
        def handler(*arith_inputs):
            folder = self._folder(kind)
            files.clear_folder(folder)
            return ([], _dataset_html(folder), *self._arith(kind, arith_inputs))
        return handler

    def _arith(self, kind: str, inputs: tuple) -> tuple:
        if kind != "instance":
            return ()
        return (self.arithmetic(*inputs),)

    def arithmetic(self, steps, batch_size, accumulation) -> str:
        images = len(files.list_images(paths.workspace().instance_dir))
        return arithmetic_text(images, batch_size, accumulation, steps)

    def generate_class(self, id_task: str, prompt: str, count, negative: str, resolution, steps, cfg):
        folder = paths.workspace().class_dir
        if shared.sd_model is None:
            return files.list_images(folder), _dataset_html(folder), _error_html([a1111.NO_MODEL])
        if self.job.active:
            return files.list_images(folder), _dataset_html(folder), _error_html(["A training run is active."])
        try:
            request = class_images.ClassRequest(prompt, int(count), negative, int(resolution), int(steps), float(cfg))
        except (TypeError, ValueError):
            return files.list_images(folder), _dataset_html(folder), _error_html(["Enter a number of class images."])
        state = shared.state

        def on_image(i: int, total: int) -> None:
            state.job_count = total
            state.textinfo = f"Class image {i + 1}/{total}"

        message = class_images.generate(folder, request, lambda: state.interrupted or state.stopping_generation, on_image)
        return files.list_images(folder), f"{_dataset_html(folder)}<p>{html.escape(message)}</p>", ""

    # --- training ---------------------------------------------------------------------------

    def preset(self, name: str) -> list:
        config = apply_preset(TrainConfig(), name)
        return [getattr(config, field) for field in PRESET_FIELDS]

    @staticmethod
    def family_defaults() -> list:
        """The loaded model's family line, and its defaults in the family fields."""
        label, defaults = a1111.loaded_family()
        values = [defaults.get(field, gr.update()) for field in FAMILY_FIELDS]
        return [_family_html(label), *values]

    def start(self, id_task: str, *values) -> tuple:
        ws = paths.workspace()
        form = dict(zip(FORM_FIELDS, values))
        # The Resume group gives a LoRA's name; its optimizer state is looked up again now
        # (prepare_resume), as a run since the choice may have replaced the one shown.
        form["resume_from"] = "" if form["resume_from"] in (None, NO_RESUME) else form["resume_from"]
        form["resume_optimizer"] = ""
        try:
            config = TrainConfig.from_dict({**form, "instance_dir": ws.instance_dir,
                                            "class_dir": ws.class_dir})
        except ConfigError as error:
            return self._refused(error.problems)
        problems = prepare_resume(config) + request_problems(config)
        if problems:
            return self._refused(problems)
        if not self.job.claim(id_task, config):
            return self._refused(["A training run is already active (started through the API): "
                                  "wait for it or cancel it."])
        status = self.job.run(RunRequest(config, workspace=ws))
        return (*self._view(status), _failure_html(status))

    def _refused(self, problems: list[str]) -> tuple:
        return (*[gr.update()] * len(self._view(JobStatus())), _error_html(problems))

    def cancel(self) -> str:
        return "Stopping after this step; what was trained is saved." if self.job.cancel() else "No training is running."

    def refresh(self) -> tuple:
        return self._view(self.job.status())

    @staticmethod
    def _view(status: JobStatus) -> tuple:
        """Values for: output text, result, LoRA prompt, previews, loss curve, log."""
        return ("", _result_html(status), status.lora_prompt, status.previews, _loss_frame(status),
                "\n".join(status.log))

    def reset(self, steps, batch_size, accumulation) -> tuple:
        ws = paths.workspace()
        if self.job.active:
            return (gr.update(),) * 10 + (_error_html(["Cancel the running training first."]),)
        files.clear_folder(ws.instance_dir)
        files.clear_folder(ws.class_dir)
        self.job.reset()
        return ([], _dataset_html(ws.instance_dir), [], _dataset_html(ws.class_dir),
                *self._view(self.job.status())[1:], self.arithmetic(steps, batch_size, accumulation), "")


def create_tab(job: TrainingJob) -> list[tuple[gr.Blocks, str, str]]:
    """on_ui_tabs callback body: the tab for A1111's tab bar."""
    handlers = _Handlers(job)
    trigger_check, grid = TriggerCheck(job), GridSection(job)
    resume, intermediates = ResumeSection(), IntermediatesSection(job)
    preset_name = settings.get(settings.DEFAULT_PRESET)
    preset_name = preset_name if preset_name in PRESETS else next(iter(PRESETS))
    family, family_defaults = a1111.loaded_family()
    defaults = dataclasses.replace(apply_preset(TrainConfig(), preset_name), **family_defaults)
    ws = paths.workspace()
    fields: dict[str, gr.components.Component] = {}

    def add(names: tuple[str, ...]) -> None:
        for name in names:
            fields[name] = _field_component(name, getattr(defaults, name))

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact"):
                with gr.Tabs(elem_id="lora_train_tabs"):
                    with gr.Tab("Dataset", elem_id="lora_train_dataset_tab"):
                        instance_upload = gr.File(label="Instance images (your subject)", file_count="multiple",
                                                  file_types=["image"], elem_id="lora_train_instance_upload")
                        with gr.Row():
                            instance_add = gr.Button("Upload dataset", elem_id="lora_train_instance_add")
                            instance_delete = gr.Button("Delete dataset", elem_id="lora_train_instance_delete")
                        instance_info = gr.HTML(_dataset_html(ws.instance_dir), elem_id="lora_train_instance_info")
                        instance_gallery = gr.Gallery(value=files.list_images(ws.instance_dir), label="Dataset",
                                                      columns=6, height=260, elem_id="lora_train_instance_gallery")
                    with gr.Tab("Class images", elem_id="lora_train_class_tab"):
                        class_upload = gr.File(label="Class images (prior preservation)", file_count="multiple",
                                               file_types=["image"], elem_id="lora_train_class_upload")
                        with gr.Row():
                            class_add = gr.Button("Upload class images", elem_id="lora_train_class_add")
                            class_delete = gr.Button("Delete class images", elem_id="lora_train_class_delete")
                        with FormRow():
                            class_count = gr.Number(value=DEFAULT_CLASS_COUNT, precision=0, label="Class images to generate",
                                                    elem_id="lora_train_class_count")
                            class_generate = gr.Button("Generate class images", elem_id="lora_train_class_generate")
                        gr.Text(value="", show_label=False, elem_id="lora_train_class_output")  # JS progress
                        class_info = gr.HTML(_dataset_html(ws.class_dir), elem_id="lora_train_class_info")
                        class_gallery = gr.Gallery(value=files.list_images(ws.class_dir), label="Class images",
                                                   columns=6, height=260, elem_id="lora_train_class_gallery")
                    with gr.Tab("Prompts", elem_id="lora_train_prompts_tab"):
                        add(PROMPT_FIELDS[:1])  # the trigger, with its check right under it
                        trigger_check.build(defaults.trigger)
                        add(PROMPT_FIELDS[1:])
                    with gr.Tab("Hyperparameters", elem_id="lora_train_hyper_tab"):
                        with FormRow():
                            family_line = gr.HTML(_family_html(family), elem_id="lora_train_family")
                            family_button = gr.Button("Defaults for the loaded model",
                                                      elem_id="lora_train_family_defaults")
                        preset = gr.Dropdown(choices=list(PRESETS), value=preset_name,
                                             label="Preset", elem_id="lora_train_preset")
                        arithmetic = gr.HTML(handlers.arithmetic(defaults.steps, defaults.batch_size,
                                                                 defaults.gradient_accumulation),
                                             elem_id="lora_train_arithmetic")
                        add(MAIN_FIELDS)
                        with gr.Accordion("Advanced", open=False, elem_id="lora_train_advanced"):
                            add(tuple(f for f in ADVANCED_FIELDS if f not in RESUME_FIELDS))
                            resume.build()
                            fields["resume_from"], fields["resume_optimizer"] = resume.lora, resume.state
            with gr.Column():
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="lora_train_start")
                    cancel = gr.Button("Cancel", elem_id="lora_train_cancel")
                    reset = gr.Button("Reset", elem_id="lora_train_reset")
                    refresh = ToolButton("🔄", elem_id="lora_train_refresh")
                output = gr.Text(value="", show_label=False, elem_id="lora_train_output")
                progress = gr.HTML(elem_id="lora_train_progress")
                previews = gr.Gallery(label="Previews", columns=4, height=360, elem_id="lora_train_previews")
                loss = gr.LinePlot(value=_loss_frame(JobStatus()), x="step", y="loss", title="Loss",
                                   width=480, height=240, elem_id="lora_train_loss")
                result = gr.HTML(elem_id="lora_train_result")
                with FormRow():
                    lora_prompt = gr.Textbox(label="Prompt for txt2img", interactive=False,
                                             elem_id="lora_train_lora_prompt")
                    send = gr.Button("Send to txt2img", elem_id="lora_train_send")
                intermediates.build()
                grid.build(defaults.trigger, defaults.class_prompt)
                log = gr.Textbox(label="Log", lines=8, max_lines=8, interactive=False, elem_id="lora_train_log")
                error = gr.HTML(elem_id="lora_train_error")
        task_id = gr.Textbox(visible=False, elem_id="lora_train_task_id")

        arith_inputs = [fields["steps"], fields["batch_size"], fields["gradient_accumulation"]]
        instance_add.click(handlers.upload("instance"), inputs=[instance_upload, *arith_inputs],
                           outputs=[instance_upload, instance_gallery, instance_info, arithmetic])
        instance_delete.click(handlers.delete("instance"), inputs=arith_inputs,
                              outputs=[instance_gallery, instance_info, arithmetic])
        class_add.click(handlers.upload("class"), inputs=[class_upload],
                        outputs=[class_upload, class_gallery, class_info])
        class_delete.click(handlers.delete("class"), outputs=[class_gallery, class_info])
        class_generate.click(
            call_queue.wrap_gradio_gpu_call(handlers.generate_class, extra_outputs=[gr.update(), gr.update()]),
            _js="lora_train_start_class",
            inputs=[task_id, fields["class_prompt"], class_count, fields["preview_negative_prompt"],
                    fields["resolution"], fields["preview_steps"], fields["preview_cfg"]],
            outputs=[class_gallery, class_info, error])
        for component in arith_inputs:
            component.change(handlers.arithmetic, inputs=arith_inputs, outputs=[arithmetic], queue=False)
        family_button.click(handlers.family_defaults, outputs=[family_line, *[fields[f] for f in FAMILY_FIELDS]],
                            queue=False)
        preset.change(handlers.preset, inputs=[preset], outputs=[fields[f] for f in PRESET_FIELDS], queue=False)

        view = [output, result, lora_prompt, previews, loss, log]
        run = start.click(call_queue.wrap_gradio_gpu_call(handlers.start, extra_outputs=[gr.update()] * len(view)),
                          _js="lora_train_start", inputs=[task_id, *[fields[f] for f in FORM_FIELDS]],
                          outputs=[*view, error])
        render = [fields[f] for f in ("preview_negative_prompt", "preview_seed", "preview_steps", "preview_cfg",
                                      "resolution")]
        trigger_check.wire(fields["trigger"], fields["class_prompt"], render, task_id, error)
        grid.wire([render[0], *render[2:]], task_id, error, run, fields["class_prompt"])
        resume.wire(run)
        intermediates.wire(fields["overwrite"], error, run, resume, grid)
        cancel.click(handlers.cancel, outputs=[progress], queue=False)
        refresh.click(handlers.refresh, outputs=view, queue=False)
        reset.click(handlers.reset, inputs=arith_inputs,
                    outputs=[instance_gallery, instance_info, class_gallery, class_info, *view[1:], arithmetic, error])
        send.click(fn=None, _js="lora_train_send_to_txt2img", inputs=[lora_prompt], outputs=[])
    return [(tab, "LoRA Train", "lora_train")]
