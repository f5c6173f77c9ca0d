"""Stand-in for modules/sd_models.py: ``CheckpointInfo``, what A1111 1.10.1 records of a checkpoint
file and puts on the model it loads as ``sd_model.sd_checkpoint_info`` (``load_model_weights``
also sets ``sd_model_checkpoint`` to the file and ``sd_model_hash`` to the short hash it has
just calculated). The stand-in is given the file's sha256 instead of reading a file."""
import os

from modules import paths_internal

model_dir = "Stable-diffusion"


def model_path() -> str:
    """A1111's module global, a function here: the tests move the models folder after import."""
    return os.path.abspath(os.path.join(paths_internal.models_path, model_dir))


class CheckpointInfo:
    def __init__(self, filename: str, sha256: str):
        self.filename = filename
        folder, abspath = model_path(), os.path.abspath(filename)
        name = abspath.replace(folder, "") if abspath.startswith(folder) else os.path.basename(filename)
        name = name[1:] if name.startswith(("\\", "/")) else name
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = "NOFILE"  # A1111's old model_hash of a file that is not there
        self.sha256 = sha256
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
