"""How the loaded model's tokenizer reads a trigger word, and which rare single tokens it has.

The lecture's advice on triggers: a rare token that is *one* token works best; an ordinary
word the model already knows ("girl", "woman", "anime", "Mona Lisa") is "overwhelming" and
the training fights what the model already draws for it.

SD 1.x, SD 2.x and SDXL all use CLIP's byte-level BPE vocabulary (49 408 entries): a piece
that ends a word carries ``</w>``, so ``"sks"`` is ``["sks</w>"]`` (one token) and ``"bloodborne"``
is ``["blood", "borne</w>"]`` (two). SD1 and SDXL's first encoder hold an HF ``CLIPTokenizer``
(``cond_stage_model.wrapped.tokenizer`` inside A1111, ``cond_stage_model.tokenizer`` on a plain
ldm model, ``conditioner.embedders[0]...`` on SDXL); SD2's OpenCLIP encoder has no tokenizer
attribute and uses OpenCLIP's module-level ``SimpleTokenizer``, as A1111 does.

"Ordinary word" is a heuristic read from the vocabulary alone (no dictionary is shipped): the
trigger is one whole-word token of at least 4 ASCII letters. CLIP's vocabulary has about
28 700 such tokens and nearly all are English words or names; a few rare strings pass too
(``ohwx``), and 3-letter words (``cat``) are not flagged, because the lecture's recommended
rare tokens are all 3 letters. Rendering the bare trigger ("Show prior") is the real test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .targets import is_openclip

#: The lecture's reference words: rare tokens that make good triggers.
LECTURE_RARE_TOKENS = ("shs", "sts", "scs", "cpc", "coc", "cic", "msm", "usu", "ici", "lvl", "dii",
                       "muk", "ori", "hru", "rik", "koo", "yos", "wny")
WORD_END = "</w>"
MIN_WORD_LETTERS = 4

#: text → BPE pieces as the model's text encoder sees them (``"sks"`` → ``["sks</w>"]``).
Tokenize = Callable[[str], list[str]]


@dataclass
class TokenReport:
    text: str
    pieces: list[str]
    single_token: bool
    ordinary_word: bool
    suggestions: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the tab."""
        word = self.text.strip()
        if not self.pieces:
            return "Enter a trigger word to see how the model's tokenizer reads it."
        if self.ordinary_word:
            return (f"'{word}' is one token, but it looks like an ordinary word (a whole-word token "
                    f"of {MIN_WORD_LETTERS}+ letters): the model probably knows it already, and "
                    "training fights that prior. Show prior to check, or pick a rare token.")
        if self.single_token:
            return f"'{word}' is one token ({self.pieces[0]}) and not an ordinary word: a good trigger."
        return (f"'{word}' is split into {len(self.pieces)} pieces ({' · '.join(self.pieces)}): the "
                "concept is bound to all of them and any of them can carry it elsewhere; a rare "
                "single token is cleaner.")

    def to_dict(self) -> dict:
        return {"pieces": self.pieces, "single_token": self.single_token,
                "ordinary_word": self.ordinary_word, "suggestions": self.suggestions}


def hf_tokenize(tokenizer) -> Tokenize:
    """An HF ``CLIPTokenizer`` (what A1111 calls for SD1 prompts, without special tokens)."""
    return lambda text: list(tokenizer.tokenize(text))


def openclip_tokenize(tokenizer) -> Tokenize:
    """OpenCLIP's ``SimpleTokenizer`` (ids → pieces through its ``decoder``)."""
    return lambda text: [tokenizer.decoder[i] for i in tokenizer.encode(text)]


def model_tokenize(model: nn.Module) -> Optional[Tokenize]:
    """The tokenizer of ``model``'s (first) text encoder, or None when it is not one this
    module knows (then the check says so instead of guessing)."""
    conditioner = getattr(model, "conditioner", None)
    embedder = conditioner.embedders[0] if conditioner is not None else getattr(model, "cond_stage_model", None)
    embedder = getattr(embedder, "wrapped", embedder)  # A1111 wraps the ldm/sgm embedder
    if embedder is None:
        return None
    tokenizer = getattr(embedder, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "tokenize"):
        return hf_tokenize(tokenizer)
    if is_openclip(embedder):
        from open_clip.tokenizer import _tokenizer  # the one OpenCLIP (and A1111's SD2 code) uses
        return openclip_tokenize(_tokenizer)
    return None


def is_ordinary_word(pieces: list[str]) -> bool:
    if len(pieces) != 1 or not pieces[0].endswith(WORD_END):
        return False
    word = pieces[0][:-len(WORD_END)]
    return word.isascii() and word.isalpha() and len(word) >= MIN_WORD_LETTERS


def rare_single_tokens(tokenize: Tokenize) -> list[str]:
    """The lecture's rare tokens that really are one token in this tokenizer."""
    return [word for word in LECTURE_RARE_TOKENS if tokenize(word) == [word + WORD_END]]


def check_trigger(tokenize: Tokenize, text: str) -> TokenReport:
    pieces = tokenize(text.strip()) if text.strip() else []
    return TokenReport(text=text, pieces=pieces, single_token=len(pieces) == 1,
                       ordinary_word=is_ordinary_word(pieces), suggestions=rare_single_tokens(tokenize))
