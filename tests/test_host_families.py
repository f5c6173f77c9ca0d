"""The tab adapts to the family A1111 has loaded (SD 1.x, SD 2.x, SDXL): the family is shown,
its defaults fill the form, the API fills unset fields from them, and one run per family goes
end to end through the tab's Start handler."""
from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open

from a1111_stub.harness import a1111, component, load_model_as_a1111, write_images  # noqa: F401
from lora_dreambooth.guard import state_hash
from tiny_models import build_tiny_sd2, build_tiny_sdxl
from test_host_ui import start, tab, upload, written  # noqa: F401


@pytest.fixture
def loaded(request, a1111, tiny_sd1):
    """The model of the family named by the test's parameter, loaded as A1111 loads it (before
    the tab is built, as at A1111's start)."""
    build = {"sd1": lambda: tiny_sd1, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl}[request.param]
    return load_model_as_a1111(a1111.shared, build())


FAMILIES = [  # family, shown as, resolution default, metadata in the file, sidecar "sd version"
    ("sd1", "SD 1.x", 512, {"ss_base_model_version": "sd_v1", "ss_v2": "False"}, "SD1"),
    ("sd2", "SD 2.x (768-v)", 768, {"ss_base_model_version": "sd_v2", "ss_v2": "True"}, "SD2"),
    ("sdxl", "SDXL", 1024, {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "SDXL"),
]


@pytest.mark.parametrize("loaded, label, resolution, metadata, sd_version", FAMILIES,
                         indirect=["loaded"], ids=[f[0] for f in FAMILIES])
def test_one_run_per_family_through_the_tab(a1111, loaded, tab, label, resolution, metadata, sd_version):
    assert f"Loaded model: {label}" in component(tab.blocks, "lora_train_family").value
    assert component(tab.blocks, "lora_train_resolution").value == resolution
    assert component(tab.blocks, "lora_train_train_text_encoder").value is False
    before = state_hash(loaded)
    images = write_images(str(a1111.data_path) + "/in", 2)
    upload(tab, "instance", [(p, os.path.basename(p)) for p in images])

    out = start(tab, train_text_encoder=True)

    assert "class='error'" not in out["lora_train_error"], out["lora_train_error"]
    assert written(a1111.lora_dir) == ["sks.json", "sks.png", "sks.safetensors"]
    with safe_open(os.path.join(a1111.lora_dir, "sks.safetensors"), "pt") as f:
        file_metadata, keys = f.metadata(), list(f.keys())
    assert {k: file_metadata[k] for k in metadata} == metadata
    assert any(k.startswith(("lora_te_", "lora_te1_")) for k in keys)
    assert json.load(open(os.path.join(a1111.lora_dir, "sks.json")))["sd version"] == sd_version
    assert state_hash(loaded) == before


@pytest.mark.parametrize("loaded", ["sd1"], indirect=True)
def test_defaults_follow_a_checkpoint_switch(a1111, loaded, tab):
    from a1111_stub.harness import Event
    assert component(tab.blocks, "lora_train_resolution").value == 512
    load_model_as_a1111(a1111.shared, build_tiny_sdxl())  # the user picks an SDXL checkpoint
    out = Event(tab.blocks, "lora_train_family_defaults")()
    assert "SDXL" in out["lora_train_family"]
    assert (out["lora_train_resolution"], out["lora_train_rank"], out["lora_train_buckets"],
            out["lora_train_train_text_encoder"], out["lora_train_gradient_checkpointing"]) == \
        (1024, 16, True, False, True)


@pytest.mark.parametrize("loaded", ["sdxl"], indirect=True)
def test_api_fills_unset_fields_with_the_family_defaults(a1111, loaded, tmp_path):
    from lora_dreambooth.host import api
    folder = str(tmp_path / "in")
    write_images(folder, 2)
    config, _, problems, _ = api._prepare({"trigger": "wpg", "instance_dir": folder})
    assert problems == [] and (config.resolution, config.rank, config.buckets) == (1024, 16, True)
    config, _, _, _ = api._prepare({"trigger": "wpg", "instance_dir": folder, "resolution": 512})
    assert config.resolution == 512
