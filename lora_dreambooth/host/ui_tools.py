"""Tools of the tab. Two from the lecture's way of working: the trigger check under the trigger
box (how the model's tokenizer reads it, rare single tokens to pick, "Show prior") and the
contamination grid (offered when a run ends, or for any LoRA in the Lora folder). Two for going
on from a run: the Resume group (a LoRA of the Lora folder to continue, in Advanced) and the
last run's intermediate saves, promoted into the Lora folder on demand.

Each is built where it appears (``build``) and wired once every control it reads exists
(``wire``). Renders go through ``wrap_gradio_gpu_call`` like txt2img; the check itself only
tokenizes and skips the queue."""
from __future__ import annotations

import html
from typing import Any, Optional

import gradio as gr
from modules import call_queue, shared
from modules.ui_components import FormRow, ToolButton

from .. import networks, resume
from ..grid import DEFAULT_PROMPTS, DEFAULT_WEIGHTS, Grid, GridRequest
from . import a1111, contamination, paths, token_check
from .job import TrainingJob

BUSY = "A training run is active: wait for it or cancel it."
#: The Resume drop-down's first choice: train a new LoRA.
NO_RESUME = "none"


def problems_html(problems: list[str], what: str = "rendered") -> str:
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return f"<div class='error'><p>Nothing was {what}:</p><ul>{items}</ul></div>"


