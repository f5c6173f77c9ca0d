"""A small re-implementation of what A1111 1.10.1's built-in Lora extension adds to one
layer's weight, from the tensors a LoRA file holds for that layer (fp32 throughout).

It follows ``extensions-builtin/Lora``: ``network.NetworkModule`` (calc_scale,
finalize_updown, apply_weight_decompose), ``network_lora``, ``network_hada``, ``network_lokr``
and ``lyco_helpers``, including their quirks (peft-style ``lora_A``/``lora_B`` keys lose alpha
and dora_scale; LoKr ignores alpha unless a factor is decomposed). ``tests/test_export.py``
proves it against the golden tables produced by the real loader.

Below it, the helpers the tests use to compare an adapted layer with it: a file's tensors
for one layer, a probe input, the base layer run with another weight, and the per-layer check.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """lyco_helpers.make_weight_cp: core t (r, r, kh, kw), wa (r, out), wb (r, in)."""
    return torch.einsum("i r k l, i o -> o r k l", torch.einsum("i j k l, j r -> i r k l", t, wb), wa)


def _conventional(up: torch.Tensor, down: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def _lora(w: dict[str, torch.Tensor], is_conv: bool) -> tuple[torch.Tensor, list[int], int]:
    up, down, mid = w["lora_up.weight"], w["lora_down.weight"], w.get("lora_mid.weight")
    if not is_conv:  # A1111 builds nn.Linear modules: everything flattened to 2-D
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    else:
        if down.dim() == 2:
            down = down.reshape(down.shape[0], -1, 1, 1)
        up = up.reshape(up.shape[0], -1, 1, 1)
    shape = [up.size(0), down.size(1)]
    if mid is not None:
        updown = torch.einsum("n m k l, i n, m j -> i j k l", mid,
                              up.reshape(up.size(0), -1), down.reshape(down.size(0), -1))
        shape += list(mid.shape[2:])
    else:
        if down.dim() == 4:
            shape += list(down.shape[2:])
        updown = _conventional(up, down, shape)
    return updown, shape, down.shape[0]


def _hada(w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[int], int]:
    w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
    t1, t2 = w.get("hada_t1"), w.get("hada_t2")
    shape = [w1a.size(0), w1b.size(1)]
    if t1 is not None:
        shape = [w1a.size(1), w1b.size(1)] + list(t1.shape[2:])
        updown1 = _cp(t1, w1a, w1b)
    else:
        if w1b.dim() == 4:
            shape += list(w1b.shape[2:])
        updown1 = _conventional(w1a, w1b, shape)
    updown2 = _cp(t2, w2a, w2b) if t2 is not None else _conventional(w2a, w2b, shape)
    return updown1 * updown2, shape, w1b.shape[0]


def _lokr(w: dict[str, torch.Tensor], orig_shape: torch.Size) -> tuple[torch.Tensor, list[int], Optional[int]]:
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2 = _cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    shape = list(orig_shape) if len(orig_shape) == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    # dim comes from a decomposed factor (w2's wins); with both factors full it is None and
    # alpha is ignored.
    dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
    return updown, shape, dim


def _weight_decompose(updown: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA as A1111 applies it: the merged weight's norm per *input* column."""
    merged = updown + orig
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1))
    return merged * (dora_scale / norm) - orig


def a1111_delta(weights: dict[str, torch.Tensor], base_weight: torch.Tensor,
                multiplier: float = 1.0) -> torch.Tensor:
    """What A1111 adds to ``base_weight`` (a Linear's or Conv2d's weight) for a layer whose
    file tensors are ``weights`` (suffix → tensor, e.g. ``"lora_up.weight"``, ``"alpha"``)."""
    w = {k: v.to(torch.float32) for k, v in weights.items()}
    orig = base_weight.to(torch.float32)
    if all(k in w for k in ("lora_up.weight", "lora_down.weight")):
        updown, shape, dim = _lora(w, orig.dim() == 4)
    elif all(k in w for k in ("lora_A.weight", "lora_B.weight")):
        # ModuleTypeLora clears the dict and keeps only the renamed pair: alpha etc. are lost.
        w = {"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]}
        updown, shape, dim = _lora(w, orig.dim() == 4)
    elif all(k in w for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        updown, shape, dim = _hada(w)
    elif ("lokr_w1" in w or "lokr_w1_a" in w and "lokr_w1_b" in w) and \
            ("lokr_w2" in w or "lokr_w2_a" in w and "lokr_w2_b" in w):
        updown, shape, dim = _lokr(w, orig.shape)
    else:
        raise ValueError(f"no A1111 module type matches keys {sorted(w)}")

    # NetworkModule.finalize_updown
    if "bias" in w:
        updown = (updown.reshape(w["bias"].shape) + w["bias"]).reshape(shape)
    if len(shape) == 4:
        updown = updown.reshape(shape)
    if orig.numel() == updown.numel():
        updown = updown.reshape(orig.shape)
    if "scale" in w:
        scale = w["scale"].item()
    elif dim is not None and "alpha" in w:
        scale = w["alpha"].item() / dim
    else:
        scale = 1.0
    updown = updown * scale
    if "dora_scale" in w:
        updown = _weight_decompose(updown, orig, w["dora_scale"])
    return updown * multiplier


# --- comparing adapted layers with it -----------------------------------------------------

def file_weights(tensors: dict[str, torch.Tensor], kohya_name: str) -> dict[str, torch.Tensor]:
    """One layer's tensors of a LoRA file, by suffix (``"lora_up.weight"``, ``"alpha"``...)."""
    prefix = kohya_name + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def probe(layer: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    """A random input for a Linear or Conv2d layer."""
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8, generator=gen)
    return torch.randn(3, 5, layer.in_features, generator=gen)


def apply_weight(base: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``base(x)`` with ``weight`` in place of the base layer's own."""
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, base.bias)


def assert_a1111_exact(adapters, tensors: dict[str, torch.Tensor]) -> None:
    """Each adapted layer's output equals the base layer run with A1111's merged weight
    W + delta (delta computed from the file tensors), to 1e-4 of the adapter's contribution
    plus float32 rounding of the base output (1e-6 of it: the merged weight is summed in fp32),
    the contribution being more than 1e-3 of the base output."""
    gen = torch.Generator().manual_seed(1)
    for layer in adapters.layers:
        x = probe(layer.base, gen)
        with torch.no_grad():
            adapted = layer.wrapper(x)
            base_out = layer.base(x)
            delta = a1111_delta(file_weights(tensors, layer.target.kohya_name), layer.base.weight)
            merged = apply_weight(layer.base, x, layer.base.weight + delta)
        contribution = (adapted - base_out).norm()
        assert contribution > 1e-3 * base_out.norm(), f"{layer.target.path}: adapter has no effect"
        allowed = 1e-4 * contribution + 1e-6 * base_out.norm()
        err = ((adapted - merged).norm() / contribution).item()
        assert (adapted - merged).norm() <= allowed, f"{adapters.network} {layer.target.path}: relative error {err:.2e}"
