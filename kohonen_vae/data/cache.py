"""A small on-disk cache of decoded uint8 arrays as plain ``.npy`` files (memory-mappable, atomically written,
verified on every load), and its housekeeping (``kohonen-vae cache``).

Layout. An entry ``<prefix>-<key>`` is its index ``<prefix>-<key>.json`` plus one ``<prefix>-<key>.<member>.npy``
per array. The index carries the signature ``"kohonen_vae_cache": 2``, a ``state`` and, per member, its file name,
shape, dtype, size in bytes and checksums::

    {"kohonen_vae_cache": 2, "state": "complete", "name": "cifar10-<key>",
     "members": {"x_train": {"file": "cifar10-<key>.x_train.npy", "shape": [50000, 3, 32, 32], "dtype": "|u1",
                             "bytes": 153600128, "sha256": "<hex>", "sampled_sha256": "<hex>",
                             "sample": [256, 65536]}, ...},
     "extra": {...}}

Writing (:func:`save_entry`): the index is written first with ``"state": "writing"`` and the member names, then
each member atomically (:func:`kohonen_vae.fileio.atomic_write`: a temp file ``.NAME.XXXXXXXX.tmp`` beside it,
fsync, ``os.replace``), then the index again, ``"complete"``, with the sizes and checksums. So every file the cache
ever creates is recorded in an index before it exists, and a write killed at any point leaves an entry (state
``writing``) that loads as a miss and that ``kohonen-vae cache --clear`` can prune.

Reading (:func:`load_entry`). An entry is used only if its index is complete and every member has its recorded
size, ``.npy`` header (shape, dtype) and checksum; anything else (a truncated, zeroed, foreign or unreadable file,
an interrupted write, an entry of an older version without checksums) warns and is rebuilt.

Checksums and their cost. ``sha256`` is the sha256 of a member's array bytes (the ``.npy`` without its header).
A member of at most :data:`FULL_HASH_MAX_BYTES` (64 MiB) is verified by recomputing it; a larger one by
``sampled_sha256`` (:func:`sampled_digest`): sha256 of the file size and :data:`SAMPLE_BLOCKS` = 256 blocks of
:data:`SAMPLE_BLOCK_BYTES` = 64 KiB at evenly spaced offsets, first and last block included (16 MiB read).
Measured on the 2-core development machine under load (SHA-NI present, files in the page cache), for the CIFAR-10
``x_train`` member (153,600,128 bytes; ``measure_hash_cost(PATH)`` of this module): reading it 17 ms, a full
hashlib sha256 129-185 ms, the sampled digest 13-22 ms. Verifying the whole CIFAR-10 entry (184 MB) at load
takes 51 ms with the rule above (``x_test``, 30.7 MB, fully hashed: 33 ms; ``x_train`` sampled: 18 ms; labels
< 1 ms) instead of ~220 ms for full hashes, against 0.6-1.1 s for the whole cached ``load_splits("cifar10")``:
a full hash would add 20-35 % to every run start, the rule 5-9 %. What it detects: any change of size or header,
any change of a member up to 64 MiB; for larger members any damaged contiguous range longer than
(size - 64 KiB) / 255 + 64 KiB (~0.67 MB for ``x_train``), in particular a member zeroed or overwritten at the
same size, but not a single flipped byte between the sampled blocks. The full ``sha256`` of every member is
computed once, when the entry is written (cheaper than the decoding that precedes it), and gives
:func:`content_fingerprint`.

Housekeeping (:func:`list_entries`, :func:`remove_entries`) deletes only what an index records: the index, its
members, and the temp files of exactly those names (:func:`kohonen_vae.fileio.temp_file_pattern`). A file that
merely looks like an entry name, or any other ``*.tmp``, is never touched, so ``$KOHONEN_VAE_CACHE`` can point
at a shared folder. Index files of the previous version (shapes and dtypes only, no signature) are recognised by
their exact structure and their members only when their ``.npy`` headers match (state ``legacy``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..fileio import atomic_write, atomic_write_bytes, temp_file_pattern

ENV_CACHE = "KOHONEN_VAE_CACHE"
#: the signature key of an index written by this module, and the format version it holds
SIGNATURE = "kohonen_vae_cache"
FORMAT_VERSION = 2
#: members up to this size are verified by a full sha256 at every load, larger ones by :func:`sampled_digest`
FULL_HASH_MAX_BYTES = 64 << 20
SAMPLE_BLOCKS = 256
SAMPLE_BLOCK_BYTES = 64 << 10
#: a write in progress (state "writing") is spared by --clear until it has been idle this long
IN_PROGRESS_GRACE_S = 3600.0
_MAX_INDEX_BYTES = 1 << 20  # a larger "index" is not ours: never parsed
_MEMBER = re.compile(r"^[A-Za-z0-9_]+$")
_ENTRY_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_]+)-(?P<key>[0-9a-f]{20})\.json$")


class CacheEntryInvalid(ValueError):
    """An entry cannot be used (message says why); the caller rebuilds it."""


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


# ------------------------------------------------------------------------------------------------ checksums
def _npy_data_offset(f) -> Tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the array bytes) of the open ``.npy`` file ``f``."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), fortran, dtype, f.tell()


def data_sha256(path) -> str:
    """sha256 (hex) of the array bytes of the ``.npy`` file ``path`` (everything after its header)."""
    with open(path, "rb") as f:
        _npy_data_offset(f)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """sha256 (hex) of a C-ordered array's bytes: equal to :func:`data_sha256` of the array saved as ``.npy``."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256()
    flat = a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)
    for s in range(0, flat.size, 1 << 24):
        h.update(flat[s:s + (1 << 24)])
    return h.hexdigest()