def _number(value: Any, kind: type) -> Any:
    """A gradio Number/Slider value as int or float; the raw value when it is not a number
    (the request's own checks then name the field)."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        return value


def parse_weights(text: str) -> list:
    """"0.5, 1" → [0.5, 1.0]; a piece that is not a number stays text (and is refused)."""
    return [_number(piece.strip(), float) for piece in str(text or "").split(",") if piece.strip()]


def parse_prompts(text: str) -> list[str]:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


class TriggerCheck:
    def __init__(self, job: TrainingJob):
        self.job = job

    def build(self, trigger: str) -> None:
        line, suggestions = self._line(trigger)
        self.info = gr.HTML(line, elem_id="lora_train_token_info")
        with FormRow():
            self.suggestions = gr.Dropdown(
                choices=suggestions, value=None, elem_id="lora_train_token_suggestions",
                label="Rare single tokens (the lecture's list, checked in the loaded model's tokenizer)")
            self.show_prior = gr.Button("Show prior", elem_id="lora_train_show_prior")
        self.prior = gr.Gallery(label="What the model draws without a LoRA (trigger, class)", columns=2,
                                height=220, elem_id="lora_train_prior")

    def wire(self, trigger: gr.Textbox, class_prompt: gr.Textbox, render: list, task_id: gr.Textbox,
             error: gr.HTML) -> None:
        """``render``: negative prompt, seed, steps, CFG and resolution controls."""
        trigger.change(self.check, inputs=[trigger], outputs=[self.info, self.suggestions], queue=False)
        self.suggestions.change(self.use, inputs=[self.suggestions], outputs=[trigger], queue=False)
        self.show_prior.click(call_queue.wrap_gradio_gpu_call(self.render, extra_outputs=[gr.update()]),
                              _js="lora_train_start_prior", inputs=[task_id, trigger, class_prompt, *render],
                              outputs=[self.prior, error])

    def check(self, text: str) -> tuple[str, dict]:
        """The line under the trigger box and the suggestion list."""
        line, suggestions = self._line(text)
        return line, gr.update(choices=suggestions, value=text if text in suggestions else None)

    @staticmethod
    def _line(text: str) -> tuple[str, list[str]]:
        report, problem = token_check.check(text)
        if report is None:  # no line before A1111 has loaded a model (the page may come first)
            return ("" if shared.sd_model is None else f"<p>{html.escape(problem)}</p>"), []
        pieces = "".join(f"<code>{html.escape(p)}</code> " for p in report.pieces)
        # An ordinary word or a split trigger must not look like the good case.
        warning = bool(report.pieces) and (report.ordinary_word or not report.single_token)
        style = " style='color: var(--error-text-color, #b91c1c); font-weight: bold'" if warning else ""
        mark = "⚠ " if warning else ("✓ " if report.pieces else "")
        return (f"<p class='lora-train-token {'warning' if warning else 'info'}'{style}>"
                f"{mark}{html.escape(report.describe())}"
                f"{'<br>pieces: ' + pieces if report.pieces else ''}</p>", report.suggestions)

    @staticmethod
    def use(suggestion: Optional[str]) -> Any:
        return suggestion if suggestion else gr.update()

    def render(self, id_task: str, trigger: str, class_word: str, negative: str, seed, steps, cfg,
               resolution) -> tuple:
        if shared.sd_model is None:
            return gr.update(), problems_html([a1111.NO_MODEL])
        if self.job.active:
            return gr.update(), problems_html([BUSY])
        try:
            request = token_check.PriorRequest(trigger, class_word, negative, int(seed), int(steps), float(cfg),
                                               int(resolution))
        except (TypeError, ValueError):
            return gr.update(), problems_html(["Enter numbers for seed, steps, CFG and resolution."])
        shown = token_check.render_prior(request)
        return [(image, caption) for image, caption in shown], ""


class GridSection:
    def __init__(self, job: TrainingJob):
        self.job = job

    def build(self, trigger: str, class_word: str) -> None:
        with gr.Accordion("Contamination grid", open=False, elem_id="lora_train_grid") as self.section:
            gr.HTML("<p>One seed; rows: the trigger, the class word, the empty prompt, 'a photo of' the "
                    "class and the prompts below; columns: no LoRA and the LoRA at each weight. "
                    "<i>moved</i> is how far the strongest weight moved each picture (mean pixel "
                    "change, % of 255): the trigger should move, the empty prompt and the class "
                    "should not (a Dedicated model contaminates them; prior preservation repairs "
                    "that).</p>")
            with FormRow():
                self.lora = gr.Dropdown(choices=contamination.available_loras(), value=None, label="LoRA",
                                        elem_id="lora_train_grid_lora")
                self.refresh = ToolButton("🔄", elem_id="lora_train_grid_refresh")
            with FormRow():
                self.trigger = gr.Textbox(trigger, label="Trigger", elem_id="lora_train_grid_trigger")
                self.class_word = gr.Textbox(class_word, label="Class word (e.g. woman)",
                                             elem_id="lora_train_grid_class")
            self.prompts = gr.Textbox("\n".join(DEFAULT_PROMPTS), lines=3, elem_id="lora_train_grid_prompts",
                                      label="Generativeness prompts, one a line ({trigger} and {class} are filled in)")
            with FormRow():
                self.weights = gr.Textbox(", ".join(f"{w:g}" for w in DEFAULT_WEIGHTS), label="LoRA weights",
                                          elem_id="lora_train_grid_weights")
                self.seed = gr.Number(1, precision=0, label="Seed", elem_id="lora_train_grid_seed")
                self.button = gr.Button("Render grid", variant="primary", elem_id="lora_train_grid_render")
            self.output = gr.Text(value="", show_label=False, elem_id="lora_train_grid_output")
            self.image = gr.Image(type="pil", interactive=False, label="Grid", elem_id="lora_train_grid_image")
            self.rows = gr.HTML(elem_id="lora_train_grid_rows")

    def wire(self, render: list, task_id: gr.Textbox, error: gr.HTML, run_end, class_prompt: gr.Textbox,
             ran: gr.Textbox) -> None:
        """``render``: negative prompt, steps, CFG and resolution controls; ``run_end``: the
        Start event, after which the grid is offered for the LoRA just written when ``ran``
        (the job id of that Start's run; empty when it was refused)."""
        self.refresh.click(self.refreshed, outputs=[self.lora], queue=False)
        self.lora.change(self.chosen, inputs=[self.lora], outputs=[self.trigger], queue=False)
        self.button.click(call_queue.wrap_gradio_gpu_call(self.render, extra_outputs=[gr.update(), gr.update()]),
                          _js="lora_train_start_grid",
                          inputs=[task_id, self.lora, self.trigger, self.class_word, self.prompts, self.weights,
                                  self.seed, *render],
                          outputs=[self.image, self.rows, error])
        run_end.then(self.offer, inputs=[ran, class_prompt], outputs=[self.section, self.lora, self.class_word])

    @staticmethod
    def refreshed() -> dict:
        return gr.update(choices=contamination.available_loras())

    @staticmethod
    def chosen(name: Optional[str]) -> Any:
        """Picking a LoRA fills in the trigger its card stores (A1111's "activation text")."""
        text = contamination.activation_text(name) if name else ""
        return text if text else gr.update()

    def offer(self, ran: str, class_prompt: str) -> tuple:
        """After a run that wrote a LoRA: open the grid with it selected (not after a refused Start)."""
        status = self.job.status()
        if not ran or status.job != ran or not status.name or not status.output:
            return gr.update(), gr.update(), gr.update()
        return (gr.update(open=True), gr.update(choices=contamination.available_loras(), value=status.name),
                class_prompt if class_prompt and class_prompt.strip() else gr.update())

    def render(self, id_task: str, lora: str, trigger: str, class_word: str, prompts: str, weights: str, seed,
               negative: str, steps, cfg, resolution) -> tuple:
        if self.job.active:
            return gr.update(), gr.update(), problems_html([BUSY])
        request = GridRequest(lora=lora or "", trigger=trigger or "", class_word=class_word or "",
                              prompts=parse_prompts(prompts), seed=_number(seed, int),
                              weights=parse_weights(weights), negative_prompt=negative or "",
                              steps=_number(steps, int), cfg_scale=_number(cfg, float),
                              resolution=_number(resolution, int))
        problems = contamination.request_problems(request)
        if problems:
            return gr.update(), gr.update(), problems_html(problems)
        outcome = contamination.run(request, self.job.status())
        if outcome.grid is None:
            return gr.update(), f"<p>{html.escape(outcome.message)}</p>", ""
        return outcome.grid.image, rows_html(request, outcome.grid, outcome.path), ""


def rows_html(request: GridRequest, grid: Grid, path: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(row.prompt) or '<i>(empty prompt)</i>'}</td><td>{row.moved:.1f}%</td></tr>"
                   for row in grid.rows)
    return (f"<table><tr><th>prompt</th><th>moved at weight {request.strongest:g}</th></tr>{rows}</table>"
            f"<p>Saved {html.escape(path)}</p>")


