"""Stand-in for extensions-builtin/Lora/networks.py (importable as ``networks`` inside A1111).

A1111 merges LoRAs into the weights in place: before changing a layer it keeps CPU copies in
``network_weights_backup`` / ``network_bias_backup`` and records what is merged in
``network_current_names``; ``network_restore_weights_from_backup`` puts the copies back.
``list_available_networks`` rescans ``--lora-dir`` (so ``<lora:name:w>`` resolves)."""
import os

import torch

loaded_networks: list = []
available_networks: dict = {}
available_network_aliases: dict = {}


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        else:
            restore_weights_backup(self, "weight", weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, "bias", bias_backup)
    else:
        restore_weights_backup(self, "bias", bias_backup)


def list_available_networks():
    from modules import shared

    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for filename in sorted(os.listdir(shared.cmd_opts.lora_dir)):
        name, ext = os.path.splitext(filename)
        if ext in (".pt", ".ckpt", ".safetensors"):
            available_networks[name] = os.path.join(shared.cmd_opts.lora_dir, filename)
            available_network_aliases[name] = available_networks[name]
