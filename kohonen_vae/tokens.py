"""From images to tokens and back: ``encode_dataset`` writes a token file, ``decode_tokens`` turns it into PNGs.

Token file (``.npz``: an uncompressed zip of ``.npy`` members, ``numpy.load(path)`` reads it, no pickle)::

    indices_<level>  (N, h, w) per level, level order of the model (VQ-VAE: bottom; VQ-VAE-2: top, bottom);
                     the smallest unsigned dtype that holds K - 1: uint8 (K <= 256), uint16 (K <= 65,536),
                     uint32, uint64
    ids              (N,) str: the images in order; a folder dataset's file paths relative to the dataset
                     folder (``train/cat/001.jpg``), else ``train/<i>`` / ``test/<i>``, the position i in the
                     source training or test set (val images come from the training set)
    source_index     (N,) int64: that position i
    meta             0-d str, JSON: format, config_hash, weights_hash (see :mod:`kohonen_vae.export`), the
                     tokenizer (run or export, checkpoint, step), the data (name, split, image size), the
                     image shape, per level name / K / grid / stride / shape / dtype, model config, normaliser

Writing streams: each level's indices go batch by batch into a memory-mapped temporary ``.npy`` beside the
output, so memory stays one batch whatever N; at the end the members are copied into a temporary zip that
is fsync'ed and renamed over the output (peak disk: twice the token bytes). A killed encode never leaves a
partial token file: only hidden temporaries ``.NAME.PID-XXXXXXXX.tmp``, removed on Ctrl-C or error, and
otherwise by the next encode into the same folder once their process has ended.

:func:`load_tokens` memory-maps the level arrays of an uncompressed token file, so decoding a token file
larger than memory works too. Decoding writes the PNGs into a hidden temporary folder and renames it to
the output folder at the end: the output folder appears complete or not at all.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import shutil
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .export import load_tokenizer
from .errors import ConfigError
from .fileio import fsync_dir

TOKENS_FORMAT = "kohonen-vae-tokens/1"
DECODED_FORMAT = "kohonen-vae-decoded/1"
SPLITS = ("train", "val", "test", "all")
MANIFEST = "decoded.json"
CONTACT_SHEET = "contact_sheet.png"
CONTACT_SHEET_IMAGES = 64
_PARTIAL_MARKER = ".kohonen-vae-partial"


def token_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned integer dtype holding the indices ``0 .. K - 1``: uint8 for K <= 2^8, uint16 for
    K <= 2^16, uint32 for K <= 2^32, else uint64."""
    k = int(codebook_size)
    if k < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if k - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"codebook_size {k} does not fit 64 bits")


# -- temporary files that a killed process may leave ----------------------------------------------------------
def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


def _remove_dead_temporaries(folder: Path, name: str) -> None:
    """Remove ``.NAME.PID-XXXX.tmp`` files/folders of ``name`` in ``folder`` whose process (on this host) has
    ended: what a killed encode/decode left. Folders are removed only if they carry our partial marker."""
    pattern = re.compile(r"^\." + re.escape(name) + r"\.(\d+)-[A-Za-z0-9_]+\.tmp$")
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if not m or _process_alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                if (p / _PARTIAL_MARKER).is_file():
                    shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours to signal
        return True
    return True


# -- the images to encode -------------------------------------------------------------------------------------------
class _Images:
    """Rows of one or more uint8 ``(n_i, C, H, W)`` tensors in a given order; :meth:`batch` gathers ``[s, e)``."""

    def __init__(self, parts, order=None):
        self.parts = parts
        # output position -> (which tensor, which row of it)
        self.part = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)])
        self.row = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts])
        if order is not None:
            self.part, self.row = self.part[order], self.row[order]

    def __len__(self) -> int:
        return len(self.part)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        part, row = self.part[start:stop], self.row[start:stop]
        if (part == part[0]).all() and (np.diff(row) == 1).all():
            return self.parts[int(part[0])][int(row[0]):int(row[-1]) + 1]  # contiguous: a view, no copy
        out = torch.empty((stop - start,) + tuple(self.parts[0].shape[1:]), dtype=torch.uint8)
        for i, t in enumerate(self.parts):
            sel = np.flatnonzero(part == i)
            if len(sel):
                out[torch.from_numpy(sel)] = t.index_select(0, torch.from_numpy(row[sel]))
        return out


