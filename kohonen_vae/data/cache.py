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
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..fileio import atomic_write, atomic_write_bytes  # noqa: F401 (atomic_write_bytes: used by folder.py)

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
