"""What a first-time user with a typo meets, in headless Chromium: the reason on screen at
once, next to Start, and nothing started (no bar left on "Waiting...", no grid opened); and a
form that does what they expect (presets keep what they typed, alpha follows the rank, network
types as people write them, Advanced in groups, the trigger check)."""
from __future__ import annotations

import time

from tab_page import (browser, expect_value, fill, open_section, open_tab, page, pick, served,  # noqa: F401 (fixtures)
                      set_fields, shown, upload, value_of, wait_for_result)

QUICK = dict(trigger="sks", steps=2, batch_size=1, rank=4, resolution=64, preview_every=0)


def refused(page, *reasons: str) -> str:
    """Press Start; the message under it must give every reason, and nothing may start."""
    page.locator("#lora_train_start").click()
    message = shown(page, "lora_train_error").filter(has_text="Nothing was started").filter(has_text=reasons[-1])
    message.wait_for()
    text = message.inner_text()
    for reason in reasons:
        assert reason in text, text
    start, shown_at = page.locator("#lora_train_start").bounding_box(), message.bounding_box()
    assert 0 <= shown_at["y"] - (start["y"] + start["height"]) < 120  # right under the button
    time.sleep(1.5)  # what a run would have shown by now
    assert page.locator("#tab_lora_train .progressDiv").count() == 0 and not page.get_by_text("Waiting...").count()
    assert message.is_visible()  # still there: nothing emptied it
    return text


def test_every_refusal_is_on_screen_and_starts_nothing(page, served):
    upload(page, served.images[:1])
    set_fields(page, **QUICK)
    page.locator("#lora_train_start").click()
    wait_for_result(page, "Finished 2 steps")
    page.locator("#lora_train_grid_lora input").wait_for()
    open_tab(page, served.url)  # a fresh page: the grid closed, the last run's result shown
    wait_for_result(page, "Finished 2 steps")

    set_fields(page, trigger=" ")
    refused(page, "trigger must not be empty")
    refused(page, "trigger must not be empty")  # the same reason again still shows
    set_fields(page, trigger="sks", steps=0, learning_rate=5)
    refused(page, "steps must be", "learning rate must be")
    set_fields(page, steps=2, learning_rate=0.0005)
    open_section(page, "Hyperparameters")
    pick(page, "preset", "Generative")
    shown(page, "lora_train_class_hint").filter(has_text="needs class images").wait_for()
    refused(page, "no usable class images")
    assert not page.locator("#lora_train_grid_lora").is_visible()  # no after-run actions
    assert "Finished 2 steps" in shown(page, "lora_train_result").inner_text()  # the last run's, unchanged

    pick(page, "preset", "Dedicated")
    page.locator("#lora_train_start").click()
    wait_for_result(page, "Finished 2 steps")
    shown(page, "lora_train_error").filter(has_text="Nothing was started").wait_for(state="detached")
    assert page.errors == []


def test_presets_keep_what_was_typed_and_say_so(page, served):
    open_section(page, "Hyperparameters")
    assert value_of(page, "preview_every") != "0"  # a first run shows previews
    assert page.locator("#lora_train_network input").input_value() == "LoRA"
    page.locator("#lora_train_network input").click()
    listed = [text.split("\n")[-1] for text in page.locator("#lora_train_network ul.options li").all_inner_texts()]
    assert listed == ["LoRA", "LoCon", "LoHa", "LoKr", "DoRA"]  # (the chosen one has a ✓ before it)
    page.locator("#lora_train_network ul.options li", has_text="LoRA").first.click()
    fill(page, "steps", 4)
    fill(page, "rank", 4)
    expect_value(page, "alpha", "4")  # followed the rank (scale 1)
    pick(page, "preset", "Generative")
    note = shown(page, "lora_train_preset_note").filter(has_text="Kept what you typed")
    note.wait_for()
    assert "steps 4" in note.inner_text() and "rank 4" in note.inner_text()
    assert "regularization 0.2" in note.inner_text()
    assert (value_of(page, "steps"), value_of(page, "rank"), value_of(page, "regularization")) == ("4", "4", "0.2")
    fill(page, "alpha", 2)
    fill(page, "rank", 8)
    expect_value(page, "alpha", "2")  # typed: stays

    page.locator("#lora_train_advanced").click()
    headings = page.locator("#lora_train_advanced h4").all_inner_texts()
    assert headings == ["Learning rate and optimizer", "Network", "Images and captions", "Numerics",
                        "Previews and saves"]
    assert page.errors == []


def test_the_trigger_check_tells_a_warning_from_a_good_trigger(page, served):
    set_fields(page, trigger="woman")
    line = shown(page, "lora_train_token_info").filter(has_text="ordinary word")
    line.wait_for()
    warning_colour = line.locator("p").evaluate("p => getComputedStyle(p).color")
    assert line.inner_text().startswith("⚠")
    suggestions = page.locator("#lora_train_token_suggestions input")
    suggestions.click()
    first = page.locator("#lora_train_token_suggestions ul.options li").first
    rare = first.inner_text().strip()
    first.click()
    expect_value(page, "trigger", rare)
    good = shown(page, "lora_train_token_info").filter(has_text="a good trigger")
    good.wait_for()
    assert good.inner_text().startswith("✓")
    assert good.locator("p").evaluate("p => getComputedStyle(p).color") != warning_colour
    fill(page, "trigger", rare + "x")
    shown(page, "lora_train_token_info").filter(has_text=f"'{rare}x'").wait_for()
    assert suggestions.input_value() == ""  # the pick no longer stands for the trigger
    assert page.errors == []