def _error_line(message: str) -> str:
    return f"<p class='error'>{html.escape(message)}</p>"


def _resume_choices() -> list[str]:
    return [NO_RESUME, *contamination.available_loras()]


def _metadata_number(metadata: dict[str, str], key: str) -> str:
    try:
        return f"{float(metadata[key]):g}"
    except (KeyError, ValueError):
        return "?"


def resume_summary(source: resume.ResumeSource, state: str) -> str:
    """What the file was trained with (the settings a resume must repeat), its steps and the
    optimizer state found for it, as one paragraph."""
    meta = source.metadata
    network = networks.from_metadata(meta)
    parts = [f"{source.steps} steps", f"network type {network.label if network else '?'}",
             f"rank {_metadata_number(meta, 'ss_network_dim')}", f"alpha {_metadata_number(meta, 'ss_network_alpha')}"]
    args = networks.file_args(meta)
    if network and network.convs and {"conv_dim", "conv_alpha"} <= args.keys():
        parts.append(f"convolution rank {_metadata_number(args, 'conv_dim')}, "
                     f"alpha {_metadata_number(args, 'conv_alpha')}")
    parts.append("text encoder trained" if meta.get("ss_network_train_unet_only") == "False"
                 else "text encoder not trained")
    embeddings = sorted({key.split(".")[1] for key in source.tensors if key.startswith("bundle_emb.")})
    parts.append(f"pivotal tuning of '{', '.join(embeddings)}'" if embeddings else "no pivotal tuning")
    if meta.get("modelspec.trigger_phrase"):
        parts.append(f"trigger '{meta['modelspec.trigger_phrase']}'")
    found = (f"Optimizer state found: {state} (an exact resume)." if state else
             "No optimizer state found for it: the optimizer starts afresh.")
    return f"<p>{html.escape('; '.join(parts))}.<br>{html.escape(found)}</p>"


