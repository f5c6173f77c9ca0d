"""javascript/*.js must parse (A1111 serves every file there to the page)."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "javascript", "*.js")))


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_javascript_parses(path):
    result = subprocess.run(["node", "--check", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_tab_uses_a1111s_page_helpers():
    source = open(os.path.join(ROOT, "javascript", "lora_train.js"), encoding="utf-8").read()
    for helper in ("randomId()", "requestProgress(", "args_to_array(arguments)", "switch_to_txt2img()",
                   "updateInput(textarea)", "#txt2img_prompt textarea"):
        assert helper in source
