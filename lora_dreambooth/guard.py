"""Proof that the user's model comes back exactly as it was.

``ModelSnapshot.take(model)`` records everything a training run could disturb: every tensor's
bytes (as a hash), dtype and device, every parameter's ``requires_grad``, every module's
``training`` flag and forward hooks, and which module object sits under each name.
``differences(model)`` lists what is not the same any more; ``restore_flags(model)`` puts the
flags back (it cannot undo changed weights or replaced modules: those are bugs to report).
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import torch

#: Bytes copied to the CPU at a time while hashing (keeps the host copy of a GPU model small).
_CHUNK_BYTES = 16 * 1024 * 1024


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes, read on its own device and copied to the CPU in chunks."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256()
    for start in range(0, flat.numel(), _CHUNK_BYTES):
        digest.update(flat[start:start + _CHUNK_BYTES].cpu().numpy())
    return digest.hexdigest()


def _tensor_digests(model: torch.nn.Module) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in model.state_dict().items()}


def _combine(model: torch.nn.Module, digests: dict[str, str]) -> str:
    """One sha256 over (name, dtype, shape, sha256 of bytes) of every state_dict tensor, in
    order. Hashing per tensor first is what lets ``differences`` name the tensor that changed."""
    total = hashlib.sha256()
    for name, t in model.state_dict().items():
        total.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{digests[name]}\n".encode())
    return total.hexdigest()


def state_hash(model: torch.nn.Module) -> str:
    """A hash of the model's whole state_dict: equal hashes mean bit-identical weights."""
    return _combine(model, _tensor_digests(model))


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
    digests: dict[str, str]
    modules: dict[str, _ModuleRecord]
    requires_grad: dict[str, bool]
    placement: dict[str, tuple[torch.dtype, torch.device]]

    @classmethod
    def take(cls, model: torch.nn.Module) -> "ModelSnapshot":
        digests = _tensor_digests(model)
        modules = {name: _ModuleRecord(weakref.ref(m), m.training, _hooks(m))
                   for name, m in model.named_modules(remove_duplicate=False)}
        params = dict(model.named_parameters(remove_duplicate=False))
        return cls(hash=_combine(model, digests), digests=digests, modules=modules,
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

        digests = _tensor_digests(model)
        if _combine(model, digests) != self.hash:
            changed = [name for name, d in digests.items() if self.digests.get(name) not in (None, d)]
            found += [f"tensor {name} values changed" for name in changed]
            if not changed:
                found.append("state_dict hash changed")
        return found
