"""Stand-in for modules/paths_internal.py: where A1111 keeps user data and models.

A1111 derives these from ``--data-dir`` / ``--models-dir``; the host tests point them at a
temporary folder."""
import os
import tempfile

data_path = tempfile.mkdtemp(prefix="a1111-data-")
models_path = os.path.join(data_path, "models")
