"""The tab in headless Chromium: A1111's page around it (tests/a1111_stub/page.py) served on
127.0.0.1 with the tiny SD1 model loaded, and Debian's chromium driven by playwright (no
browser download: ``executable_path``). One server and one browser per module; a fresh page,
an empty workspace and a forgotten last run per test, unless a test says otherwise.

Not a conftest.py: the other tests import their helpers with ``from conftest import …``, which
a second conftest module would shadow; the browser tests import these fixtures by name."""
from __future__ import annotations

import copy
import os
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from a1111_stub.harness import (enter_stand_in, hook_progress, leave_stand_in, load_model_as_a1111, load_script,
                                write_images)

CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: What a test waits for a line on screen at most (a tiny run takes a few seconds).
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def served(tmp_path_factory, _tiny_sd1_pristine):
    folder = tmp_path_factory.mktemp("a1111")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a1111 = enter_stand_in(str(folder))
    demo, patches = None, pytest.MonkeyPatch()
    try:
        from a1111_stub.page import serve

        load_model_as_a1111(a1111.shared, copy.deepcopy(_tiny_sd1_pristine))
        load_script()
        a1111.script_callbacks.ui_settings_callback()
        from lora_dreambooth.host import entry, paths, settings

        a1111.shared.opts.set(settings.KEEP_DATASETS, True)  # a reload must still show the dataset
        demo, url = serve(a1111.script_callbacks.ui_tabs_callback())
        images = write_images(str(folder / "pictures"), 3)
        served = SimpleNamespace(a1111=a1111, url=url, job=entry.JOB, ws=paths.workspace(), images=images,
                                 folder=folder, step_seconds=0.0)
        # A test may make each training step last a while, as on a slow machine, to watch it.
        hook_progress(patches, lambda p: time.sleep(served.step_seconds) if p.phase == "training" else None)
        yield served
    finally:
        patches.undo()
        if demo is not None:
            demo.server.force_exit = True  # uvicorn: no waiting for the browser's open connections
            demo.close()
        leave_stand_in()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: bash .ci/setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


def clear_workspace(served) -> None:
    for folder in (served.ws.instance_dir, served.ws.class_dir):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)


@pytest.fixture
def page(served, browser):
    """The page opened on the LoRA Train tab, nothing uploaded and no last run; the console's
    errors are collected in ``page.errors``."""
    served.job.reset()
    served.step_seconds = 0.0
    clear_workspace(served)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    opened.errors = []
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    open_tab(opened, served.url)
    yield opened
    context.close()
    served.job.cancel()  # a failed test must not leave a long run going
    deadline = time.time() + 60
    while served.job.active and time.time() < deadline:
        time.sleep(0.1)


def open_tab(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#tabs > .tab-nav button", has_text="LoRA Train").click()
    page.locator("#lora_train_start").wait_for()


# --- what a user does and sees ------------------------------------------------------------------

def shown(page, elem_id: str):
    """The element gradio updates of an HTML component (its wrapper carries the same id)."""
    return page.locator(f".prose#{elem_id}")


def open_section(page, name: str) -> None:
    """One of the left column's tabs: Dataset, Class images, Prompts, Hyperparameters."""
    page.locator("#lora_train_tabs > .tab-nav button", has_text=name).click()


def fill(page, field: str, value) -> None:
    """Type into a text box, number box or a slider's number box, as a user does."""
    box = page.locator(f"#lora_train_{field}").locator("textarea, input[type=number], input[type=text]").first
    box.fill(str(value))
    box.press("Tab")


def pick(page, field: str, choice: str) -> None:
    """Choose in a gradio 3.41 drop-down."""
    page.locator(f"#lora_train_{field} input").click()
    page.locator(f"#lora_train_{field} ul.options li", has_text=choice).first.click()


def value_of(page, field: str) -> str:
    return page.locator(f"#lora_train_{field}").locator("textarea, input[type=number], input[type=text]").first.input_value()


def expect_value(page, field: str, value) -> None:
    """Wait until the field shows ``value`` (set by the server after an event)."""
    from playwright.sync_api import expect

    box = page.locator(f"#lora_train_{field}").locator("textarea, input[type=number], input[type=text]").first
    expect(box).to_have_value(str(value))


def upload(page, paths: list) -> None:
    open_section(page, "Dataset")
    page.set_input_files("#lora_train_instance_upload input[type=file]", paths)
    page.locator("#lora_train_instance_upload", has_text=os.path.basename(paths[-1])).wait_for()
    page.locator("#lora_train_instance_add").click()
    shown(page, "lora_train_instance_info").filter(has_text=f"{len(paths)} image").wait_for()


def bar_text(page) -> str:
    """A1111's progress bar above the tab's output box ("" when there is none)."""
    bars = page.locator("#tab_lora_train .progressDiv .progress")
    return bars.first.inner_text() if bars.count() else ""


def set_fields(page, **values) -> None:
    """Fields of the Prompts and Hyperparameters tabs (Advanced opened when needed)."""
    for name, value in values.items():
        on_prompts = name in ("trigger", "class_prompt", "preview_prompt", "name")
        open_section(page, "Prompts" if on_prompts else "Hyperparameters")
        if not page.locator(f"#lora_train_{name}").is_visible():
            page.locator("#lora_train_advanced").click()
        fill(page, name, value)


def wait_for_result(page, text: str) -> str:
    result = shown(page, "lora_train_result").filter(has_text=text)
    result.wait_for()
    return result.inner_text()
