"""Stand-in for extensions-builtin/Lora/networks.py (importable as ``networks`` inside A1111).

A1111 merges LoRAs into the weights in place: before changing a layer it keeps CPU copies in
``network_weights_backup`` / ``network_bias_backup`` and records what is merged in
``network_current_names``; ``network_restore_weights_from_backup`` puts the copies back.
``list_available_networks`` rescans ``--lora-dir`` (so ``<lora:name:w>`` resolves);
``load_networks`` makes ``loaded_networks`` exactly the named files; ``network_apply_weights``
brings one layer to what ``loaded_networks`` asks for: back to its backup, then each network's
delta (tests/a1111_lora.py computes what A1111 adds) times its multiplier.

Layer names: A1111 gives every module a compvis ``network_layer_name`` and converts kohya keys to
it; the stand-in names each module the kohya way (``lora_dreambooth.targets.find_targets``),
which pairs the same keys with the same modules. It knows plain Linear/Conv2d layers, not the
fused OpenCLIP attention of SD2/SDXL text encoders."""
import os
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

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


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    if any(name not in available_network_aliases for name in names):
        list_available_networks()
    loaded_networks.clear()
    for i, name in enumerate(names):
        path = available_network_aliases.get(name)
        if path is None:
            print(f"Couldn't find network with name {name}")
            continue
        modules: dict = {}
        for key, tensor in load_file(path).items():
            layer, _, part = key.partition(".")
            modules.setdefault(layer, {})[part] = tensor
        loaded_networks.append(SimpleNamespace(
            name=name, modules=modules, te_multiplier=te_multipliers[i] if te_multipliers else 1.0,
            unet_multiplier=unet_multipliers[i] if unet_multipliers else 1.0,
            dyn_dim=dyn_dims[i] if dyn_dims else 1.0))


def assign_network_names_to_compvis_modules(sd_model):
    """Run by A1111 whenever a checkpoint is loaded (the extension's on_model_loaded). Layers
    of fused OpenCLIP attention stay unnamed (A1111 applies those four together), as does every
    layer of a layout find_targets refuses."""
    from lora_dreambooth.targets import find_targets

    mapping = {}
    try:
        targets = find_targets(sd_model, "locon", train_text_encoder=True)
    except (ValueError, NotImplementedError):
        targets = []
    for target in targets:
        module = sd_model.get_submodule(target.path)
        parent = sd_model.get_submodule(target.path.rsplit(".", 1)[0])
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not isinstance(parent, torch.nn.MultiheadAttention):
            module.network_layer_name = target.kohya_name
            mapping[target.kohya_name] = module
    sd_model.network_layer_mapping = mapping


def network_apply_weights(self):
    from a1111_lora import a1111_delta

    name = getattr(self, "network_layer_name", None)
    if name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{name} - no backup weights found and current weights are not unchanged")
        self.network_weights_backup = self.weight.to("cpu", copy=True)
    if getattr(self, "network_bias_backup", None) is None and wanted_names != ():
        self.network_bias_backup = None if self.bias is None else self.bias.to("cpu", copy=True)
    if current_names == wanted_names:
        return
    with torch.no_grad():
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            weights = net.modules.get(name)
            if weights is not None:
                multiplier = net.te_multiplier if name.startswith("lora_te") else net.unet_multiplier
                updown = a1111_delta(weights, self.weight, multiplier)
                self.weight.copy_((self.weight.to(updown.dtype) + updown).to(self.weight.dtype))
    self.network_current_names = wanted_names


def apply_networks(sd_model):
    """What the patched forwards do on a generation's first pass: every named layer brought to
    ``loaded_networks``."""
    for module in getattr(sd_model, "network_layer_mapping", {}).values():
        network_apply_weights(module)
