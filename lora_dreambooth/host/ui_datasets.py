"""The tab's datasets: the instance images (the subject) and the class images (prior
preservation) — upload, delete, gallery and count, and for class images "Generate class
images" through A1111's txt2img — and the lecture's epoch line, which counts the instance images.

Like ui_tools' sections, each is built where it appears (``build``) and wired once every
control it reads exists (``wire``)."""
from __future__ import annotations

import html
from typing import Any, Optional

import gradio as gr
from modules import call_queue, shared
from modules.ui_components import FormRow

from ..config import epoch_arithmetic
from . import a1111, class_images, files, paths
from .job import TrainingJob
from .ui_tools import problems_html

DEFAULT_CLASS_COUNT = 4


def dataset_html(folder: str, report: Optional[files.UploadReport] = None) -> str:
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


class EpochLine:
    """The epoch line under the preset, kept current as steps, batch size or accumulation change
    and as instance images come and go."""

    def build(self, steps: int, batch_size: int, accumulation: int) -> None:
        self.html = gr.HTML(self.text(steps, batch_size, accumulation), elem_id="lora_train_arithmetic")

    def wire(self, steps: gr.components.Component, batch_size: gr.components.Component,
             accumulation: gr.components.Component) -> None:
        self.inputs = [steps, batch_size, accumulation]
        for component in self.inputs:
            component.change(self.text, inputs=self.inputs, outputs=[self.html], queue=False)

    @staticmethod
    def text(steps, batch_size, accumulation) -> str:
        images = len(files.list_images(paths.workspace().instance_dir))
        return arithmetic_text(images, batch_size, accumulation, steps)


class DatasetSection:
    """Upload, delete and show one workspace folder: ``kind`` "instance" or "class"."""

    #: Per kind: upload box, upload button, delete button and gallery labels.
    LABELS = {"instance": ("Instance images (your subject)", "Upload dataset", "Delete dataset", "Dataset"),
              "class": ("Class images (prior preservation)", "Upload class images", "Delete class images",
                        "Class images")}

    def __init__(self, kind: str):
        self.kind = kind
        self.epoch_line: Optional[EpochLine] = None

    def folder(self) -> str:
        ws = paths.workspace()
        return ws.instance_dir if self.kind == "instance" else ws.class_dir

    def build(self) -> None:
        upload, add, delete, gallery = self.LABELS[self.kind]
        prefix = f"lora_train_{self.kind}"
        self.upload = gr.File(label=upload, file_count="multiple", file_types=["image"], elem_id=f"{prefix}_upload")
        with gr.Row():
            self.add = gr.Button(add, elem_id=f"{prefix}_add")
            self.delete = gr.Button(delete, elem_id=f"{prefix}_delete")
        self._build_tools()
        self.info = gr.HTML(dataset_html(self.folder()), elem_id=f"{prefix}_info")
        self.gallery = gr.Gallery(value=files.list_images(self.folder()), label=gallery, columns=6, height=260,
                                  elem_id=f"{prefix}_gallery")

    def _build_tools(self) -> None:
        """Controls between the buttons and the count (none here)."""

    def wire(self, epoch_line: Optional[EpochLine] = None) -> None:
        """``epoch_line``: recounted after each upload and delete (the instance images)."""
        self.epoch_line = epoch_line
        counted, line = (epoch_line.inputs, [epoch_line.html]) if epoch_line else ([], [])
        self.add.click(self.add_files, inputs=[self.upload, *counted],
                       outputs=[self.upload, self.gallery, self.info, *line])
        self.delete.click(self.clear, inputs=counted, outputs=[self.gallery, self.info, *line])

    def add_files(self, uploaded, *counted) -> tuple:
        folder = self.folder()
        sources = [(f.name, getattr(f, "orig_name", None) or f.name) for f in uploaded or []]
        report = files.add_files(sources, folder)
        return (None, files.list_images(folder), dataset_html(folder, report), *self._recount(counted))

    def clear(self, *counted) -> tuple:
        folder = self.folder()
        files.clear_folder(folder)
        return ([], dataset_html(folder), *self._recount(counted))

    def _recount(self, counted: tuple) -> tuple:
        return (self.epoch_line.text(*counted),) if self.epoch_line else ()


class ClassImagesSection(DatasetSection):
    """The class images, with "Generate class images" (A1111's txt2img, reused while the
    prompt and the model are unchanged)."""

    def __init__(self, job: TrainingJob):
        super().__init__("class")
        self.job = job

    def _build_tools(self) -> None:
        with FormRow():
            self.count = gr.Number(value=DEFAULT_CLASS_COUNT, precision=0, label="Class images to generate",
                                   elem_id="lora_train_class_count")
            self.generate = gr.Button("Generate class images", elem_id="lora_train_class_generate")
        gr.Text(value="", show_label=False, elem_id="lora_train_class_output")  # JS progress

    def wire_generate(self, task_id: gr.Textbox, class_prompt: gr.Textbox, render: list, error: gr.HTML) -> None:
        """``render``: negative prompt, resolution, steps and CFG controls."""
        self.generate.click(
            call_queue.wrap_gradio_gpu_call(self.render, extra_outputs=[gr.update(), gr.update()]),
            _js="lora_train_start_class", inputs=[task_id, class_prompt, self.count, *render],
            outputs=[self.gallery, self.info, error])

    def render(self, id_task: str, prompt: str, count, negative: str, resolution, steps, cfg) -> tuple:
        folder = self.folder()
        if shared.sd_model is None:
            return files.list_images(folder), dataset_html(folder), problems_html([a1111.NO_MODEL], "started")
        if self.job.active:
            return files.list_images(folder), dataset_html(folder), problems_html(["A training run is active."],
                                                                                  "started")
        try:
            request = class_images.ClassRequest(prompt, int(count), negative, int(resolution), int(steps), float(cfg))
        except (TypeError, ValueError):
            return (files.list_images(folder), dataset_html(folder),
                    problems_html(["Enter a number of class images."], "started"))
        state = shared.state

        def on_image(i: int, total: int) -> None:
            state.job_count = total
            state.textinfo = f"Class image {i + 1}/{total}"

        message = class_images.generate(folder, request, lambda: state.interrupted or state.stopping_generation, on_image)
        return files.list_images(folder), f"{dataset_html(folder)}<p>{html.escape(message)}</p>", ""
