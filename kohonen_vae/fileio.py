"""Atomic files: every file of the project (checkpoints, caches, reports, metrics summaries) is written
to a temporary file in the destination folder, flushed and fsync'ed, then moved over the destination
with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsync'ed. A process killed at any
moment leaves either the previous file or the new one, never a torn one.

A full disk surfaces as one :class:`~kohonen_vae.errors.DiskFullError` that names the file (the
temporary file is removed). Temporary files are named ``.NAME.XXXXXXXX.tmp`` beside ``NAME``; a process
killed mid-write leaves one behind, which :func:`remove_stale_temp_files` deletes later.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so that a rename or a new entry in it survives a crash (a no-op where folders cannot
    be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temp(path: Path, write_fn, mode: str) -> str:
    """Write the content into a fresh temporary file beside ``path``; returns its name (complete, fsync'ed)."""
    from .errors import disk_full_error, is_disk_full

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(path, e) from e
        raise
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _unlink_quietly(tmp)
        if is_disk_full(e) or (isinstance(e, RuntimeError) and "No space left" in str(e)):  # torch.save wraps it
            raise disk_full_error(path, e if isinstance(e, OSError) else OSError(28, "No space left on device")) from e
        raise
    return tmp


def _unlink_quietly(name) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def atomic_write(path, write_fn, mode: str = "wb") -> None:
    """Create or replace ``path`` atomically; ``write_fn(file)`` writes the content."""
    path = Path(path)
    tmp = _write_temp(path, write_fn, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def replace_keeping_previous(path, write_fn, previous, mode: str = "wb") -> None:
    """Like :func:`atomic_write`, but an existing ``path`` is first renamed to ``previous`` (replacing it).

    Killed in between, the folder holds ``previous`` and the complete temporary file but no ``path``:
    readers then find the predecessor at ``previous``, never a torn file."""
    path, previous = Path(path), Path(previous)
    tmp = _write_temp(path, write_fn, mode)
    try:
        if path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def temp_file_pattern(name: str) -> re.Pattern:
    """The names :func:`atomic_write` gives the temporary files of ``name``: ``.NAME.XXXXXXXX.tmp``."""
    return re.compile(r"^\." + re.escape(name) + r"\.[A-Za-z0-9_]{6,12}\.tmp$")


def remove_stale_temp_files(folder, names, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` for the files ``names``
    (a process killed mid-write), last modified at least ``older_than_s`` seconds ago; returns them.
    Only names of exactly that pattern are touched, so no other file is ever deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [temp_file_pattern(n) for n in names]
    removed = []
    now = time.time()
    for p in folder.iterdir():
        if any(pat.match(p.name) for pat in patterns) and p.is_file() and not p.is_symlink():
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))
