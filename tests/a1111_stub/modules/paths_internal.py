"""Stand-in for modules/paths_internal.py: where A1111 keeps user data and models.

A1111 derives these from ``--data-dir`` / ``--models-dir``; the host tests point them at a
temporary folder of their own (``harness``), so importing this creates nothing."""
import os
import tempfile

modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)  # the webui folder (here: the stand-in's)

data_path = os.path.join(tempfile.gettempdir(), "a1111-stand-in-data")
models_path = os.path.join(data_path, "models")
