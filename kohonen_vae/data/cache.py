"""A small on-disk cache of decoded uint8 arrays as plain ``.npy`` files (memory-mappable, atomically written).

An entry is ``<cache_dir>/<prefix>-<key>.<member>.npy`` for each array plus ``<prefix>-<key>.json`` (written last)
recording every member's shape and dtype. An entry is used only if the json and every ``.npy`` are present and
consistent (header shape/dtype and exact file size); anything else - a truncated, foreign or unreadable file - is
treated as a miss and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..fileio import atomic_write, atomic_write_bytes

ENV_CACHE = "KOHONEN_VAE_CACHE"


def cache_dir() -> Path:
    """The cache folder: ``$KOHONEN_VAE_CACHE`` if set, else ``~/.cache/kohonen_vae`` (not created here)."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kohonen_vae"


def hash_key(parts) -> str:
    """Stable 20-hex-digit sha256 of a JSON-serialisable description."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def files_fingerprint(paths) -> list:
    """[(resolved path, size, mtime_ns)] for each file: changes whenever a file is replaced or edited."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def atomic_save_npy(path: Path, array: np.ndarray, chunk_bytes: int = 1 << 26) -> None:
    """Save ``array`` as ``.npy`` at ``path`` atomically (temp file + fsync + ``os.replace``), streamed in chunks."""
    array = np.asarray(array)

    def write(f):
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
                  "shape": tuple(array.shape)}
        try:
            np.lib.format.write_array_header_1_0(f, header)
        except ValueError:  # header too long for format 1.0
            np.lib.format.write_array_header_2_0(f, header)
        flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1)
        rows = max(1, chunk_bytes // max(1, flat[:1].nbytes))
        for start in range(0, flat.shape[0], rows):
            f.write(np.ascontiguousarray(flat[start:start + rows]).tobytes())

    atomic_write(path, write)


def _header_ok(path: Path, shape: tuple, dtype: str) -> bool:
    """True if ``path`` is a .npy of exactly this shape/dtype whose size matches header + data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
        else:
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if fortran or tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype):
        return False
    return os.path.getsize(path) == offset + int(np.prod(shape, dtype=np.int64)) * got_dtype.itemsize


def entry_paths(prefix: str, key: str, members) -> Tuple[Path, Dict[str, Path]]:
    """(meta json path, {member: npy path}) of a cache entry."""
    d = cache_dir()
    return d / f"{prefix}-{key}.json", {m: d / f"{prefix}-{key}.{m}.npy" for m in members}


def load_entry(prefix: str, key: str) -> Optional[Dict[str, np.ndarray]]:
    """Return {member: copy-on-write memmap} of a valid cache entry, or None (missing or corrupt -> warn, None)."""
    meta_path = cache_dir() / f"{prefix}-{key}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        _, paths = entry_paths(prefix, key, meta["members"])
        out = {}
        for m, spec in meta["members"].items():
            if not _header_ok(paths[m], tuple(spec["shape"]), spec["dtype"]):
                raise ValueError(f"{paths[m].name} does not match its recorded shape/dtype/size")
            # mode "c" (copy-on-write): torch.from_numpy accepts it (writable) and the file can never be modified.
            out[m] = np.load(paths[m], mmap_mode="c") if spec["shape"] and np.prod(spec["shape"]) > 0 \
                else np.load(paths[m])
        out["__meta__"] = meta.get("extra", {})
        try:  # record the use: `kohonen-vae cache --older-than DAYS` prunes entries nobody loaded for a while
            os.utime(meta_path)
        except OSError:
            pass  # a read-only cache is fine
        return out
    except Exception as exc:  # any damage at all means "rebuild"
        warnings.warn(f"kohonen_vae cache entry {meta_path.name} is unreadable or corrupt ({exc}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def save_entry(prefix: str, key: str, arrays: Dict[str, np.ndarray], extra: Optional[dict] = None) -> Optional[Path]:
    """Write arrays as one cache entry (each file atomic, the json last). Returns the json path, or None (with a
    warning) if the cache folder is not writable - caching is an optimisation, never a failure."""
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        meta_path, paths = entry_paths(prefix, key, arrays)
        for m, a in arrays.items():
            atomic_save_npy(paths[m], a)
        meta = {"members": {m: {"shape": list(a.shape), "dtype": np.dtype(a.dtype).str} for m, a in arrays.items()},
                "extra": extra or {}}
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
        return meta_path
    except OSError as exc:
        warnings.warn(f"could not write the kohonen_vae cache in {cache_dir()} ({exc}); continuing without it. "
                      f"Set {ENV_CACHE} to a writable folder to make reloads fast.", RuntimeWarning, stacklevel=3)
        return None


def cached_arrays(prefix: str, key_parts, build: Callable[[], Dict[str, np.ndarray]],
                  use_cache: bool = True) -> Tuple[Dict[str, np.ndarray], dict]:
    """Return (arrays, cache_info): from the cache entry for ``key_parts`` if valid, else ``build()`` then save.

    ``build`` returns {member: array}; a member named ``__meta__`` (a JSON-able dict) is stored alongside.
    cache_info = {"cache": "hit" | "built" | "off", "cache_path": str | None}.
    """
    if not use_cache:
        arrays = build()
        return arrays, {"cache": "off", "cache_path": None}
    key = hash_key(key_parts)
    hit = load_entry(prefix, key)
    if hit is not None:
        return hit, {"cache": "hit", "cache_path": str(cache_dir() / f"{prefix}-{key}.json")}
    arrays = build()
    extra = arrays.pop("__meta__", {})
    path = save_entry(prefix, key, arrays, extra)
    if path is not None:
        reloaded = load_entry(prefix, key)  # serve the memmaps so the built copies can be freed
        if reloaded is not None:
            arrays = reloaded
    arrays.setdefault("__meta__", extra)
    return arrays, {"cache": "built", "cache_path": None if path is None else str(path)}


# ------------------------------------------------------------------------------------------------ housekeeping
_ENTRY_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)-(?P<key>[0-9a-f]{20})\.json$")
#: temp files of interrupted atomic writes: ".<final name>.<random>.tmp" (fileio) and ".folder-*.npy.tmp"
_TEMP_NAME = re.compile(r"^\..+\.tmp$")


def list_entries(directory: Optional[Path] = None) -> list:
    """The cache's entries, most recently used first: dicts with ``name`` (``<prefix>-<key>``), ``prefix``,
    ``files`` (the entry's json and .npy paths), ``bytes`` and ``mtime`` (last written or loaded, seconds
    since the epoch). Only files named like this module's entries are listed: other files in the folder are not ours."""
    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return []
    out = []
    for meta in d.iterdir():
        m = _ENTRY_NAME.match(meta.name)
        if not m:
            continue
        stem = meta.name[: -len(".json")]
        files = [meta] + sorted(p for p in d.glob(f"{stem}.*.npy") if p.is_file())
        stats = [p.stat() for p in files if p.exists()]
        out.append({"name": stem, "prefix": m["prefix"], "files": files, "bytes": sum(st.st_size for st in stats),
                    "mtime": max(st.st_mtime for st in stats)})
    return sorted(out, key=lambda e: -e["mtime"])


def remove_entries(older_than_days: Optional[float] = None, directory: Optional[Path] = None,
                   now: Optional[float] = None) -> Tuple[int, int]:
    """Delete cache entries (all, or those not written or used for ``older_than_days``), their orphaned
    .npy members and leftover temp files; returns (files removed, bytes freed). Files not named like this
    module's entries are never touched, so pointing ``$KOHONEN_VAE_CACHE`` at a shared folder is safe."""
    import time

    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return 0, 0
    now = time.time() if now is None else now
    cutoff = None if older_than_days is None else now - float(older_than_days) * 86400
    doomed, kept = [], set()
    for entry in list_entries(d):
        if cutoff is None or entry["mtime"] < cutoff:
            doomed += entry["files"]
        else:
            kept.add(entry["name"])
    # members without a json and temp files: left by an interrupted write, or a write still in progress
    # (the json comes last), so only once they are an hour (or --older-than) old
    leftover_cutoff = now - 3600 if cutoff is None else min(cutoff, now - 3600)
    for p in d.iterdir():
        if not p.is_file() or p in doomed or p.stat().st_mtime >= leftover_cutoff:
            continue
        stem = p.name.split(".")[0]
        orphan = p.suffix == ".npy" and _ENTRY_NAME.match(stem + ".json") and stem not in kept
        if orphan or _TEMP_NAME.match(p.name):
            doomed.append(p)
    removed = freed = 0
    for p in doomed:
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        freed += size
    return removed, freed