def sampled_digest(path, blocks: Optional[int] = None, block_bytes: Optional[int] = None) -> str:
    """sha256 (hex) of ``size`` (8 bytes, little endian) followed by ``blocks`` blocks of ``block_bytes`` bytes of
    the file at offsets ``(size - b) * i // (blocks - 1)``, i = 0 .. blocks - 1, b = min(block_bytes, size).

    The blocks are spaced ``(size - b) / (blocks - 1)`` apart, so any damaged contiguous range longer than that
    spacing plus ``b`` overlaps a block and changes the digest; so does any change of the size."""
    blocks = SAMPLE_BLOCKS if blocks is None else int(blocks)
    block_bytes = SAMPLE_BLOCK_BYTES if block_bytes is None else int(block_bytes)
    size = os.path.getsize(path)
    b = min(block_bytes, size)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek((size - b) * i // max(1, blocks - 1))
            h.update(f.read(b))
    return h.hexdigest()


def _member_record(path: Path) -> dict:
    """What the index records of a freshly written member: file, shape, dtype, bytes, sha256 (+ sampled)."""
    with open(path, "rb") as f:
        shape, fortran, dtype, _ = _npy_data_offset(f)
    rec = {"file": path.name, "shape": list(shape), "dtype": np.dtype(dtype).str, "bytes": path.stat().st_size,
           "sha256": data_sha256(path)}
    if rec["bytes"] > FULL_HASH_MAX_BYTES:
        rec["sample"] = [SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES]
        rec["sampled_sha256"] = sampled_digest(path)
    return rec


def verify_member(path: Path, rec: dict) -> None:
    """Raise :class:`CacheEntryInvalid` unless ``path`` has the recorded size, header (shape, dtype) and checksum
    (``sampled_sha256`` when recorded, else the full ``sha256`` of the array bytes)."""
    if not path.is_file():
        raise CacheEntryInvalid(f"{path.name} is missing")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise CacheEntryInvalid(f"{path.name} has {size} bytes, its index records {rec['bytes']}")
    with open(path, "rb") as f:
        shape, fortran, dtype, offset = _npy_data_offset(f)
    want_shape, want_dtype = tuple(rec["shape"]), np.dtype(rec["dtype"])
    if fortran or shape != want_shape or dtype != want_dtype or \
            size != offset + int(np.prod(want_shape, dtype=np.int64)) * want_dtype.itemsize:
        raise CacheEntryInvalid(f"{path.name} does not match its recorded shape/dtype/size")
    if "sampled_sha256" in rec:
        n, b = rec["sample"]
        ok = sampled_digest(path, n, b) == rec["sampled_sha256"]
    else:
        ok = data_sha256(path) == rec["sha256"]
    if not ok:
        raise CacheEntryInvalid(f"{path.name} does not match its recorded checksum (damaged or overwritten)")


def content_fingerprint(members: Dict[str, dict]) -> str:
    """20 hex digits of sha256 over every member's (name, shape, dtype, sha256 of its bytes), sorted by name:
    equal iff the arrays are byte-identical (independent of file names, paths and mtimes)."""
    return hash_key(sorted([m, list(r["shape"]), np.dtype(r["dtype"]).str, r["sha256"]] for m, r in members.items()))


def arrays_fingerprint(arrays: Dict[str, np.ndarray]) -> str:
    """:func:`content_fingerprint` computed from in-memory arrays (members named ``__*`` are skipped)."""
    return content_fingerprint({m: {"shape": list(np.shape(a)), "dtype": np.asarray(a).dtype.str,
                                    "sha256": array_sha256(np.asarray(a))}
                                for m, a in arrays.items() if not m.startswith("__") and a is not None})


# ------------------------------------------------------------------------------------------------ entries
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


def entry_paths(prefix: str, key: str, members) -> Tuple[Path, Dict[str, Path]]:
    """(index json path, {member: npy path}) of a cache entry."""
    d = cache_dir()
    return d / f"{prefix}-{key}.json", {m: d / f"{prefix}-{key}.{m}.npy" for m in members}


def _write_index(meta_path: Path, meta: dict) -> None:
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())


