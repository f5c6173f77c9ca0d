"""Pivotal tuning: the trigger's trained embedding is bundled in the LoRA file as A1111 reads
it, changes exactly the prompts (and positions) that hold the trigger, gives the conditioning
A1111's own substitution gives with the file's vectors, and leaves the model as it was."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import ROUNDING
from lora_dreambooth.config import ConfigError, TrainConfig
from lora_dreambooth.demo import draw_character, write_images
from lora_dreambooth.embedding import PivotError, find_spans, install_pivot, load_vectors, text_encoders
from lora_dreambooth.guard import ModelSnapshot
from lora_dreambooth.model import make_backend
from lora_dreambooth.train import TrainingError, train_lora

KEY = "bundle_emb.wpg.string_to_param.*"
#: A1111's embedding substitution (the tests' stand-in of it) and our pivot are two code paths
#: doing the same sums in another order: equal up to float32 ROUNDING (2.4e-7 seen on one CPU).


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> str:
    return write_images(str(tmp_path_factory.mktemp("images") / "instance"), draw_character, 2)


def _train(model, instance_dir: str, tmp_path, **changes):
    values = dict(trigger="wpg", class_prompt="dog", instance_dir=instance_dir, steps=2, resolution=64, rank=4,
                  alpha=4.0, learning_rate=1e-4, pivotal=True, embedding_lr=5e-2, seed=3)
    values.update(changes)
    return train_lora(model, TrainConfig(**values), str(tmp_path / "lora"), str(tmp_path / "run"))


def _cond(model, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return make_backend(model).encode_prompts(prompts)


def _cond_with_file_vectors(model, tensors: dict[str, torch.Tensor], prompt: str) -> torch.Tensor:
    """The conditioning training uses for ``prompt`` with the file's trigger vectors installed."""
    pivot = install_pivot(model, "wpg", "dog")
    try:
        load_vectors(pivot, tensors)
        return _cond(model, [prompt])[0]
    finally:
        pivot.remove()


def _no_instance_forward(model: nn.Module) -> bool:
    return all("forward" not in vars(m) for m in model.modules())


# --- A1111 1.10.1's substitution, re-implemented ----------------------------------------------

class EmbeddingsWithFixes(nn.Module):
    """``modules/sd_hijack.py``: after the token embedding, each fix (offset, vectors) writes
    the vectors from position offset + 1 (after the start token) with ``torch.cat``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.fixes = None

    def forward(self, input_ids):
        batch_fixes, self.fixes = self.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, emb in fixes:
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]]
                                   ).to(dtype=inputs_embeds.dtype)
            vecs.append(tensor)
        return torch.stack(vecs)


def a1111_chunk(prompt_ids: list[int], name_ids: list[int], vec: torch.Tensor, start: int, end: int,
                pad: int) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    """``sd_hijack_clip.tokenize_line`` for a prompt of one chunk: the embedding's name span
    becomes ``len(vec)`` placeholder tokens and a fix; the chunk is padded to 75 with the end
    token and framed by start/end; SD2 then pads after the first end token with its pad id."""
    tokens, fixes, i = [], [], 0
    while i < len(prompt_ids):
        if prompt_ids[i:i + len(name_ids)] == name_ids:
            fixes.append((len(tokens), vec))
            tokens += [0] * vec.shape[0]
            i += len(name_ids)
        else:
            tokens.append(prompt_ids[i])
            i += 1
    ids = [start] + tokens + [end] + [pad] * (75 - len(tokens))
    return ids, fixes


def a1111_conditioning(token_embedding_owner: nn.Module, ids: list[int], fixes, encode):
    """Run ``encode(ids)`` with A1111's EmbeddingsWithFixes in place of the token embedding."""
    original = token_embedding_owner.token_embedding
    hijack = EmbeddingsWithFixes(original)
    token_embedding_owner.token_embedding = hijack
    try:
        hijack.fixes = [fixes]
        with torch.no_grad():
            return encode(torch.tensor([ids]))
    finally:
        token_embedding_owner.token_embedding = original


# --- tests ----------------------------------------------------------------------------------------

def test_find_spans_is_a1111s_left_to_right_scan():
    assert find_spans([1, 1, 1, 1], [1, 1]) == [0, 2]
    assert find_spans([5, 1, 2, 1, 2, 1], [1, 2]) == [1, 3]
    assert find_spans([1, 2], [1, 2, 3]) == []


