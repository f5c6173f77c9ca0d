"""Stand-in for extensions-builtin/Lora/extra_networks_lora.py: ``<lora:name:te:unet>`` →
``networks.load_networks`` (te multiplier default 1, unet multiplier default te; ``te=`` /
``unet=`` named forms). A1111 merges the loaded networks in the patched Linear/Conv2d forwards
on the next pass; the stand-in merges them right here, before sampling, which renders the same.
``deactivate`` does nothing, as in A1111: merged weights stay until the next generation (or
the host's own restore)."""
import networks
from modules import extra_networks, shared


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list):
        names, te_multipliers, unet_multipliers = [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            te_multipliers.append(te)
            unet_multipliers.append(unet)
        networks.load_networks(names, te_multipliers, unet_multipliers)
        networks.apply_networks(shared.sd_model)

    def deactivate(self, p):
        pass
