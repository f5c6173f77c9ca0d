"""Pivotal tuning: a new embedding for the trigger, trained together with the LoRA and
bundled in its file, so that ``<lora:name:1>`` brings both.

What A1111 1.10.1 does with a bundled embedding (``extensions-builtin/Lora/networks.py``,
``modules/sd_hijack_clip.py``, ``modules/sd_hijack.py``): every key
``bundle_emb.<name>.string_to_param.*`` (SD1/SD2; SDXL: ``bundle_emb.<name>.clip_l`` and
``.clip_g``) becomes one textual-inversion embedding called ``<name>``, registered while the
LoRA is in use. When a prompt is tokenized, wherever the token ids of ``<name>`` appear
(left to right, non-overlapping) their span is replaced by the embedding's V vectors, which
``EmbeddingsWithFixes`` writes over the token embeddings at those positions.

Training does the same where A1111 will: the forward of each text encoder's token-embedding
module is wrapped *on the instance* so that every occurrence of the trigger's token ids is
replaced by the trainable vectors. With V equal to the trigger's token count the rest of the
prompt keeps its positions, which is what A1111 does at inference; a different V would shift
the prompt (A1111 re-chunks it), which a token-embedding wrapper cannot reproduce, so V is
the trigger's token count, always. Nothing of the model changes: no module object is
replaced (A1111's ``.wrapped`` / ``.weight`` on its ``EmbeddingsWithFixes`` stay reachable),
the vectors live outside the model, and :meth:`Pivot.remove` deletes the instance attribute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .targets import is_hf_clip, is_openclip, sdxl_text_encoders

#: text → token ids as that text encoder's tokenizer gives them, without start/end tokens.
TokenIds = Callable[[str], list[int]]

#: The file key under ``bundle_emb.<trigger>.`` for SD1/SD2 (A1111's textual-inversion
#: format: ``string_to_param = {"*": vectors}``); SDXL's two encoders are ``clip_l``/``clip_g``.
SINGLE_ENCODER_KEY = "string_to_param.*"
SDXL_KEYS = ("clip_l", "clip_g")


class PivotError(ValueError):
    """Pivotal tuning cannot run on this model with this trigger (message says why)."""


@dataclass
class _Site:
    """One text encoder's token embedding and the trigger's vectors for it."""

    key: str                 # the file key under bundle_emb.<trigger>.
    module: nn.Module        # the token-embedding module (possibly A1111's EmbeddingsWithFixes)
    trigger_ids: list[int]
    vectors: nn.Parameter    # (V, width), fp32, on the embedding's device


class Pivot:
    """The trigger's trainable vectors, in place on the model's text encoder(s)."""

    def __init__(self, trigger: str, sites: list[_Site]):
        self.trigger = trigger
        self.sites = sites
        self._saved: list[tuple[nn.Module, object]] = []
        try:
            for site in sites:
                self._wrap(site)
        except BaseException:
            self.remove()
            raise

    @property
    def vector_count(self) -> int:
        """V: one vector per token of the trigger (the same for every encoder)."""
        return self.sites[0].vectors.shape[0]

    def parameters(self) -> list[nn.Parameter]:
        return [site.vectors for site in self.sites]

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """``bundle_emb.<trigger>.<key>`` → vectors: the names the LoRA file uses."""
        return {f"bundle_emb.{self.trigger}.{site.key}": site.vectors for site in self.sites}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the LoRA file bundles: fp32 CPU ``(V, width)`` per encoder. fp32 whatever the
        save precision: V × width numbers cost nothing, and the file then holds exactly what
        was trained."""
        return {name: p.detach().to("cpu", torch.float32).contiguous()
                for name, p in self.named_parameters().items()}

    def remove(self) -> None:
        """Take the wrappers off (the modules' own forward again). Safe to call twice."""
        while self._saved:
            module, previous = self._saved.pop()
            if previous is None:
                del module.forward
            else:
                module.forward = previous

    def _wrap(self, site: _Site) -> None:
        module = site.module
        previous = vars(module).get("forward")  # someone's instance wrapper, kept underneath
        inner = module.forward
        self._saved.append((module, previous))
        module.forward = lambda input_ids: _substitute(inner(input_ids), input_ids, site)


def _substitute(embeds: torch.Tensor, input_ids: torch.Tensor, site: _Site) -> torch.Tensor:
    """``embeds`` with the vectors written over every span of the trigger's ids; the very
    same tensor when no prompt of the batch has the trigger."""
    spans = [(row, start) for row, ids in enumerate(input_ids.tolist())
             for start in find_spans(ids, site.trigger_ids)]
    if not spans:
        return embeds
    n = len(site.trigger_ids)
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    index = torch.zeros(input_ids.shape, dtype=torch.long)
    for row, start in spans:
        mask[row, start:start + n] = True
        index[row, start:start + n] = torch.arange(n)
    vectors = site.vectors.to(embeds.dtype)[index.to(embeds.device)]
    return torch.where(mask.to(embeds.device)[..., None], vectors, embeds)