def test_sd1_file_bundles_the_trained_embedding_and_the_model_comes_back(tiny_sd1, instance_dir, tmp_path):
    snapshot = ModelSnapshot.take(tiny_sd1)
    token_embedding = tiny_sd1.cond_stage_model.transformer.text_model.embeddings.token_embedding
    dog = token_embedding.weight[532].detach().clone()  # "dog": the class word, one token
    result = _train(tiny_sd1, instance_dir, tmp_path)

    assert snapshot.differences(tiny_sd1) == [] and _no_instance_forward(tiny_sd1)
    tensors = load_file(result.path)
    assert tensors[KEY].shape == (3, 32) and tensors[KEY].dtype == torch.float32  # "wpg" is 3 tokens
    assert [k for k in tensors if k.startswith("bundle_emb.")] == [KEY]
    assert any(k.startswith("lora_unet_") for k in tensors)
    # Started from "dog" in every vector, moved by its own learning rate (5e-2, not 1e-4).
    moved = (tensors[KEY] - dog).abs().max().item()
    assert 10 * 2 * 1e-4 < moved <= 1.05 * 2 * 5e-2
    assert "pivotal tuning: embedding 'wpg' bundled, lr 0.05" in json.load(open(result.sidecar_path))["notes"]


def test_the_embedding_changes_the_trigger_and_nothing_else(tiny_sd1):
    prompts = ["a photo of a dog", "wpg", "a photo of wpg, eating ramen", ""]
    before = _cond(tiny_sd1, prompts)
    pivot = install_pivot(tiny_sd1, "wpg", "dog")
    try:
        after = _cond(tiny_sd1, prompts)
    finally:
        pivot.remove()
    assert _no_instance_forward(tiny_sd1)
    assert torch.equal(after[0], before[0]) and torch.equal(after[3], before[3])
    assert not torch.equal(after[1], before[1])
    # "a photo of wpg": the trigger's span starts at position 4 (after the start token and
    # 3 words); the text encoder is causal, so positions before it are untouched.
    assert torch.equal(after[2, :4], before[2, :4]) and not torch.equal(after[2, 4:], before[2, 4:])
    assert torch.equal(_cond(tiny_sd1, prompts), before)


def test_initialised_from_the_trigger_itself_the_conditioning_is_unchanged(tiny_sd1):
    before = _cond(tiny_sd1, ["a photo of wpg"])
    pivot = install_pivot(tiny_sd1, "wpg", "")
    try:
        assert torch.equal(_cond(tiny_sd1, ["a photo of wpg"]), before)
    finally:
        pivot.remove()


def test_sd1_a1111_substitution_of_the_file_gives_the_training_conditioning(tiny_sd1, instance_dir, tmp_path):
    pristine = copy.deepcopy(tiny_sd1)
    tensors = load_file(_train(tiny_sd1, instance_dir, tmp_path).path)
    embedder = pristine.cond_stage_model
    tokenizer = embedder.tokenizer
    prompt = "a photo of wpg, eating ramen"

    trained = _cond_with_file_vectors(pristine, tensors, prompt)

    ids, fixes = a1111_chunk(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                             tokenizer("wpg", add_special_tokens=False)["input_ids"], tensors[KEY],
                             tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id)
    assert fixes[0][0] == 3  # after "a photo of"
    a1111 = a1111_conditioning(embedder.transformer.text_model.embeddings, ids, fixes,
                               lambda t: embedder.transformer(input_ids=t).last_hidden_state)[0]
    torch.testing.assert_close(a1111, trained, **ROUNDING)
    assert not torch.allclose(a1111, _cond(pristine, [prompt])[0], **ROUNDING)


def test_under_a1111s_hijack_the_hijack_module_stays_and_keeps_working(tiny_sd1, instance_dir, tmp_path):
    """A1111 wraps the text model and its token embedding (EmbeddingsWithFixes, reachable as
    ``.wrapped``): the pivot trains through both and takes nothing away."""
    from test_model import A1111StyleEmbedder
    tiny_sd1.cond_stage_model = A1111StyleEmbedder(tiny_sd1.cond_stage_model)
    embeddings = tiny_sd1.cond_stage_model.wrapped.transformer.text_model.embeddings
    hijack = embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding)
    snapshot = ModelSnapshot.take(tiny_sd1)
    result = _train(tiny_sd1, instance_dir, tmp_path)
    assert snapshot.differences(tiny_sd1) == [] and _no_instance_forward(tiny_sd1)
    assert embeddings.token_embedding is hijack and isinstance(hijack.wrapped, nn.Embedding)
    assert load_file(result.path)[KEY].shape == (3, 32)


