"""Writing under --output: local names made from a server's (untrusted) ones, files written whole or not at all."""

from __future__ import annotations

import os
import secrets
import unicodedata
from pathlib import Path, PurePosixPath

# A part's bytes stay well under the 255 of most filesystems, leaving room for "-2" and a temporary file's affixes.
MAX_PART_BYTES = 200
MAX_SUFFIX_CHARS = 16
# Deeper subfolders are cut: the whole path must stay under PATH_MAX wherever --output is.
MAX_FOLDERS = 8
UNNAMED = "unnamed"
WINDOWS_UNSAFE = set('<>:"|?*')
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{kind}{n}" for kind in ("COM", "LPT") for n in range(1, 10))}


class WriteFailed(Exception):
    """A file could not be written (disk full, file too large, no permission): nothing after it would be either."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"cannot write {path}: {error.strerror or error}")
        self.path = path


class OutsideOutput(Exception):
    """A write that would land outside --output (through a symlink there): refused."""


def _safe_part(part: str) -> str:
    # Control, format and unassigned characters, lone surrogates: none can be written or shown as they are.
    part = "".join("_" if ch in WINDOWS_UNSAFE or unicodedata.category(ch).startswith("C") else ch for ch in part)
    part = part.rstrip(" .")  # Windows drops trailing dots and spaces; this also turns "." and ".." into ""
    if part.split(".")[0].upper() in WINDOWS_DEVICES:
        part = "_" + part
    return part


def _clipped(name: str) -> str:
    """``name`` cut to MAX_PART_BYTES, keeping its suffix (what the file is)."""
    if len(name.encode()) <= MAX_PART_BYTES:
        return name
    suffix = PurePosixPath(name).suffix
    suffix = suffix if len(suffix) <= MAX_SUFFIX_CHARS else ""
    room = MAX_PART_BYTES - len(suffix.encode())
    return name.encode()[:room].decode(errors="ignore") + suffix


def safe_parts(name: str) -> list[str]:
    """A server's relative name as path parts that stay where they are put: no "..", no root, no drive."""
    parts = (_safe_part(_clipped(part)) for part in name.replace("\\", "/").split("/"))
    return [part for part in parts if part]


def _numbered(name: str, number: int) -> str:
    path = PurePosixPath(name)
    return f"{path.stem}-{number}{path.suffix}"


def local_paths(items: list[dict]) -> list[PurePosixPath]:
    """Where a job's output files ({filename, subfolder, type}) go in its folder: safe names, one file each.

    Two files of the same name (other subfolders sanitized alike, other types) are told apart by a number;
    names compare case-folded, as they would on a case-insensitive filesystem.
    """
    files: set[str] = set()
    folders: set[str] = set()
    paths = []
    for item in items:
        *within, name = safe_parts(item.get("subfolder", "")) + (safe_parts(item["filename"]) or [UNNAMED])
        within = within[:MAX_FOLDERS]
        prefixes = ["/".join(within[:depth]).casefold() for depth in range(1, len(within) + 1)]
        if any(prefix in files for prefix in prefixes):
            within, prefixes = [], []  # a file already holds the folder's name: this one goes to the top
        candidate, number = name, 1
        while "/".join([*within, candidate]).casefold() in files | folders:
            number += 1
            candidate = _numbered(name, number)
        files.add("/".join([*within, candidate]).casefold())
        folders.update(prefixes)
        paths.append(PurePosixPath(*within, candidate))
    return paths


def write_whole(path: Path, data: bytes):
    """``data`` into ``path`` through a new temporary file renamed over it: never a partial file, and a symlink
    at ``path`` is replaced rather than written through."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        # O_EXCL: the temporary file is new, never a file or link that was there.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        descriptor = os.open(temporary, flags, 0o666)
    except OSError as error:
        raise WriteFailed(path, error) from error
    try:
        with open(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # some filesystems tell of a full disk only here, and the rename must not win
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass  # the error that brought us here is the one to report
        if isinstance(error, OSError):
            raise WriteFailed(path, error) from error
        raise


class OutputFolder:
    """--output: files written only under its real path, whatever symlinks lie in it."""

    def __init__(self, root: Path):
        self.root = Path(os.path.realpath(root))

    def write(self, relative: PurePosixPath, data: bytes) -> Path:
        *folders, name = relative.parts
        directory = self.root
        for folder in folders:
            directory = directory / folder
            try:
                os.mkdir(directory)
            except FileExistsError:
                pass
            except OSError as error:
                raise WriteFailed(directory, error) from error
            # Checked at each level before going deeper, so no folder is ever made beyond a symlink leading out.
            real = Path(os.path.realpath(directory))
            if not real.is_relative_to(self.root):
                raise OutsideOutput(f"refused to write {relative}: {directory} leads to {real}, outside {self.root}")
        target = directory / name
        write_whole(target, data)
        return target
