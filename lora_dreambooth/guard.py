"""Proof that the user's model comes back exactly as it was.

``ModelSnapshot.take(model)`` records everything a training run could disturb: every tensor's
bytes (as a checksum), dtype and device, every parameter's ``requires_grad``, every module's
``training`` flag and forward hooks, and which module object sits under each name.
``verify(model)`` lists what is not the same any more (and remembers it, so the host and the
engine share one check); ``restore_flags(model)`` puts the flags back (it cannot undo changed
weights or replaced modules: those are bugs to report).

The checksum of a tensor, computed on the tensor's own device (one read of every weight at
memory bandwidth; no copy to the host but two numbers per tensor), is a pair of wrapping
(mod 2**64) sums over its bytes read as 64-bit words cut into rows of 4093 words: the plain
sum of all words, and the sum of each row's sum times the row's position. A single flipped bit
changes one word by ±2**k, never 0 mod 2**64, so any change confined to one word is always
caught; a change spread over many words (an optimizer step, a merged LoRA) goes unnoticed only
if its deltas cancel in both sums exactly (chance ~2**-64); the positional sum also catches
rows of words moved or swapped within a tensor (not two words swapped within one row). Both
cost one pass: ``bench/guard.py`` measures it.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

_WORD = 8  # bytes per word summed (int64: a plain vectorised sum, bandwidth-bound)
_ROW = 4093  # words per row of the positional sum (prime: rows rarely align with a weight's rows)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """(Σ words + Σ tail bytes, Σ_j (j + 1) · row_sum_j) of the tensor's bytes as int64 words
    (wrapping), the last row possibly short: an int64 pair on the tensor's device."""
    data = tensor.detach().reshape(-1).view(torch.uint8)  # reshape copies only a non-contiguous tensor
    if data.storage_offset() % _WORD:  # int64 view needs an 8-byte aligned start (rare: a slice)
        data = data.clone()
    words = data[:data.numel() // _WORD * _WORD].view(torch.int64)
    tail = data[words.numel() * _WORD:].to(torch.int64).sum() if data.numel() % _WORD else 0
    if words.numel() <= _ROW:  # one row (most tensors are this small): as few kernels as can be
        total = words.sum()
        return torch.stack([total + tail, total])
    whole = words.numel() // _ROW * _ROW
    sums = words[:whole].view(-1, _ROW).sum(1)
    if whole < words.numel():
        sums = torch.cat([sums, words[whole:].sum().view(1)])
    positions = torch.arange(1, sums.numel() + 1, device=sums.device)
    return torch.stack([sums.sum() + tail, (sums * positions).sum()])


def _checksums(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Each tensor's checksum, computed where it lives; one transfer per device. A storage
    shared by several names (tied weights) is read once."""
    seen: dict[tuple, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen[key] = _checksum(t)
        sums[name] = seen[key]
    values: dict[str, tuple[int, int]] = {}
    by_device: dict[torch.device, list[str]] = {}
    for name, s in sums.items():
        by_device.setdefault(s.device, []).append(name)
    for names in by_device.values():
        host = torch.stack([sums[n] for n in names]).cpu().tolist()
        values.update(zip(names, map(tuple, host)))
    return values


def _fingerprint(model: torch.nn.Module) -> tuple[str, dict[str, tuple[int, int]]]:
    """(one sha256 over name, dtype, shape and checksum of every parameter and buffer in
    order, the checksums by name). Checking per tensor is what lets ``differences`` name the
    tensor that changed."""
    tensors = _all_tensors(model)
    digests = _checksums(tensors)
    total = hashlib.sha256()
    for name, t in tensors.items():
        total.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{digests[name]}\n".encode())
    return total.hexdigest(), digests


def state_hash(model: torch.nn.Module) -> str:
    """A fingerprint of every parameter and buffer of the model: it changes with any flipped
    bit, dtype, shape or name (see the module docstring for what a checksum proves)."""
    return _fingerprint(model)[0]


def _hooks(module: torch.nn.Module) -> tuple[tuple[int, ...], ...]:
    return (tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
            tuple(module._backward_hooks), tuple(module._backward_pre_hooks))


def _all_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


@dataclass
class _ModuleRecord:
    ref: "weakref.ReferenceType[torch.nn.Module]"  # weak: a snapshot must not keep a model alive
    training: bool
    hooks: tuple[tuple[int, ...], ...]


@dataclass
class ModelSnapshot:
    hash: str
    digests: dict[str, tuple[int, int]]
    modules: dict[str, _ModuleRecord]
    requires_grad: dict[str, bool]
    placement: dict[str, tuple[torch.dtype, torch.device]]
    #: What ``verify`` found (None: not verified yet): whoever holds the snapshot reads the
    #: engine's after-run check here instead of reading every weight again.
    verified: Optional[list[str]] = None

    @classmethod
    def take(cls, model: torch.nn.Module) -> "ModelSnapshot":
        model_hash, digests = _fingerprint(model)
        modules = {name: _ModuleRecord(weakref.ref(m), m.training, _hooks(m))
                   for name, m in model.named_modules(remove_duplicate=False)}
        params = dict(model.named_parameters(remove_duplicate=False))
        return cls(hash=model_hash, digests=digests, modules=modules,
                   requires_grad={name: p.requires_grad for name, p in params.items()},
                   placement={name: (t.dtype, t.device) for name, t in _all_tensors(model).items()})

    def restore_flags(self, model: torch.nn.Module) -> None:
        """Put back every module's training flag and every parameter's requires_grad.

        ``training`` is assigned directly: ldm replaces ``.train`` on its first/cond stage
        models with a no-op, so ``module.train(flag)`` would silently do nothing there."""
        for name, module in model.named_modules(remove_duplicate=False):
            record = self.modules.get(name)
            if record is not None:
                module.training = record.training
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in self.requires_grad:
                param.requires_grad_(self.requires_grad[name])

    def differences(self, model: torch.nn.Module) -> list[str]:
        """One message per difference between the model now and the snapshot (empty = same)."""
        found: list[str] = []
        now = dict(model.named_modules(remove_duplicate=False))
        for name, record in self.modules.items():
            label = name or "<root>"
            module = now.get(name)
            if module is None:
                found.append(f"module {label} missing")
                continue
            if record.ref() is not module:
                found.append(f"module {label} replaced")
                continue
            if module.training != record.training:
                found.append(f"module {label} training flag {record.training} -> {module.training}")
            if _hooks(module) != record.hooks:
                found.append(f"module {label} hooks changed")
        found += [f"module {name} added" for name in now if name not in self.modules]

        params = dict(model.named_parameters(remove_duplicate=False))
        for name, flag in self.requires_grad.items():
            if name in params and params[name].requires_grad != flag:
                found.append(f"parameter {name} requires_grad {flag} -> {params[name].requires_grad}")

        tensors = _all_tensors(model)
        for name, (dtype, device) in self.placement.items():
            t = tensors.get(name)
            if t is None:
                found.append(f"tensor {name} missing")
            elif (t.dtype, t.device) != (dtype, device):
                found.append(f"tensor {name} moved {dtype}@{device} -> {t.dtype}@{t.device}")
        found += [f"tensor {name} added" for name in tensors if name not in self.placement]

        model_hash, digests = _fingerprint(model)
        if model_hash != self.hash:
            changed = [name for name, d in digests.items() if self.digests.get(name) not in (None, d)]
            found += [f"tensor {name} values changed" for name in changed]
            if not changed:
                found.append("model fingerprint changed")
        return found

    def verify(self, model: torch.nn.Module) -> list[str]:
        """``differences(model)``, kept in ``verified``."""
        self.verified = self.differences(model)
        return self.verified
