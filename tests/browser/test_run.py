"""A first run as a user makes it, in headless Chromium: upload, trigger, Start, what the bar
says in each phase, previews, the loss chart, the result and "Send to txt2img"; Cancel and
Esc; and a reload that still shows the dataset and the last result. The screenshots in docs/
come from ``test_a_first_run`` (LORA_TRAIN_SCREENSHOTS=docs)."""
from __future__ import annotations

import io
import json
import os
import re
import time

from PIL import Image

from tab_page import (bar_text, browser, expect_value, open_section, open_tab, page, served,  # noqa: F401 (fixtures)
                      set_fields, shown, upload, wait_for_result)

#: Slow enough to watch (each preview is a job of its own in A1111's bar), fast on a CPU.
WATCHED = dict(steps=12, batch_size=1, rank=4, resolution=64, preview_every=4, preview_steps=20)
SCREENSHOTS = os.environ.get("LORA_TRAIN_SCREENSHOTS")


def screenshot(page, name: str) -> None:
    """The window as the user sees it, saved small (256 colours) for the README."""
    if SCREENSHOTS:
        shot = Image.open(io.BytesIO(page.screenshot(animations="disabled"))).convert("RGB")
        shot.quantize(256).save(os.path.join(SCREENSHOTS, f"tab-{name}.png"), optimize=True)


def loss_specs(page) -> list:
    """The Altair charts the server sent for the loss plot (vega draws them on a canvas)."""
    specs = []

    def look(response) -> None:
        if "/run/predict" in response.url or "/queue" in response.url:
            try:
                data = response.json().get("data", [])
            except Exception:  # not JSON (or a stream): not a reply with outputs
                return
            specs.extend(json.loads(v["plot"]) for v in data if isinstance(v, dict) and v.get("type") == "altair")
    page.on("response", look)
    return specs


def test_a_first_run(page, served):
    specs = loss_specs(page)
    upload(page, served.images)
    assert page.locator("#lora_train_instance_gallery img").count() == 3
    set_fields(page, trigger="sks", **WATCHED)
    token = shown(page, "lora_train_token_info")
    assert "'sks'" in token.inner_text()
    expect_value(page, "alpha", "4")  # alpha followed the rank
    open_section(page, "Dataset")
    screenshot(page, "before")

    served.step_seconds = 0.25  # steps the bar can show (it asks twice a second)
    page.locator("#lora_train_start").click()
    seen, during = [], False
    deadline = time.time() + 120
    while time.time() < deadline and "Finished" not in shown(page, "lora_train_result").inner_text():
        text = bar_text(page)
        if text:
            seen.append(text)
        if not during and "Drawing the preview at step" in text and page.locator(".livePreview img").count():
            screenshot(page, "during")
            during = True
        time.sleep(0.05)

    assert any(re.match(r"Step \d+/12 · loss [\d.]+ · LR [\d.e-]+ \d+% ETA: \d+s$", t) for t in seen), list(dict.fromkeys(seen))
    assert any(re.match(r"Drawing the preview at step (4|8|12)/12… \d+% ETA: \d+s$", t) for t in seen), list(dict.fromkeys(seen))
    assert all(t.count("ETA") <= 1 for t in seen), [t for t in seen if t.count("ETA") > 1]
    percents = [int(m.group(1)) for t in seen for m in [re.search(r"(\d+)% ", t + " ")] if m]
    assert percents and percents == sorted(percents), seen  # never backwards, previews included
    result = wait_for_result(page, "Finished 12 steps: saved")
    assert result.endswith("sks.safetensors")
    page.locator("#tab_lora_train .progressDiv").wait_for(state="detached")  # the bar goes at the end
    assert not page.get_by_text("Checking the model is unchanged").count()
    assert not page.get_by_text("Waiting...").count()
    assert shown(page, "lora_train_error").inner_text().strip() in ("", "Time taken: 0.00s")
    page.locator("#lora_train_previews img").nth(2).wait_for()  # steps 4, 8 and 12
    assert page.locator("#lora_train_loss [data-testid=block-label]").inner_text().strip() == "Loss"
    last = specs[-1]
    assert len(last["datasets"][last["data"]["name"]]) == 12
    assert last["encoding"]["x"]["axis"] == {"format": "d", "tickMinStep": 1}  # whole steps
    assert page.locator("#lora_train_grid_lora input").input_value() == "sks"  # the grid offers it
    screenshot(page, "after")

    page.locator("#lora_train_send").click()
    assert page.locator("#txt2img_prompt textarea").input_value() == "sks, <lora:sks:1>"
    assert page.locator("#txt2img_prompt").is_visible()
    assert page.errors == []


def start_long_run(page, served) -> None:
    upload(page, served.images[:1])
    set_fields(page, trigger="sks", steps=5000, batch_size=1, rank=4, resolution=64, preview_every=0, name="long")
    page.locator("#lora_train_start").click()
    page.wait_for_function("() => /Step \\d+\\/5000/.test(document.querySelector('#tab_lora_train .progressDiv')"
                           "?.textContent || '')")


def test_cancel_says_so_and_saves(page, served):
    page.locator("#lora_train_interrupt").click()
    shown(page, "lora_train_error").filter(has_text="No training is running.").wait_for()
    start_long_run(page, served)
    page.locator("#lora_train_interrupt").click()
    shown(page, "lora_train_error").filter(has_text="Stopping after this step; what was trained is saved.").wait_for()
    assert re.search(r"Cancelled after \d+ steps: saved .*long(-\d+)?\.safetensors", wait_for_result(page, "Cancelled"))
    assert page.errors == []


def test_escape_interrupts_like_in_txt2img(page, served):
    page.keyboard.press("Escape")  # no run: nothing happens, and nothing throws
    start_long_run(page, served)
    page.locator("#lora_train_log").click()  # focus somewhere on the tab, as a user would
    page.keyboard.press("Escape")
    assert "Cancelled after" in wait_for_result(page, "Cancelled")
    assert page.errors == []


def test_a_reload_shows_the_dataset_and_the_last_result(page, served):
    upload(page, served.images[:2])
    open_tab(page, served.url)  # reload
    shown(page, "lora_train_instance_info").filter(has_text="2 images").wait_for()
    assert page.locator("#lora_train_instance_gallery img").count() == 2
    open_section(page, "Hyperparameters")
    assert shown(page, "lora_train_arithmetic").inner_text().startswith("2 images")

    set_fields(page, trigger="sks", steps=2, batch_size=1, rank=4, resolution=64, preview_every=0, name="again")
    for expected in ("again.safetensors", "again-1.safetensors"):  # the second run is renamed
        page.locator("#lora_train_start").click()
        assert wait_for_result(page, f"/{expected}").startswith("Finished 2 steps: saved")
    assert os.path.basename(served.job.status().run_dir).startswith("again-1-")  # as the file

    open_tab(page, served.url)
    assert wait_for_result(page, "Finished 2 steps").endswith("again-1.safetensors")
    assert page.locator("#lora_train_lora_prompt textarea").input_value() == "sks, <lora:again-1:1>"
    assert page.errors == []