def test_sd2_bundles_string_to_param_and_matches_a1111(instance_dir, tmp_path):
    from open_clip.tokenizer import _tokenizer

    from tiny_models import build_tiny_sd2
    model = build_tiny_sd2()
    pristine = copy.deepcopy(model)
    snapshot = ModelSnapshot.take(model)
    tensors = load_file(_train(model, instance_dir, tmp_path, train_text_encoder=True).path)
    assert snapshot.differences(model) == [] and _no_instance_forward(model)
    assert tensors[KEY].shape == (1, 32)  # "wpg" is one token in OpenCLIP's vocabulary

    prompt = "a photo of wpg"
    embedder = pristine.cond_stage_model
    trained = _cond_with_file_vectors(pristine, tensors, prompt)
    start, end = _tokenizer.encoder["<start_of_text>"], _tokenizer.encoder["<end_of_text>"]
    ids, fixes = a1111_chunk(_tokenizer.encode(prompt), _tokenizer.encode("wpg"), tensors[KEY], start, end, 0)
    a1111 = a1111_conditioning(embedder.model, ids, fixes, embedder.encode_with_transformer)[0]
    torch.testing.assert_close(a1111, trained, **ROUNDING)
    assert torch.equal(_cond(pristine, ["a photo of a dog"]), _cond(model, ["a photo of a dog"]))


def test_sdxl_bundles_clip_l_and_clip_g_and_matches_a1111(tmp_path, instance_dir, tiny_clip_dir):
    from tiny_models import build_tiny_sdxl
    model = build_tiny_sdxl(clip_dir=tiny_clip_dir)
    snapshot = ModelSnapshot.take(model)
    result = _train(model, instance_dir, tmp_path, trigger="sks")  # one token in both tokenizers
    assert snapshot.differences(model) == [] and _no_instance_forward(model)
    tensors = load_file(result.path)
    assert {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("bundle_emb.")} == {
        "bundle_emb.sks.clip_l": (1, 32), "bundle_emb.sks.clip_g": (1, 32)}

    prompts = ["a photo of a dog", "a photo of sks"]
    before = _cond(model, prompts)
    pivot = install_pivot(model, "sks", "dog")
    try:
        load_vectors(pivot, tensors)
        after = _cond(model, prompts)
    finally:
        pivot.remove()
    assert all(torch.equal(after[k][0], before[k][0]) for k in after)
    te1, te2 = slice(0, 32), slice(32, 64)
    for part in (te1, te2):  # both encoders' vectors take effect
        assert not torch.equal(after["crossattn"][1, :, part], before["crossattn"][1, :, part])
    assert not torch.equal(after["vector"][1], before["vector"][1])  # te2's pooled output

    # A1111: te1 (its HF tokenizer, pad = end) substitutes clip_l, te2 (OpenCLIP, pad 0) clip_g.
    from open_clip.tokenizer import _tokenizer
    clip_l, clip_g = (e for e in model.conditioner.embedders[:2])
    tok = clip_l.tokenizer
    ids, fixes = a1111_chunk(tok(prompts[1], add_special_tokens=False)["input_ids"],
                             tok("sks", add_special_tokens=False)["input_ids"], tensors["bundle_emb.sks.clip_l"],
                             tok.bos_token_id, tok.eos_token_id, tok.eos_token_id)
    hidden = a1111_conditioning(clip_l.transformer.text_model.embeddings, ids, fixes, lambda t: clip_l.transformer(
        input_ids=t, output_hidden_states=True).hidden_states[clip_l.layer_idx])[0]
    torch.testing.assert_close(hidden, after["crossattn"][1, :, te1], **ROUNDING)
    start, end = _tokenizer.encoder["<start_of_text>"], _tokenizer.encoder["<end_of_text>"]
    ids, fixes = a1111_chunk(_tokenizer.encode(prompts[1]), _tokenizer.encode("sks"), tensors["bundle_emb.sks.clip_g"],
                             start, end, 0)
    out = a1111_conditioning(clip_g.model, ids, fixes, clip_g.encode_with_transformer)
    torch.testing.assert_close(out["penultimate"][0], after["crossattn"][1, :, te2], **ROUNDING)
    torch.testing.assert_close(out["pooled"][0], after["vector"][1, :32], **ROUNDING)


def test_refusals(tiny_clip_dir, instance_dir, tmp_path):
    from tiny_models import build_tiny_sdxl
    with pytest.raises(ConfigError, match="must not contain '.'"):
        TrainConfig(trigger="w.pg", pivotal=True).validate()
    with pytest.raises(ConfigError, match="embedding learning rate"):
        TrainConfig(pivotal=True, embedding_lr=0).validate()
    sdxl = build_tiny_sdxl(clip_dir=tiny_clip_dir)
    assert [key for key, _, _ in text_encoders(sdxl)] == ["clip_l", "clip_g"]
    with pytest.raises(PivotError, match="split 'wpg' into 3 and 1 tokens"):
        install_pivot(sdxl, "wpg", "")
    assert _no_instance_forward(sdxl)
    snapshot = ModelSnapshot.take(sdxl)
    with pytest.raises(TrainingError, match="split 'wpg'"):  # after the adapters went in
        _train(sdxl, instance_dir, tmp_path)
    assert snapshot.differences(sdxl) == [] and _no_instance_forward(sdxl)
    assert not (tmp_path / "lora").exists()