class ResumeSection:
    """The Resume group in Advanced: which LoRA of the Lora folder to continue (the form's
    ``resume_from``) and the optimizer state found for it in the run folders (the form's
    ``resume_optimizer``, read-only: Start looks it up again, as a run since may have
    replaced it)."""

    def build(self) -> None:
        with gr.Group(elem_id="lora_train_resume"):
            gr.HTML("<p><b>Resume</b> a LoRA trained here: its steps count on. Set the network type, "
                    "rank, alpha, convolution rank/alpha, <i>Train the text encoder</i>, pivotal tuning "
                    "and the trigger as it was trained (shown below) — otherwise Start refuses and says "
                    "what to change. Learning rates, steps and images may differ.</p>")
            with FormRow():
                self.lora = gr.Dropdown(choices=_resume_choices(), value=NO_RESUME,
                                        label="Resume from (a LoRA in the Lora folder)",
                                        elem_id="lora_train_resume_from")
                self.refresh = ToolButton("🔄", elem_id="lora_train_resume_refresh")
            self.info = gr.HTML(elem_id="lora_train_resume_info")
            self.state = gr.Textbox("", interactive=False, elem_id="lora_train_resume_optimizer",
                                    label="Optimizer state (found in the run folders; empty: starts afresh)")

    def wire(self, run_end) -> None:
        """``run_end``: the Start event, after which the list holds the LoRA just written."""
        self.refresh.click(self.refreshed, inputs=[self.lora], outputs=[self.lora, self.info, self.state],
                           queue=False)
        self.lora.change(self.chosen, inputs=[self.lora], outputs=[self.info, self.state], queue=False)
        run_end.then(self.refreshed, inputs=[self.lora], outputs=[self.lora, self.info, self.state])

    def refreshed(self, current: Optional[str]) -> tuple:
        choices = _resume_choices()
        value = current if current in choices else NO_RESUME
        return (gr.update(choices=choices, value=value), *self.chosen(value))

    @staticmethod
    def chosen(name: Optional[str]) -> tuple[str, str]:
        """The summary line and the optimizer state for the LoRA ``name``."""
        if not name or name == NO_RESUME:
            return "", ""
        path = contamination.lora_file(name)
        if path is None:
            return _error_line(f"no LoRA named '{name}' in {paths.lora_dir()} any more (🔄 rescans)"), ""
        try:
            source = resume.read_lora(path)
        except resume.ResumeError as error:
            return _error_line(str(error)), ""
        state = resume.find_state(path, paths.output_root()) or ""
        return resume_summary(source, state), state


class IntermediatesSection:
    """The last run's intermediate saves (*Save every N steps*), each promoted on demand into
    the Lora folder as a LoRA of its own."""

    def __init__(self, job: TrainingJob):
        self.job = job

    def build(self) -> None:
        with gr.Accordion("Intermediate saves", open=False, elem_id="lora_train_intermediates_section"):
            gr.HTML("<p>With <i>Save every N steps</i> (Advanced) a run keeps "
                    "<code>&lt;name&gt;-stepNNNNN</code> files in its run folder. Promote one to use it "
                    "in txt2img, compare it in the grid or resume from it; <i>Overwrite</i> (Prompts) "
                    "decides what happens to a LoRA of the same name.</p>")
            with FormRow():
                self.file = gr.Dropdown(choices=self._files(), value=None, label="Intermediate saves of the last run",
                                        elem_id="lora_train_intermediates")
                self.refresh = ToolButton("🔄", elem_id="lora_train_intermediates_refresh")
            with FormRow():
                self.name = gr.Textbox("", label="Name in the Lora folder", placeholder="(empty: the file's name)",
                                       elem_id="lora_train_promote_name")
                self.button = gr.Button("Promote to Lora folder", elem_id="lora_train_promote")
            self.output = gr.HTML(elem_id="lora_train_promote_output")

    def wire(self, overwrite: gr.Checkbox, error: gr.HTML, run_end, resume_section: ResumeSection,
             grid: GridSection) -> None:
        """``overwrite``: the Prompts tab's checkbox; a promoted LoRA joins the Resume and grid lists."""
        self.refresh.click(self.refreshed, inputs=[self.file], outputs=[self.file], queue=False)
        self.button.click(self.promote, inputs=[self.file, self.name, overwrite],
                          outputs=[self.output, error, resume_section.lora, grid.lora], queue=False)
        run_end.then(self.refreshed, inputs=[self.file], outputs=[self.file])

    def _files(self) -> list[str]:
        return paths.intermediates(paths.last_run_dir(self.job.status().run_dir))

    def refreshed(self, current: Optional[str]) -> dict:
        files = self._files()
        return gr.update(choices=files, value=current if current in files else None)

    def promote(self, file: Optional[str], name: str, overwrite: bool) -> tuple:
        unchanged = (gr.update(), gr.update())
        if self.job.active:
            return "", problems_html([BUSY], "promoted"), *unchanged
        if not file:
            return "", problems_html(["Pick an intermediate save first (🔄 lists the last run's)."],
                                      "promoted"), *unchanged
        try:
            result = self.job.promote(file, name or "", bool(overwrite))
        except ValueError as error:
            return "", problems_html([str(error)], "promoted"), *unchanged
        loras = contamination.available_loras()
        return (f"<p>Saved {html.escape(result.path)}: prompt with "
                f"<code>{html.escape(f'<lora:{result.name}:1>')}</code></p>", "",
                gr.update(choices=[NO_RESUME, *loras]), gr.update(choices=loras))
