"""The pack's own model folders in ComfyUI's registry (so ``extra_model_paths.yaml`` adds folders under the same
keys), and the checks every loader makes on a file name it is given."""

from __future__ import annotations

import os
from pathlib import Path, PurePath

import folder_paths


def register_model_folder(name: str, suffixes) -> None:
    """``models/<name>`` in ComfyUI's folder registry, after any extra_model_paths.yaml entries, listing files with
    ``suffixes`` (added to those another pack may have registered for it)."""
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    paths, known = folder_paths.folder_names_and_paths[name]
    folder_paths.folder_names_and_paths[name] = (paths, set(known) | set(suffixes))


def is_plain_name(name: str) -> bool:
    """Whether ``name`` can only name a file inside a model folder (not absolute, no ``..``)."""
    return bool(name) and not os.path.isabs(name) and ".." not in PurePath(name.replace("\\", "/")).parts


def searched_folders(name: str) -> str:
    return ", ".join(folder_paths.get_folder_paths(name)) or "(none registered)"


def file_stamp(path: str | Path | None) -> tuple:
    """``(path, modification time, size)``: a cache key that changes when the file does."""
    if path is None or not Path(path).exists():
        return (None, 0, 0)
    stat = os.stat(path)
    return (str(path), stat.st_mtime_ns, stat.st_size)