def begin_entry(prefix: str, key: str, members) -> Tuple[Path, Dict[str, Path]]:
    """Record a write in progress: the index of ``<prefix>-<key>`` with ``"state": "writing"`` and the member
    names, written before any member file exists (so an interrupted write is an entry that can be pruned).
    Returns :func:`entry_paths`. Raises OSError if the cache folder is not writable."""
    for m in members:
        if not _MEMBER.match(m):
            raise ValueError(f"cache member names are letters, digits and _, got {m!r}")
    meta_path, paths = entry_paths(prefix, key, members)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    _write_index(meta_path, {SIGNATURE: FORMAT_VERSION, "state": "writing", "name": f"{prefix}-{key}",
                             "members": {m: {"file": p.name} for m, p in paths.items()}})
    return meta_path, paths


def member_temp_file(path: Path) -> str:
    """A new empty temp file beside the member ``path``, named as :func:`kohonen_vae.fileio.atomic_write` names
    its temp files (``.NAME.XXXXXXXX.tmp``), so the cache's housekeeping recognises it as this entry's."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def finish_entry(prefix: str, key: str, members, extra: Optional[dict] = None) -> Path:
    """Complete an entry whose member files are in place: checksum them and write the index ``"complete"``."""
    meta_path, paths = entry_paths(prefix, key, members)
    meta = {SIGNATURE: FORMAT_VERSION, "state": "complete", "name": f"{prefix}-{key}",
            "members": {m: _member_record(p) for m, p in paths.items()}, "extra": extra or {}}
    _write_index(meta_path, meta)
    return meta_path


def _read_index(meta_path: Path):
    """The parsed index at ``meta_path``, or None if it is not a JSON object of at most 1 MiB."""
    try:
        if meta_path.stat().st_size > _MAX_INDEX_BYTES:
            return None
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_legacy_index(meta) -> bool:
    """True for an index of the previous format: exactly {"members": {name: {"shape", "dtype"}}, "extra": {}}."""
    if not isinstance(meta, dict) or set(meta) != {"members", "extra"} or not isinstance(meta["extra"], dict):
        return False
    members = meta["members"]
    return isinstance(members, dict) and bool(members) and all(
        isinstance(m, str) and _MEMBER.match(m) and isinstance(r, dict) and set(r) == {"shape", "dtype"}
        for m, r in members.items())


def _is_ours(meta) -> bool:
    return isinstance(meta, dict) and meta.get(SIGNATURE) == FORMAT_VERSION and isinstance(meta.get("members"), dict) \
        and all(isinstance(m, str) and _MEMBER.match(m) for m in meta["members"])


def load_entry(prefix: str, key: str) -> Optional[Dict[str, np.ndarray]]:
    """{member: copy-on-write memmap, "__meta__": extra, "__fingerprint__": :func:`content_fingerprint`} of a
    complete, verified entry; None if there is none. An entry that exists but cannot be used (incomplete,
    older format without checksums, damaged) warns (RuntimeWarning) and gives None: the caller rebuilds it."""
    meta_path = cache_dir() / f"{prefix}-{key}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = _read_index(meta_path)
        if _is_legacy_index(meta):
            raise CacheEntryInvalid("it was written by an older kohonen_vae and has no checksums")
        if not _is_ours(meta):
            raise CacheEntryInvalid("its index is not a kohonen_vae cache index")
        if meta.get("state") != "complete":
            raise CacheEntryInvalid("it is incomplete (an interrupted write, or one in progress in another process)")
        _, paths = entry_paths(prefix, key, meta["members"])
        out = {}
        for m, rec in meta["members"].items():
            verify_member(paths[m], rec)
            # mode "c" (copy-on-write): torch.from_numpy accepts it (writable) and the file can never be modified.
            out[m] = np.load(paths[m], mmap_mode="c") if rec["shape"] and np.prod(rec["shape"]) > 0 \
                else np.load(paths[m])
        out["__meta__"] = meta.get("extra", {})
        out["__fingerprint__"] = content_fingerprint(meta["members"])
        try:  # record the use: `kohonen-vae cache --older-than DAYS` prunes entries nobody loaded for a while
            os.utime(meta_path)
        except OSError:
            pass  # a read-only cache is fine
        return out
    except Exception as exc:  # any damage at all means "rebuild"
        reason = exc if isinstance(exc, CacheEntryInvalid) else f"unreadable or corrupt: {exc}"
        warnings.warn(f"kohonen_vae cache entry {meta_path.name} cannot be used ({reason}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None


def save_entry(prefix: str, key: str, arrays: Dict[str, np.ndarray], extra: Optional[dict] = None) -> Optional[Path]:
    """Write arrays as one cache entry (index "writing", each member atomic, index "complete" with checksums).
    Returns the index path, or None (with a warning) if the cache folder is not writable - caching is an
    optimisation, never a failure."""
    try:
        meta_path, paths = begin_entry(prefix, key, list(arrays))
        for m, a in arrays.items():
            atomic_save_npy(paths[m], a)
        return finish_entry(prefix, key, list(arrays), extra)
    except OSError as exc:
        warnings.warn(f"could not write the kohonen_vae cache in {cache_dir()} ({exc}); continuing without it. "
                      f"Set {ENV_CACHE} to a writable folder to make reloads fast.", RuntimeWarning, stacklevel=3)
        return None


def cached_arrays(prefix: str, key_parts, build: Callable[[], Dict[str, np.ndarray]],
                  use_cache: bool = True) -> Tuple[Dict[str, np.ndarray], dict]:
    """Return (arrays, cache_info): from the cache entry for ``key_parts`` if valid, else ``build()`` then save.

    ``build`` returns {member: array}; a member named ``__meta__`` (a JSON-able dict) is stored alongside.
    cache_info = {"cache": "hit" | "built" | "off", "cache_path": str | None, "fingerprint":
    :func:`content_fingerprint` of the arrays (from the index, or computed when nothing was cached)}.
    """
    if not use_cache:
        arrays = build()
        return arrays, {"cache": "off", "cache_path": None, "fingerprint": arrays_fingerprint(arrays)}
    key = hash_key(key_parts)
    hit = load_entry(prefix, key)
    if hit is not None:
        return hit, {"cache": "hit", "cache_path": str(cache_dir() / f"{prefix}-{key}.json"),
                     "fingerprint": hit.pop("__fingerprint__")}
    arrays = build()
    extra = arrays.pop("__meta__", {})
    path = save_entry(prefix, key, arrays, extra)
    fingerprint = None
    if path is not None:
        reloaded = load_entry(prefix, key)  # serve the memmaps so the built copies can be freed
        if reloaded is not None:
            arrays, fingerprint = reloaded, reloaded.pop("__fingerprint__")
    if fingerprint is None:
        fingerprint = arrays_fingerprint(arrays)
    arrays.setdefault("__meta__", extra)
    return arrays, {"cache": "built", "cache_path": None if path is None else str(path), "fingerprint": fingerprint}


# ------------------------------------------------------------------------------------------------ housekeeping
def _entry_files(d: Path, stem: str, meta: dict, legacy: bool, names_in_dir) -> list:
    """The files of entry ``stem`` that exist: members recorded in ``meta`` (for a legacy index only those whose
    ``.npy`` header matches it), the index itself, and the temp files of exactly those names."""
    files, recorded = [], [f"{stem}.json"]
    for m, rec in meta["members"].items():
        name = f"{stem}.{m}.npy"  # derived from the member name, never a path taken from the file
        recorded.append(name)
        p = d / name
        if name in names_in_dir and p.is_file() and not p.is_symlink():
            if legacy and not _legacy_member_matches(p, rec):
                continue
            files.append(p)
    patterns = [temp_file_pattern(n) for n in recorded]
    files += [d / n for n in sorted(names_in_dir) if any(pat.match(n) for pat in patterns)
              and (d / n).is_file() and not (d / n).is_symlink()]
    return files + [d / f"{stem}.json"]  # the index last: an interrupted removal leaves a listed entry


def _legacy_member_matches(p: Path, rec: dict) -> bool:
    try:
        with open(p, "rb") as f:
            shape, fortran, dtype, _ = _npy_data_offset(f)
        return not fortran and list(shape) == list(rec["shape"]) and dtype == np.dtype(rec["dtype"])
    except Exception:
        return False


def list_entries(directory: Optional[Path] = None) -> list:
    """The cache's entries, most recently used first: dicts with ``name`` (``<prefix>-<key>``), ``prefix``,
    ``state`` ("complete", "writing" or "legacy": see the module doc), ``files`` (what its index records and
    exists: members, temp files of those names, the index last), ``bytes`` and ``mtime`` (last written or
    loaded, seconds since the epoch). Only entries whose index is ours are listed: other files are not ours."""
    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return []
    names = set(os.listdir(d))
    out = []
    for index_name in names:
        m = _ENTRY_NAME.match(index_name)
        meta_path = d / index_name
        if not m or not meta_path.is_file() or meta_path.is_symlink():
            continue
        meta = _read_index(meta_path)
        legacy = _is_legacy_index(meta)
        if not (legacy or _is_ours(meta)):
            continue
        stem = index_name[: -len(".json")]
        files = _entry_files(d, stem, meta, legacy, names)
        stats = []
        for p in files:
            try:
                stats.append(p.stat())
            except FileNotFoundError:
                pass
        if not stats:
            continue
        state = "legacy" if legacy else ("complete" if meta.get("state") == "complete" else "writing")
        out.append({"name": stem, "prefix": m["prefix"], "state": state, "files": files,
                    "bytes": sum(st.st_size for st in stats), "mtime": max(st.st_mtime for st in stats)})
    return sorted(out, key=lambda e: -e["mtime"])


def remove_entries(older_than_days: Optional[float] = None, directory: Optional[Path] = None,
                   now: Optional[float] = None) -> Tuple[int, int]:
    """Delete cache entries: all of them, or those not written or used for ``older_than_days``; returns
    (files removed, bytes freed). Only the files an entry's index records are deleted (see :func:`list_entries`).
    An entry still being written (state "writing") is spared until none of its files changed for an hour (or
    ``older_than_days``, if longer): it may be in progress in another process."""
    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return 0, 0
    now = time.time() if now is None else now
    cutoff = None if older_than_days is None else now - float(older_than_days) * 86400
    removed = freed = 0
    for entry in list_entries(d):
        limit = cutoff
        if entry["state"] == "writing":
            limit = now - IN_PROGRESS_GRACE_S if cutoff is None else min(cutoff, now - IN_PROGRESS_GRACE_S)
        if limit is not None and entry["mtime"] >= limit:
            continue
        for p in entry["files"]:
            try:
                size = p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                continue
            removed += 1
            freed += size
    return removed, freed


# ------------------------------------------------------------------------------------------------ measurement
def measure_hash_cost(path, repeats: int = 3) -> dict:
    """Best-of-``repeats`` seconds to read ``path``, to sha256 all of it, and to take its :func:`sampled_digest`
    (the numbers behind :data:`FULL_HASH_MAX_BYTES`; see the module doc)."""
    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def read():
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass

    def full():
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")

    return {"bytes": os.path.getsize(path), "read_s": best(read), "sha256_s": best(full),
            "sampled_s": best(lambda: sampled_digest(path))}

