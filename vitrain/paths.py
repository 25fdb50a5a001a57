"""The files a command line names, checked before anything is imported or read: a checkpoint that is missing, a
folder, not a PyTorch file or cut short, and an output that cannot be written. Each is one line that names the key
and the file (no torch needed: the checks read a few bytes, or a zip archive's directory)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from vitrain.errors import ConfigError, first_line

HUB_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")  # a timm hub folder's weights, in timm's order
LOCAL_DIR = "local-dir:"  # timm's prefix for a hub folder on disk


def local_path(checkpoint: str | Path) -> Path:
    """``model.checkpoint`` as a path: timm's ``local-dir:FOLDER`` is the folder."""
    return Path(str(checkpoint).removeprefix(LOCAL_DIR)).expanduser()


def hub_folder_weights(folder: Path, key: str = "model.checkpoint") -> Path:
    """The weights file of a timm hub folder (``save_for_hf``'s, vitrain's ``format=timm`` export)."""
    for name in HUB_FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{key}={folder} is a folder without {' or '.join(HUB_FOLDER_FILES)}; give a weights file, or "
                      f"a timm hub folder (config.json and model.safetensors)")


def file_kind(path: Path) -> str:
    """What the first bytes of ``path`` say: ``zip`` (torch.save's archive), ``pickle`` (legacy torch.save, protocol
    2+ starts with 0x80), ``empty`` or ``other``; OSError when it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(4)
    return "zip" if head.startswith(b"PK\x03\x04") else "pickle" if head[:1] == b"\x80" else "other" if head \
        else "empty"


def check_checkpoint(path: str | Path, key: str = "checkpoint", folder_ok: bool = False) -> None:
    """``path`` (given as ``key=...``) is a file torch can load, or refused in one line: missing, a folder (a timm hub
    folder with weights passes where ``folder_ok``), not a zip archive nor a pickle (a text file, an image), or a zip
    archive cut short. Safetensors and ONNX files are left to their own readers."""
    if path in ("", None):
        raise ConfigError(f"{key} has no value; set it on the command line ({key}=...)")
    path = local_path(path)
    if path.is_dir():
        if not folder_ok:
            raise ConfigError(f"checkpoint {path} is a folder, not a checkpoint; give a file such as "
                              f"<run>/checkpoints/best.pt ({key}=...)")
        hub_folder_weights(path, key)
        return
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; check the path ({key}=...)")
    if path.suffix in (".safetensors", ".onnx"):  # left to their own readers
        return
    try:
        kind = file_kind(path)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {path}: {e.strerror} ({key}=...)") from e
    if kind == "pickle":  # torch.load says what is wrong inside
        return
    if kind == "empty":
        raise ConfigError(f"cannot load checkpoint {path}: the file is empty (0 bytes), a save or copy that did not "
                          f"finish; give another ({key}=...)")
    if kind == "other":
        raise ConfigError(f"checkpoint {path} is not a PyTorch checkpoint (neither a zip archive nor a pickle: a text "
                          f"or other file); give a file written by torch.save, such as <run>/checkpoints/best.pt")
    problem = zip_problem(path)
    if problem:
        raise ConfigError(f"cannot load checkpoint {path}: {problem}; the file is corrupt or truncated ({key}=...)")


def zip_problem(path: Path) -> str | None:
    """Why the zip archive ``path`` (torch.save's format) cannot be read, or None: its directory is at the end, so
    that a file cut short (a copy or a save that did not finish) has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        return first_line(e)
    return None


def check_output(path: str | Path | None, key: str, folder: bool = False) -> None:
    """An output (``key=path``; a folder where ``folder``) that can be written: not a folder where a file goes, not a
    file where a folder goes, and below a folder (made when missing), not below a file."""
    if not path:
        return
    path = Path(path)
    if not folder and path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; give a file name ({key}={path}/NAME)")
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"cannot write to {path}: it is a file, not a folder; set {key} to a folder")
    above = path if folder else path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"cannot write to {path}: {above} is a file, not a folder; set {key} elsewhere")
