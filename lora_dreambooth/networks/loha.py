"""LoHa (LyCORIS' ``algo=loha``): ``(w1a@w1b) ⊙ (w2a@w2b) × alpha/rank``, peft's
``tuners/loha`` layers (A1111's ``network_hada.py``)."""
from __future__ import annotations

from peft.tuners.loha import layer as loha

from .base import NetworkType, lycoris_create, own_parameters

LOHA = NetworkType("loha", "LoHa", lycoris_create(loha.Linear, loha.Conv2d), own_parameters, convs=True,
                   args={"algo": "loha"})
