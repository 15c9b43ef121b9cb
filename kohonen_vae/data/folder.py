"""Image-folder datasets (``folder:PATH``): any tree of png/jpg/jpeg/bmp/webp files, decoded once in parallel,
converted to RGB, squashed to ``size x size`` (aspect ratio not kept, as the paper does for ImageNet) and cached as a
uint8 ``.npy`` (N, 3, size, size) keyed by the path, the file list (with sizes and mtimes) and the size.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..fileio import atomic_write_bytes
from . import cache

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RESAMPLE = "BICUBIC"  # Pillow's resize filters antialias when downscaling


def list_images(folder: Path) -> List[Path]:
    """All image files under ``folder`` (recursive, extension case-insensitive), sorted by relative path."""
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def split_subfolders(folder: Path) -> Optional[Tuple[Path, Path]]:
    """(train dir, held-out dir) if ``folder`` has ``train/`` and ``test/`` or ``val/`` (``test/`` preferred)."""
    train = folder / "train"
    if not train.is_dir():
        return None
    for held in ("test", "val"):
        if (folder / held).is_dir():
            return train, folder / held
    return None


def decode_image(args) -> Optional[np.ndarray]:
    """(path, size) -> uint8 (3, size, size) RGB array, or None if the file cannot be decoded."""
    path, size = args
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), getattr(Image.Resampling, RESAMPLE))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except Exception:  # unreadable / truncated / not an image: the caller counts and reports these
        return None


def _decode_files(paths: List[Path], size: int, out: np.ndarray, desc: str) -> np.ndarray:
    """Decode ``paths`` into ``out[i]`` (N, 3, size, size) using os.cpu_count() processes; returns a bool mask of
    the files that decoded."""
    from tqdm.auto import tqdm

    ok = np.zeros(len(paths), dtype=bool)
    jobs = [(str(p), size) for p in paths]
    workers = min(os.cpu_count() or 1, len(paths))
    with tqdm(total=len(paths), desc=desc, unit="img") as bar:
        if workers > 1:
            with multiprocessing.get_context().Pool(workers) as pool:
                for i, img in enumerate(pool.imap(decode_image, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))):
                    if img is not None:
                        out[i] = img
                        ok[i] = True
                    bar.update(1)
        else:
            for i, job in enumerate(jobs):
                img = decode_image(job)
                if img is not None:
                    out[i] = img
                    ok[i] = True
                bar.update(1)
    return ok


def load_image_folder(folder: Path, size: int, label: str) -> Tuple[np.ndarray, dict]:
    """Decoded images of every file under ``folder`` as uint8 (N, 3, size, size) (a memmap when cached), and info.

    Files that fail to decode are skipped with a warning that counts them. No image file, or none decodable,
    raises (:class:`~kohonen_vae.data.DatasetNotFoundError` resp. ValueError).
    """
    from .types import DatasetNotFoundError

    folder = Path(folder).resolve()
    files = list_images(folder)
    if not files:
        raise DatasetNotFoundError(f"dataset 'folder:{folder}': no image files ({', '.join(IMAGE_EXTENSIONS)}, any "
                                   f"case) found under {folder}. Point folder:PATH at a folder of images, optionally "
                                   "with train/ and test/ (or val/) subfolders.")
    fingerprint = []
    for p in files:
        st = p.stat()
        fingerprint.append([p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns])
    key_parts = {"kind": "folder", "path": str(folder), "files": fingerprint, "size": int(size), "resample": RESAMPLE}
    key = cache.hash_key(key_parts)
    hit = cache.load_entry("folder", key)
    if hit is not None:
        meta = hit.get("__meta__", {})
        return hit["x"], {"cache": "hit", "cache_path": str(cache.cache_dir() / f"folder-{key}.json"),
                          "files": len(files), "skipped": meta.get("skipped", [])}

    meta_path, paths = cache.entry_paths("folder", key, ["x"])
    tmp_files: List[str] = []
    try:
        # Decode straight into a temp .npy memmap in the cache folder, so a large tree never has to fit in RAM.
        try:
            cache.cache_dir().mkdir(parents=True, exist_ok=True)
            buf = _temp_memmap(tmp_files, (len(files), 3, size, size))
        except OSError as exc:
            warnings.warn(f"could not write the kohonen_vae cache in {cache.cache_dir()} ({exc}); decoding into "
                          f"memory. Set {cache.ENV_CACHE} to a writable folder.", RuntimeWarning, stacklevel=3)
            buf = np.empty((len(files), 3, size, size), dtype=np.uint8)
        ok = _decode_files(files, size, buf, desc=f"decoding {label}")
        skipped = [files[i].relative_to(folder).as_posix() for i in np.flatnonzero(~ok)]
        if skipped:
            shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            warnings.warn(f"folder:{folder}: skipped {len(skipped)} unreadable image file(s) of {len(files)} "
                          f"({shown})", RuntimeWarning, stacklevel=3)
        if not ok.any():
            raise ValueError(f"dataset 'folder:{folder}': none of the {len(files)} image files could be decoded "
                             f"({', '.join(skipped[:5])}...); check that they are valid images")
        if not ok.all():  # compact the decodable images into a file of the right length
            keep = np.flatnonzero(ok)
            dst = _temp_memmap(tmp_files, (len(keep), 3, size, size)) if tmp_files else \
                np.empty((len(keep), 3, size, size), dtype=np.uint8)
            for j in range(0, len(keep), 1024):
                dst[j:j + 1024] = buf[keep[j:j + 1024]]
            buf = dst
        info = {"cache": "off", "cache_path": None, "files": len(files), "skipped": skipped}
        if not tmp_files:
            return buf, info
        buf.flush()
        del buf
        with open(tmp_files[-1], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_files[-1], paths["x"])
        tmp_files.pop()
        atomic_write_bytes(meta_path, json.dumps({
            "members": {"x": {"shape": [int(ok.sum()), 3, size, size], "dtype": np.dtype(np.uint8).str}},
            "extra": {"skipped": skipped}}, indent=1).encode())
    finally:
        for t in tmp_files:
            try:
                os.unlink(t)
            except OSError:
                pass
    reloaded = cache.load_entry("folder", key)
    if reloaded is None:
        raise RuntimeError(f"the freshly written cache entry {meta_path} could not be read back")
    info.update(cache="built", cache_path=str(meta_path))
    return reloaded["x"], info


def _temp_memmap(registry: List[str], shape: tuple) -> np.ndarray:
    """A writable uint8 .npy memmap of ``shape`` in a new temp file of the cache folder (path appended to registry)."""
    fd, tmp = tempfile.mkstemp(dir=cache.cache_dir(), prefix=".folder-", suffix=".npy.tmp")
    os.close(fd)
    registry.append(tmp)
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
