"""LoKr (LyCORIS' ``algo=lokr``): ``kron(w1, w2)``, peft's ``tuners/lokr`` layers (A1111's
``network_lokr.py``).

peft 0.13.2's LoKr never applies alpha/rank; A1111 applies alpha/rank only when w1 or w2 is
decomposed (and ignores alpha when both are full). The file's alpha is therefore the rank:
A1111's scale is 1 either way, which is what was trained.
"""
from __future__ import annotations

from peft.tuners.lokr import layer as lokr

from .base import NetworkType, lycoris_create, own_parameters

LOKR = NetworkType("lokr", "LoKr", lycoris_create(lokr.Linear, lokr.Conv2d, decompose_both=False, decompose_factor=-1),
                   own_parameters, convs=True, applies_alpha=False, args={"algo": "lokr"})
