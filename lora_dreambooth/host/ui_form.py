"""The tab's form: a control ``#lora_train_<field>`` for every TrainConfig field on the Prompts
and Hyperparameters tabs, the preset drop-down with its note, "Defaults for the loaded model"
and the epoch line.

What a first-time user expects of it:
- a preset sets its values but keeps what the user typed (a field that no longer shows the
  value the form last put there), and says what it set, what it kept, and what it needs;
- alpha follows the rank while the two are equal (alpha = rank: scale 1);
- network types read as people write them (LoRA, LoCon, …; the config gets the name);
- Advanced is grouped by what the settings are about."""
from __future__ import annotations

import dataclasses
import html
from typing import Any

import gradio as gr
from modules.ui_components import FormRow

from .. import networks
from ..config import LR_SCHEDULES, OPTIMIZERS, PRECISIONS, PRESETS, TrainConfig, apply_preset
from ..export import SAVE_DTYPES
from ..families import FAMILY_FIELDS
from . import a1111, files, paths, settings
from .ui_datasets import EpochLine
from .ui_tools import ResumeSection, TriggerCheck

PROMPT_FIELDS = ("trigger", "class_prompt", "preview_prompt", "preview_negative_prompt", "name", "overwrite")
MAIN_FIELDS = ("steps", "learning_rate", "batch_size", "gradient_accumulation", "rank", "alpha",
               "regularization", "network", "train_text_encoder", "preview_every", "preview_seed",
               "resolution")
_NOT_IN_FORM = ("instance_dir", "class_dir")  # folders come from the workspace
#: Advanced, by topic (the Resume group ends it); a field added to TrainConfig and named in no
#: group lands in "Other", so every field keeps a control.
ADVANCED_GROUPS = {
    "Learning rate and optimizer": ("lr_schedule", "lr_warmup_steps", "optimizer", "weight_decay",
                                    "max_grad_norm", "text_encoder_lr"),
    "Network": ("conv_rank", "conv_alpha", "pivotal", "embedding_lr"),
    "Images and captions": ("buckets", "augment", "flip", "shuffle_tags", "keep_tokens", "tag_dropout"),
    "Numerics": ("seed", "precision", "gradient_checkpointing", "min_snr_gamma", "noise_offset"),
    "Previews and saves": ("preview_steps", "preview_cfg", "save_every", "save_dtype", "save_optimizer", "comment"),
}
#: Advanced fields whose controls are the Resume group's (ui_tools.ResumeSection), not text boxes.
RESUME_FIELDS = ("resume_from", "resume_optimizer")
ADVANCED_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                        if f.name not in PROMPT_FIELDS + MAIN_FIELDS + _NOT_IN_FORM)
#: Order of the Start button's inputs after the task id.
FORM_FIELDS = PROMPT_FIELDS + MAIN_FIELDS + ADVANCED_FIELDS
PRESET_FIELDS = tuple(dict.fromkeys(k for values in PRESETS.values() for k in values))
#: The tab's own starting values where the config's suit the API better: a first run shows
#: previews (the API's default stays 0: a script asks for them).
TAB_DEFAULTS = {"preview_every": 50}

