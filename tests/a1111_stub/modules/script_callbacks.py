"""Stand-in for modules/script_callbacks.py: the three registrations an extension uses and the
calls A1111 makes to run them (tabs and settings while building the UI, app_started once the
FastAPI app exists)."""
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])

callback_map = {"callbacks_app_started": [], "callbacks_ui_tabs": [], "callbacks_ui_settings": []}


def _add(callbacks: list, fun, name=None) -> None:
    callbacks.append(ScriptCallback("<extension>", fun, name))


def on_app_started(callback, *, name=None):
    _add(callback_map["callbacks_app_started"], callback, name)


def on_ui_tabs(callback, *, name=None):
    _add(callback_map["callbacks_ui_tabs"], callback, name)


def on_ui_settings(callback, *, name=None):
    _add(callback_map["callbacks_ui_settings"], callback, name)


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        c.callback(demo, app)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c.callback() or []
    return res


def ui_settings_callback():
    for c in callback_map["callbacks_ui_settings"]:
        c.callback()