def _folder_ids(info: dict, which: str, count: int) -> list[str]:
    """Paths (relative to the dataset folder) of the decoded images of a folder dataset's training
    (``which="train"``) or held-out source set, in the data layer's order (sorted, unreadable files skipped)."""
    from .data.folder import list_images, split_subfolders

    root = Path(info["source"])
    sub = split_subfolders(root)
    folder = root if sub is None else (sub[0] if which == "train" else sub[1])
    skipped = set((info.get("train_info" if which == "train" else "test_info") or {}).get("skipped", []))
    files = [p for p in list_images(folder) if p.relative_to(folder).as_posix() not in skipped]
    if len(files) != count:
        raise ConfigError(f"{folder} now holds {len(files)} decodable images but {count} were loaded; the folder "
                          "changed while it was read: run the command again")
    return [p.relative_to(root).as_posix() for p in files]


def _images_to_encode(tok, data, split: str, data_dir):
    """``(_Images, ids, source_index, data record)`` of ``split`` of dataset ``data`` (default: the run's),
    loaded at the run's image size with the run's split fraction and seed."""
    from .data import splits_from_config

    run = tok.data or {}
    name = data or run.get("name")
    if not name:
        raise ConfigError(f"{tok.source} does not record its dataset; pass --data NAME or folder:PATH")
    same = name == run.get("name")
    size = run.get("image_size")
    if size is None and tok.image_shape and tok.image_shape[-1] == tok.image_shape[-2]:
        size = int(tok.image_shape[-1])  # e.g. a CIFAR-10 run encoding a folder: squash it to 32 x 32
    cfg = {"name": name, "image_size": size, "val_fraction": run.get("val_fraction", 0.2),
           "split_seed": run.get("split_seed", 0),
           "data_dir": data_dir if data_dir is not None else (run.get("data_dir") if same else None)}
    try:
        splits = splits_from_config(cfg, download=False)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot load dataset {name!r}: {e}") from None
    folder = name.startswith("folder:")
    if split == "test" and splits.test is None:
        raise ConfigError(f"dataset {name!r} has no test set (a folder needs train/ and test/ or val/ subfolders); "
                          f"use --split train, val or all")
    chosen = {"train": [splits.train], "val": [splits.val], "test": [splits.test],
              "all": [splits.train, splits.val] + ([splits.test] if splits.test is not None else [])}[split]
    n_train = len(splits.train) + len(splits.val)
    train_names = _folder_ids(splits.info, "train", n_train) if folder and split != "test" else None
    ids, index = [], []
    for s in chosen:
        src = "test" if s is splits.test else "train"
        pos = s.indices.numpy() if s.indices is not None else np.arange(len(s))
        if folder:
            names = train_names if src == "train" else _folder_ids(splits.info, "test", len(s))
            ids += [names[i] for i in pos]
        else:
            ids += [f"{src}/{i}" for i in pos]
        index.append(pos.astype(np.int64))
    index = np.concatenate(index)
    order = None
    if split == "all":  # the training source in its own order (train and val merged back), then test
        order = np.concatenate([np.argsort(index[:n_train], kind="stable"), np.arange(n_train, len(index))])
        index, ids = index[order], [ids[i] for i in order]
    record = {"name": name, "split": split, "image_size": size, "val_fraction": cfg["val_fraction"],
              "split_seed": cfg["split_seed"]}
    return _Images([s.images for s in chosen], order), ids, index, record


# -- encode ---------------------------------------------------------------------------------------------------------
def _check_output_file(out: Path) -> None:
    if out.suffix != ".npz":
        raise ConfigError(f"the token file must end in .npz, got {out}")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give a file name ending in .npz")
    if out.exists():
        try:
            load_tokens(out)
        except ConfigError:
            raise ConfigError(f"{out} exists and is not a kohonen-vae token file; it is left alone: choose another "
                              "--out") from None