NETWORK_LABELS = {name: networks.get(name).label for name in networks.NAMES}
_CHOICES = {"network": tuple(NETWORK_LABELS.values()), "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS,
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
    "alpha": "LoRA alpha (follows the rank while equal to it; scale = alpha / rank)",
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


def network_name(value: Any) -> Any:
    """The config's network name for a label of the drop-down (a name passes unchanged)."""
    return next((name for name, label in NETWORK_LABELS.items() if label == value), value)


def _shown(name: str, value: Any) -> Any:
    return NETWORK_LABELS.get(value, value) if name == "network" else value


def _label(name: str) -> str:
    return _LABELS.get(name, name.replace("_", " ").capitalize())


def _field_component(name: str, value: Any) -> gr.components.Component:
    common = {"label": _label(name), "elem_id": f"lora_train_{name}"}
    if name in _CHOICES:
        return gr.Dropdown(choices=list(_CHOICES[name]), value=_shown(name, value), **common)
    if isinstance(value, bool):
        return gr.Checkbox(value=value, **common)
    if name in _SLIDERS:
        low, high, step = _SLIDERS[name]
        return gr.Slider(minimum=low, maximum=high, step=step, value=value, **common)
    if isinstance(value, (int, float)):
        return gr.Number(value=value, precision=0 if isinstance(value, int) else None, **common)
    return gr.Textbox(value=value, lines=3 if name in _MULTILINE else 1,
                      placeholder=_PLACEHOLDERS.get(name, ""), **common)


def _family_html(label) -> str:
    if label is None:
        return "<p>Loaded model: none that can be trained (see the messages on Start).</p>"
    return f"<p>Loaded model: {html.escape(label)}</p>"


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def class_images_hint(regularization: Any) -> str:
    """What prior preservation still needs, or ""."""
    try:
        needed = float(regularization) > 0
    except (TypeError, ValueError):
        return ""
    count = len(files.list_images(paths.workspace().class_dir))
    if not needed or count:
        return ""
    return ("<p class='lora-train-needs'>⚠ Regularization needs class images: upload them or press "
            "<i>Generate class images</i> on the <i>Class images</i> tab.</p>")


class Form:
    """Every TrainConfig control, starting from the default preset and the loaded model's family
    defaults, with the preset drop-down and its note, "Defaults for the loaded model" and the
    epoch line."""

    def __init__(self) -> None:
        preset = settings.get(settings.DEFAULT_PRESET)
        self.preset_name = preset if preset in PRESETS else next(iter(PRESETS))
        self.family, family_defaults = a1111.loaded_family()
        self.defaults = dataclasses.replace(apply_preset(TrainConfig(), self.preset_name),
                                            **{**TAB_DEFAULTS, **family_defaults})
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
        self.preset_note = gr.HTML(elem_id="lora_train_preset_note")
        self.class_hint = gr.HTML(class_images_hint(self.defaults.regularization), elem_id="lora_train_class_hint")
        # What the form last put in each preset field (a field showing something else was typed).
        self.preset_set = gr.State({name: getattr(self.defaults, name) for name in PRESET_FIELDS})
        self.last_rank = gr.State(self.defaults.rank)
        self.epoch_line.build(self.defaults.steps, self.defaults.batch_size, self.defaults.gradient_accumulation)
        self._add(MAIN_FIELDS)
        with gr.Accordion("Advanced", open=False, elem_id="lora_train_advanced"):
            grouped = {name for names in ADVANCED_GROUPS.values() for name in names}
            other = tuple(f for f in ADVANCED_FIELDS if f not in grouped and f not in RESUME_FIELDS)
            for title, names in {**ADVANCED_GROUPS, **({"Other": other} if other else {})}.items():
                with gr.Group(elem_id=f"lora_train_group_{title.split()[0].lower()}"):
                    gr.HTML(f"<h4>{html.escape(title)}</h4>")
                    for row in range(0, len(names), 3):
                        with FormRow():
                            self._add(names[row:row + 3])
            resume.build()
            self.fields["resume_from"], self.fields["resume_optimizer"] = resume.lora, resume.state

    def wire(self) -> None:
        self.epoch_line.wire(*self.controls(("steps", "batch_size", "gradient_accumulation")))
        self.family_button.click(self.family_values, outputs=[self.family_line, *self.controls(FAMILY_FIELDS)],
                                 queue=False)
        presets = self.controls(PRESET_FIELDS)
        self.preset.change(self.preset_values, inputs=[self.preset, self.preset_set, *presets],
                           outputs=[*presets, self.preset_note, self.preset_set], queue=False)
        rank, alpha = self.fields["rank"], self.fields["alpha"]
        rank.change(self.follow_rank, inputs=[rank, alpha, self.last_rank], outputs=[alpha, self.last_rank],
                    queue=False)
        regularization = self.fields["regularization"]
        regularization.change(class_images_hint, inputs=[regularization], outputs=[self.class_hint], queue=False)

    def wire_class_images(self, count_line: gr.HTML) -> None:
        """The hint follows the class images as they are uploaded, generated or deleted (the
        line with their count changes then)."""
        count_line.change(class_images_hint, inputs=[self.fields["regularization"]], outputs=[self.class_hint],
                       queue=False)

    @staticmethod
    def preset_values(name: str, last_set: dict, *shown) -> list:
        """The preset's values in the fields still showing what the form put there; the others
        keep what the user typed. Then the note saying so, and what the form put now."""
        preset = apply_preset(TrainConfig(), name)
        values, changed, kept, now_set = [], [], [], {}
        for field, current in zip(PRESET_FIELDS, shown):
            new = getattr(preset, field)
            now_set[field] = new
            if _same(current, last_set.get(field, current)):
                values.append(new)
                if not _same(current, new):
                    changed.append(f"{field.replace('_', ' ')} {new:g}" if isinstance(new, float) else
                                   f"{field.replace('_', ' ')} {new}")
            else:
                values.append(gr.update())
                kept.append(f"{field.replace('_', ' ')} {current:g}" if isinstance(current, float) else
                            f"{field.replace('_', ' ')} {current}")
        lines = [f"{html.escape(name)}: set {html.escape(', '.join(changed))}." if changed else
                 f"{html.escape(name)}: nothing to change."]
        if kept:
            lines.append(f"Kept what you typed: {html.escape(', '.join(kept))}.")
        return [*values, "<p class='lora-train-preset'>" + "<br>".join(lines) + "</p>", now_set]

    @staticmethod
    def follow_rank(rank: Any, alpha: Any, last_rank: Any) -> tuple:
        """Alpha moves with the rank while it equals the rank it had (a typed alpha stays)."""
        return (rank if _same(alpha, last_rank) else gr.update()), rank

    @staticmethod
    def family_values() -> list:
        """The loaded model's family line, and its defaults in the family fields."""
        label, defaults = a1111.loaded_family()
        values = [_shown(field, defaults[field]) if field in defaults else gr.update() for field in FAMILY_FIELDS]
        return [_family_html(label), *values]
