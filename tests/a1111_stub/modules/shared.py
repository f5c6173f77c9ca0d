"""Stand-in for modules/shared.py: the globals the host layer reads.

In A1111, ``cmd_opts`` comes from the command line (``--lora-dir`` is added by the built-in
Lora extension's preload.py, default ``<models>/Lora``), ``opts`` from config.json, ``state`` and
``sd_model`` are set during start-up and model loading."""
import os
from types import SimpleNamespace

from modules import options, paths_internal

cmd_opts = SimpleNamespace(lowvram=False, medvram=False, api_auth=None,
                           lora_dir=os.path.join(paths_internal.models_path, "Lora"))

OptionInfo = options.OptionInfo
opts = options.Options({"live_previews_image_format": OptionInfo("png", "Live preview file format"),
                        "live_previews_enable": OptionInfo(True, "Show live previews of the created image")}, set())

data_path = paths_internal.data_path
models_path = paths_internal.models_path
sd_model = None

from modules import shared_state  # noqa: E402  (A1111 also creates state after the globals)

state = shared_state.State()