def encode_dataset(run_dir, data: str | None = None, split: str = "train", out="tokens.npz",
                   checkpoint: str = "best", batch_size: int = 256, data_dir=None, device=None,
                   progress: bool = True) -> dict:
    """Encode ``split`` (train | val | test | all) of dataset ``data`` (a name or ``folder:PATH``; default the
    run's own) with the tokenizer in ``run_dir`` (a run directory and its ``checkpoint``, or an export
    folder) and write the token file ``out`` (module docstring), ``batch_size`` images at a time.

    ``all`` is the whole training source in its file order (train and val merged back) followed by the
    test set. Images are loaded at the run's image size and normalised with the run's normaliser. An
    existing ``out`` is replaced only if it is a token file. Returns a summary: path, count, levels,
    seconds (the encode loop) and images_per_s."""
    out = Path(out)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    _check_output_file(out)
    tok = load_tokenizer(run_dir, checkpoint, device=device)
    images, ids, source_index, record = _images_to_encode(tok, data, split, data_dir)
    n = len(images)
    if n == 0:
        raise ConfigError(f"split {split!r} of {record['name']!r} holds no images")
    image_shape = list(images.parts[0].shape[1:])
    model = tok.model
    if image_shape[0] != model.config["in_channels"]:
        raise ConfigError(f"{record['name']} images have {image_shape[0]} channel(s) but the model takes "
                          f"{model.config['in_channels']}")
    try:
        levels = tok.levels(image_shape)
    except ValueError as e:
        raise ConfigError(f"{record['name']} images of {image_shape[1]}x{image_shape[2]} do not fit the model: "
                          f"{e}") from None
    for lv in levels:
        lv["dtype"] = token_dtype(lv["codebook_size"]).name
        lv["member"] = f"indices_{lv['name']}"
    meta = {"format": TOKENS_FORMAT, "config_hash": tok.config_hash, "weights_hash": tok.weights_hash,
            "tokenizer": {"kind": tok.kind, "path": str(Path(run_dir).resolve()), "checkpoint": tok.checkpoint,
                          "step": tok.step},
            "data": record, "count": n, "image_shape": image_shape, "levels": levels, "model": model.config,
            "normalizer": tok.normalizer.to_dict(), "kohonen_vae_version": _version(),
            "created": datetime.datetime.now().isoformat(timespec="seconds")}

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(out.parent, out.name)
    temps = []
    try:
        arrays = []
        for lv in levels:
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(out.name), suffix=".tmp", dir=out.parent)
            os.close(fd)
            temps.append(tmp)
            arrays.append(np.lib.format.open_memmap(tmp, mode="w+", dtype=lv["dtype"], shape=(n, *lv["shape"])))
        from tqdm.auto import tqdm

        device = next(model.parameters()).device
        t0 = time.perf_counter()
        with tqdm(total=n, unit="img", desc=f"encoding {record['name']}/{split}", disable=not progress) as bar:
            for start in range(0, n, int(batch_size)):
                stop = min(start + int(batch_size), n)
                x = tok.normalizer.normalize(images.batch(start, stop).to(device))
                for arr, idx in zip(arrays, model.encode(x)):
                    arr[start:stop] = idx.cpu().numpy()
                bar.update(stop - start)
        seconds = time.perf_counter() - t0
        for arr in arrays:
            arr.flush()
        del arrays
        fd, zip_tmp = tempfile.mkstemp(prefix=_temp_prefix(out.name), suffix=".tmp", dir=out.parent)
        os.close(fd)
        temps.append(zip_tmp)
        with open(zip_tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for lv, tmp in zip(levels, temps):
                    zf.write(tmp, arcname=lv["member"] + ".npy")
                _write_member(zf, "ids", np.array(ids, dtype=str) if ids else np.zeros(0, dtype="<U1"))
                _write_member(zf, "source_index", np.asarray(source_index, dtype=np.int64))
                _write_member(zf, "meta", np.array(json.dumps(meta)))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(zip_tmp, 0o666 & ~_umask())
        os.replace(zip_tmp, out)
        temps.remove(zip_tmp)
        fsync_dir(out.parent)
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return {"path": str(out), "count": n, "levels": levels, "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else float("inf"), "tokenizer": tok.describe(),
            "data": record}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _version() -> str:
    from . import __version__

    return __version__


def _write_member(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    zf.writestr(name + ".npy", buf.getvalue())


# -- read -------------------------------------------------------------------------------------------------------------
@dataclass
class TokenFile:
    """A token file: ``indices`` (one ``(N, h, w)`` unsigned array per level, memory-mapped when possible),
    ``ids`` ((N,) str), ``source_index`` ((N,) int64) and ``meta`` (the JSON record, module docstring)."""

    path: Path
    meta: dict
    indices: list
    ids: np.ndarray
    source_index: np.ndarray

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def level_names(self) -> list[str]:
        return [lv["name"] for lv in self.meta["levels"]]


def _member_memmap(path: Path, zf: zipfile.ZipFile, member: str):
    """A read-only memmap of an uncompressed ``.npy`` member of a zip, or None if it cannot be mapped."""
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            return None
        shape, fortran, dtype = reader(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {member} holds Python objects (pickles), which token files never contain")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


def load_tokens(path, mmap: bool = True) -> TokenFile:
    """Read a token file written by :func:`encode_dataset` (``numpy.load`` with ``allow_pickle=False``; the
    level arrays memory-mapped when ``mmap`` and the file is uncompressed). Raises :class:`ConfigError` for
    a missing file, another kind of file, or members that do not agree with each other."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no token file at {path}")

    def bad(why):
        return ConfigError(f"{path} is not a kohonen-vae token file ({why}); write one with kohonen-vae encode")

    if not zipfile.is_zipfile(path):
        raise bad("not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            members = set(z.files)
            if "meta" not in members:
                raise bad("no meta member")
            meta = json.loads(str(z["meta"]))
            if not isinstance(meta, dict) or meta.get("format") != TOKENS_FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else None
                raise bad(f"format {found!r}, expected {TOKENS_FORMAT!r}")
            ids, source_index = z["ids"], z["source_index"]
            wanted = [lv["member"] for lv in meta["levels"]]
            if not set(wanted) <= members:
                raise bad(f"missing level arrays {sorted(set(wanted) - members)}")
            indices = []
            with zipfile.ZipFile(path) as zf:
                for m in wanted:
                    arr = _member_memmap(path, zf, m + ".npy") if mmap else None
                    indices.append(arr if arr is not None else z[m])
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    n = int(meta["count"])
    if ids.shape != (n,) or source_index.shape != (n,):
        raise bad(f"{n} images in meta but ids {ids.shape} and source_index {source_index.shape}")
    for lv, arr in zip(meta["levels"], indices):
        if arr.shape != (n, *lv["shape"]) or arr.dtype.kind != "u":
            raise bad(f"level {lv['name']!r} is {arr.dtype} {arr.shape}, expected unsigned integers of shape "
                      f"{(n, *lv['shape'])}")
    return TokenFile(path=path, meta=meta, indices=indices, ids=ids, source_index=source_index)


def check_compatible(tokens: TokenFile, tok) -> None:
    """Raise :class:`ConfigError` unless ``tokens`` were made by the tokenizer ``tok`` (same config hash, same
    levels with the same K and grids, same weights hash); the message names both sides of each difference."""
    meta, ours = tokens.meta, tok.levels()
    problems = []
    if meta["config_hash"] != tok.config_hash:
        problems.append(f"config hash {meta['config_hash'][:12]} (token file) vs {tok.config_hash[:12]} (tokenizer)")
    names = [lv["name"] for lv in meta["levels"]]
    if names != [lv["name"] for lv in ours]:
        problems.append(f"levels {names} vs {[lv['name'] for lv in ours]}")
    else:
        for a, b in zip(meta["levels"], ours):
            if a["codebook_size"] != b["codebook_size"]:
                problems.append(f"K of level {a['name']!r} {a['codebook_size']} vs {b['codebook_size']}")
            elif a["grid"]["shape"] != b["grid"]["shape"]:
                problems.append(f"grid of level {a['name']!r} {a['grid']['shape']} vs {b['grid']['shape']}")
    if meta["weights_hash"] != tok.weights_hash:
        problems.append(f"weights hash {meta['weights_hash'][:12]} (token file) vs {tok.weights_hash[:12]} (tokenizer)")
    if problems:
        made = meta.get("tokenizer", {})
        raise ConfigError(f"{tokens.path} was not made by {tok.describe()}: " + "; ".join(problems) + ". It was "
                          f"encoded by {made.get('path')} (checkpoint {made.get('checkpoint')}, step "
                          f"{made.get('step')}); decode it with that tokenizer")


# -- decode -------------------------------------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor, normalizer) -> torch.Tensor:
    """Normalised float images ``(B, C, H, W)`` -> uint8 pixels: ``round(255 * clamp(y * std + mean, 0, 1))``."""
    return normalizer.denormalize(images).mul_(255.0).round_().to(torch.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 ``(C, H, W)`` (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    hwc = np.ascontiguousarray(pixels.transpose(1, 2, 0))
    img = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_contact_sheet(pixels: np.ndarray, columns: int = 8, gap: int = 2) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` -> one uint8 ``(C, rows * (H + gap) - gap, columns' * (W + gap) - gap)`` mosaic,
    row by row, on a white background."""
    n, c, h, w = pixels.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    sheet = np.full((c, rows * (h + gap) - gap, cols * (w + gap) - gap), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        sheet[:, r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = pixels[i]
    return sheet


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _sync_files(folder: Path) -> None:
    """Make the files of ``folder`` durable before it is renamed into place: one ``os.sync()`` where there is
    one (POSIX), as an fsync per file costs ~3 ms, i.e. more than encoding and decoding a CIFAR-10 image."""
    if hasattr(os, "sync"):
        os.sync()
        return
    for p in folder.iterdir():  # pragma: no cover - Windows
        with open(p, "rb+") as f:
            os.fsync(f.fileno())


def decode_tokens(run_dir, tokens_path, out_dir, contact_sheet: bool = True, checkpoint: str | None = None,
                  batch_size: int = 256, device=None, progress: bool = True) -> dict:
    """Decode a token file into PNGs ``out_dir/<i>.png`` (i = position in the file, zero-padded), a manifest
    ``decoded.json`` (ids in order, hashes) and, if ``contact_sheet``, ``contact_sheet.png`` of the first 64.

    ``run_dir``: a run directory (``checkpoint`` defaults to the one recorded in the token file) or an export
    folder. Tokens made by another tokenizer (config hash, K, grid or weights) are refused with a message
    naming both. ``out_dir`` must be new or empty; it is written as a hidden temporary folder renamed into
    place at the end. Returns a summary (out, count, seconds, images_per_s)."""
    tokens = load_tokens(tokens_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; decode into a new or empty folder "
                          "(nothing there is overwritten)")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    tok = load_tokenizer(run_dir, checkpoint or tokens.meta.get("tokenizer", {}).get("checkpoint") or "best",
                         device=device)
    check_compatible(tokens, tok)
    n = len(tokens)
    width = max(5, len(str(n - 1)))
    files = [f"{i:0{width}d}.png" for i in range(n)]
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        (tmp / _PARTIAL_MARKER).touch()
        from tqdm.auto import tqdm

        sheet, t0 = [], time.perf_counter()
        with tqdm(total=n, unit="img", desc=f"decoding {tokens.path.name}", disable=not progress) as bar:
            for start in range(0, n, int(batch_size)):
                stop = min(start + int(batch_size), n)
                try:
                    with torch.no_grad():
                        recon = tok.model.decode_indices([arr[start:stop] for arr in tokens.indices])
                except ValueError as e:  # an index >= K in a damaged file
                    raise ConfigError(f"{tokens.path}: images {start}..{stop - 1}: {e}") from None
                pixels = to_uint8(recon, tok.normalizer).cpu().numpy()
                for i, p in enumerate(pixels):
                    _write_file(tmp / files[start + i], _png_bytes(p))
                if contact_sheet and sum(len(s) for s in sheet) < CONTACT_SHEET_IMAGES:
                    sheet.append(pixels[:CONTACT_SHEET_IMAGES - sum(len(s) for s in sheet)])
                bar.update(stop - start)
        seconds = time.perf_counter() - t0
        if contact_sheet:
            _write_file(tmp / CONTACT_SHEET, _png_bytes(make_contact_sheet(np.concatenate(sheet))))
        manifest = {"format": DECODED_FORMAT, "tokens": str(tokens.path.resolve()), "count": n,
                    "config_hash": tok.config_hash, "weights_hash": tok.weights_hash, "tokenizer": tok.describe(),
                    "contact_sheet": CONTACT_SHEET if contact_sheet else None,
                    "images": [{"file": f, "id": str(i)} for f, i in zip(files, tokens.ids)]}
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        (tmp / _PARTIAL_MARKER).unlink()
        os.chmod(tmp, 0o777 & ~_umask())
        _sync_files(tmp)
        fsync_dir(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename needs the name free on every platform
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "count": n, "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else float("inf")}


# -- command line ---------------------------------------------------------------------------------------------------
def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    """``kohonen-vae encode RUN_DIR [--data NAME|folder:PATH] [--split ...] [--checkpoint ...] --out tokens.npz``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (kohonen-vae train) or an export folder "
                                                      "(kohonen-vae export)")
    p.add_argument("--data", help="dataset: cifar10, utkface64, mnist, sample or folder:PATH (default: the run's)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="train / val (the run's fixed-seed split of the training set), test, or all (the training "
                        "set in file order, then test); default: train")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    p.add_argument("--out", required=True, help="token file to write (.npz)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--data-dir", help="where the dataset lives (default: the run's data_dir for its own dataset, "
                                      "else $KOHONEN_VAE_DATA or the usual places)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: CUDA if available)")


def run_encode(args) -> int:
    """Run ``kohonen-vae encode``; prints the file, the levels and the throughput."""
    s = encode_dataset(args.run_dir, data=args.data, split=args.split, out=args.out, checkpoint=args.checkpoint,
                       batch_size=args.batch_size, data_dir=args.data_dir, device=args.device)
    levels = ", ".join(f"{lv['name']} {lv['shape'][0]}x{lv['shape'][1]} of K = {lv['codebook_size']:,} ({lv['dtype']})"
                       for lv in s["levels"])
    print(f"encoded {s['count']:,} images of {s['data']['name']}/{s['data']['split']} with {s['tokenizer']}: {levels}")
    print(f"{s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s -> {s['path']}")
    return 0


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    """``kohonen-vae decode RUN_DIR tokens.npz --out DIR [--no-contact-sheet]``."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory or export folder that encoded the tokens")
    p.add_argument("tokens", metavar="TOKENS", help="token file written by kohonen-vae encode")
    p.add_argument("--out", required=True, help="new or empty folder for the PNGs")
    p.add_argument("--no-contact-sheet", action="store_true", help="skip contact_sheet.png (the first 64 images)")
    p.add_argument("--checkpoint", choices=("best", "last"), default=None,
                   help="which checkpoint of RUN_DIR (default: the one recorded in the token file)")
    p.add_argument("--batch-size", type=int, default=256, help="images per decoder pass (default: 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: CUDA if available)")


def run_decode(args) -> int:
    """Run ``kohonen-vae decode``; prints where the images went and the throughput."""
    s = decode_tokens(args.run_dir, args.tokens, args.out, contact_sheet=not args.no_contact_sheet,
                      checkpoint=args.checkpoint, batch_size=args.batch_size, device=args.device)
    print(f"decoded {s['count']:,} images in {s['seconds']:.1f} s ({s['images_per_s']:.0f} images/s) -> {s['out']}/ "
          f"({MANIFEST}" + ("" if args.no_contact_sheet else f", {CONTACT_SHEET}") + ")")
    return 0


#: ``cli.SUBCOMMANDS`` entries
SUBCOMMANDS = {
    "encode": ("encode a dataset split into a token file (.npz) with a trained run or export",
               add_encode_arguments, run_encode),
    "decode": ("decode a token file into PNG images (and a contact sheet)", add_decode_arguments, run_decode),
}

__all__ = ["encode_dataset", "decode_tokens", "load_tokens", "TokenFile", "check_compatible", "token_dtype",
           "to_uint8", "make_contact_sheet", "TOKENS_FORMAT", "SPLITS", "add_encode_arguments", "run_encode",
           "add_decode_arguments", "run_decode", "SUBCOMMANDS"]
