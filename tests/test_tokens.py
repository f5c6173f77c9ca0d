"""The trigger check: CLIP's real vocabulary (OpenCLIP ships it, nothing is downloaded), the
tiny test tokenizer, and finding the tokenizer in the model layouts A1111 holds."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from open_clip.tokenizer import _tokenizer as openclip_tokenizer
from transformers import CLIPTokenizer

from lora_dreambooth.tokens import (LECTURE_RARE_TOKENS, check_trigger, hf_tokenize, model_tokenize,
                                    openclip_tokenize)

CLIP = openclip_tokenize(openclip_tokenizer)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_clip_dir):
    return CLIPTokenizer.from_pretrained(tiny_clip_dir)


def test_clip_vocabulary_has_every_lecture_token_as_one_token():
    report = check_trigger(CLIP, "sks")
    assert report.pieces == ["sks</w>"] and report.single_token and not report.ordinary_word
    assert report.suggestions == list(LECTURE_RARE_TOKENS)
    assert "one token" in report.describe() and "good trigger" in report.describe()


@pytest.mark.parametrize("text, pieces, single, ordinary", [
    ("woman", ["woman</w>"], True, True),
    ("Anime", ["anime</w>"], True, True),        # lower-cased like every prompt
    ("cat", ["cat</w>"], True, False),           # 3 letters: not flagged (the rare tokens are 3 letters too)
    ("bloodborne", ["blood", "borne</w>"], False, False),
    ("mona lisa", ["mona</w>", "lisa</w>"], False, False),
    ("  ", [], False, False),
])
def test_pieces_single_and_ordinary(text, pieces, single, ordinary):
    report = check_trigger(CLIP, text)
    assert (report.pieces, report.single_token, report.ordinary_word) == (pieces, single, ordinary)
    assert report.to_dict() == {"pieces": pieces, "single_token": single, "ordinary_word": ordinary,
                                "suggestions": list(LECTURE_RARE_TOKENS)}


def test_messages_name_the_problem():
    assert "ordinary word" in check_trigger(CLIP, "woman").describe()
    assert "2 pieces (blood · borne</w>)" in check_trigger(CLIP, "bloodborne").describe()
    assert "Enter a trigger" in check_trigger(CLIP, "").describe()


def test_suggestions_are_only_what_this_tokenizer_has_as_one_token(tiny_tokenizer):
    tiny = hf_tokenize(tiny_tokenizer)
    report = check_trigger(tiny, "wpg")
    assert report.pieces == ["w", "p", "g</w>"] and not report.single_token
    assert report.suggestions == ["shs"]  # the only lecture token in the tiny vocabulary
    assert check_trigger(tiny, "woman").ordinary_word


def test_the_tokenizer_is_found_in_every_layout(tiny_tokenizer):
    ldm = SimpleNamespace(tokenizer=tiny_tokenizer)             # ldm FrozenCLIPEmbedder
    openclip = SimpleNamespace(model=SimpleNamespace(transformer=SimpleNamespace(resblocks=[])))
    layouts = {
        "plain SD1": SimpleNamespace(cond_stage_model=ldm),
        "A1111 SD1": SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=ldm)),
        "A1111 SDXL": SimpleNamespace(conditioner=SimpleNamespace(embedders=[SimpleNamespace(wrapped=ldm), openclip])),
    }
    for name, model in layouts.items():
        assert model_tokenize(model)("wpg") == ["w", "p", "g</w>"], name
    sd2 = SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=openclip))
    assert model_tokenize(sd2)("bloodborne") == ["blood", "borne</w>"]
    assert model_tokenize(SimpleNamespace(cond_stage_model=SimpleNamespace(wrapped=object()))) is None
    assert model_tokenize(SimpleNamespace()) is None