def find_spans(ids: list[int], pattern: list[int]) -> list[int]:
    """Where ``pattern`` starts in ``ids``, scanning left to right and skipping past each
    match (A1111's ``EmbeddingDatabase.find_embedding_at_position`` loop)."""
    starts, i, n = [], 0, len(pattern)
    while i + n <= len(ids):
        if ids[i:i + n] == pattern:
            starts.append(i)
            i += n
        else:
            i += 1
    return starts


# --- the model's text encoders ------------------------------------------------------------

def _hf_ids(tokenizer) -> TokenIds:
    """A1111's SD1 / SDXL-te1 tokenization (``add_special_tokens=False``)."""
    return lambda text: list(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


def _openclip_ids() -> TokenIds:
    from open_clip.tokenizer import _tokenizer  # the one ldm/sgm and A1111 use for OpenCLIP
    return lambda text: list(_tokenizer.encode(text))


def _site_of(embedder: nn.Module) -> tuple[nn.Module, TokenIds]:
    """(token-embedding module, tokenizer) of an HF CLIP or OpenCLIP embedder."""
    if is_hf_clip(embedder):
        return embedder.transformer.text_model.embeddings.token_embedding, _hf_ids(embedder.tokenizer)
    if is_openclip(embedder):
        return embedder.model.token_embedding, _openclip_ids()
    raise PivotError(f"pivotal tuning does not know the text encoder {type(embedder).__name__}")


def text_encoders(model: nn.Module) -> list[tuple[str, nn.Module, TokenIds]]:
    """``(file key, token-embedding module, tokenizer)`` per text encoder: one for SD1/SD2
    (``cond_stage_model``, under A1111's ``.wrapped``), te1 → ``clip_l`` and te2 → ``clip_g``
    for SDXL."""
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        return [(key, *_site_of(embedder))
                for key, (_, _, embedder) in zip(SDXL_KEYS, sdxl_text_encoders(model))]
    embedder = model.cond_stage_model
    embedder = getattr(embedder, "wrapped", embedder)
    return [(SINGLE_ENCODER_KEY, *_site_of(embedder))]


def _token_table(module: nn.Module) -> torch.Tensor:
    """The ``nn.Embedding`` weight under a token-embedding module (A1111 wraps it in
    ``EmbeddingsWithFixes.wrapped``)."""
    while not isinstance(module, nn.Embedding):
        if not hasattr(module, "wrapped"):
            raise PivotError(f"no token-embedding table under {type(module).__name__}")
        module = module.wrapped
    return module.weight


def _initial_vectors(table: torch.Tensor, init_ids: list[int], count: int) -> torch.Tensor:
    """``count`` vectors from the init text's token embeddings: one each when the counts
    agree, else every vector their mean."""
    rows = table.detach()[torch.tensor(init_ids, device=table.device)].to(torch.float32)
    if len(init_ids) == count:
        return rows.clone()
    return rows.mean(dim=0, keepdim=True).repeat(count, 1)


def install_pivot(model: nn.Module, trigger: str, init_text: str) -> Pivot:
    """Put trainable vectors for ``trigger`` in place on ``model``'s text encoder(s), one per
    token of the trigger, initialised from ``init_text``'s token embeddings (the class word;
    the trigger's own when empty). Raises :class:`PivotError` when the trigger has no tokens
    or (SDXL) the two tokenizers split it differently."""
    trigger = trigger.strip()
    sites: list[_Site] = []
    for key, module, token_ids in text_encoders(model):
        ids = token_ids(trigger)
        if not ids:
            raise PivotError(f"the trigger '{trigger}' has no tokens")
        if sites and len(ids) != len(sites[0].trigger_ids):
            raise PivotError(f"the two SDXL tokenizers split '{trigger}' into {len(sites[0].trigger_ids)} and "
                             f"{len(ids)} tokens; A1111 gives an embedding one vector count: pick another trigger")
        table = _token_table(module)
        init_ids = token_ids(init_text.strip()) or ids
        vectors = nn.Parameter(_initial_vectors(table, init_ids, len(ids)))
        sites.append(_Site(key, module, ids, vectors))
    return Pivot(trigger, sites)


def load_vectors(pivot: Pivot, tensors: dict[str, torch.Tensor]) -> None:
    """Set the vectors from a LoRA file's ``bundle_emb`` tensors (same names and shapes)."""
    with torch.no_grad():
        for name, param in pivot.named_parameters().items():
            param.copy_(tensors[name].to(param.dtype))


__all__ = ["Pivot", "PivotError", "install_pivot", "load_vectors", "find_spans", "text_encoders",
           "SINGLE_ENCODER_KEY", "SDXL_KEYS"]
