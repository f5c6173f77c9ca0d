"""The A1111 page around the tab, served on 127.0.0.1 for the browser tests
(tests/browser/): the stand-in built the way A1111 1.10.1 builds its UI.

- modules/ui.py: every ``on_ui_tabs`` interface rendered in ``gr.Tabs(elem_id="tabs")`` as
  ``gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}")``, after the txt2img tab (here only its
  ``#txt2img_prompt``, what "Send to txt2img" fills); the theme's fonts are local names, as in
  A1111 (no font download).
- modules/ui_gradio_extensions.py: the page scripts are put before ``</head>`` by replacing
  ``gradio.routes.templates.TemplateResponse`` (A1111 links them by URL; inlined here), the
  stand-in's javascript/a1111_page.js first, then the extension's javascript/*.js.
- webui.py: ``demo.queue(64)``, ``launch``, then /internal/progress and the ``app_started``
  callbacks (our API) on the app."""
from __future__ import annotations

import glob
import os
import socket
from typing import Optional

import gradio as gr
import gradio.routes

from .harness import ROOT, STUB

#: A1111's style.css for the progress bar and live preview (the parts the tab shows).
_CSS = """
.progressDiv{position:relative;height:20px;background:#b4c0cc;border-radius:3px !important;margin-bottom:-3px;}
.progressDiv .progress{width:0%;height:20px;background:#0060df;color:white;font-weight:bold;line-height:20px;
  padding:0 8px 0 0;text-align:right;border-radius:3px;overflow:visible;white-space:nowrap;padding:0 0.5em;}
.livePreview{position:absolute;z-index:300;background:var(--background-fill-primary);}
.livePreview img{position:absolute;object-fit:contain;width:100%;height:calc(100% - 60px);}
"""


def _scripts() -> str:
    paths = [os.path.join(STUB, "javascript", "a1111_page.js"), *sorted(glob.glob(os.path.join(ROOT, "javascript", "*.js")))]
    return "".join(f"<script type='text/javascript'>\n{open(p, encoding='utf-8').read()}\n</script>\n" for p in paths)


def _inject_scripts() -> None:
    original = getattr(gradio.routes.templates, "lora_train_original", gradio.routes.templates.TemplateResponse)
    gradio.routes.templates.lora_train_original = original
    head = _scripts()

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode("utf8"))
        res.init_headers()
        return res

    gradio.routes.templates.TemplateResponse = template_response


def build_page(interfaces: list) -> gr.Blocks:
    theme = gr.themes.Default(font=["Source Sans Pro", "ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["IBM Plex Mono", "ui-monospace", "Consolas", "monospace"])
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion", theme=theme, css=_CSS) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt")
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    return demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(interfaces: list, port: Optional[int] = None) -> tuple[gr.Blocks, str]:
    """Launch the page (not blocking); (demo, its URL). ``demo.close()`` stops it."""
    from modules import progress, script_callbacks

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    _inject_scripts()
    demo = build_page(interfaces)
    demo.queue(64)
    port = port or free_port()
    app, _local, _share = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                      quiet=True, show_error=True)
    progress.setup_progress_api(app)
    script_callbacks.app_started_callback(demo, app)
    return demo, f"http://127.0.0.1:{port}/"
