"""Stand-in for modules/extra_networks.py: ``<name:arg1:arg2>`` tags in a prompt, and the
registry of extra networks that processing activates before sampling and deactivates after.

As in A1111, every registered network is activated on every generation: the ones the prompt
does not name get an empty list (for the Lora extension: "no LoRA", which undoes the last
one); an error in one network is reported and the generation goes on without it."""
import re
from collections import defaultdict

from modules import errors

extra_network_registry: dict = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def initialize():
    extra_network_registry.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    """The prompt without its tags, and {network name: [ExtraNetworkParams]}."""
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def activate(p, extra_network_data):
    for name, extra_network in extra_network_registry.items():
        try:
            extra_network.activate(p, extra_network_data.get(name, []))
        except Exception as e:
            errors.report(f"activating extra network {name}: {e}", exc_info=True)


def deactivate(p, extra_network_data):
    for name, extra_network in extra_network_registry.items():
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.report(f"deactivating extra network {name}: {e}", exc_info=True)
