"""Image-folder datasets (``folder:PATH``): any tree of png/jpg/jpeg/bmp/webp files, decoded once in parallel,
converted to RGB, squashed to ``size x size`` (aspect ratio not kept, as the paper does for ImageNet) and cached as a
uint8 ``.npy`` (N, 3, size, size) keyed by the path, the file list (with sizes and mtimes) and the size.

Files. The tree is walked following symbolic links, but each real directory is entered once (a link loop
ends) and each real file is taken once (a second link to it, or a second path to it through a linked folder,
is dropped): the first path in sorted relative-path order is kept. Hidden names (``.*``) are skipped.

Size. ``size`` is ``data.image_size`` when given; when it is not, it is the images' own size if they all share
one square size (a folder of 28 x 28 digits stays 28 x 28, never resampled); otherwise
:func:`native_size` raises one :class:`~kohonen_vae.errors.ConfigError` asking for ``data.image_size`` and
naming the sizes found. It is settled from the files' headers before anything is decoded.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import cache

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
RESAMPLE = "BICUBIC"  # Pillow's resize filters antialias when downscaling


def _scan(folder: Path) -> List[Tuple[str, str, Path]]:
    """(relative posix path, real path, path) of every image file under ``folder``, each real directory entered
    once (preorder, children sorted: the first alias of a directory in path order wins)."""
    out: List[Tuple[str, str, Path]] = []
    seen_dirs = set()
    stack = [(str(folder), "")]
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue  # a second way into a directory already walked (an alias or a loop)
            seen_dirs.add((st.st_dev, st.st_ino))
            real_dir = os.path.realpath(path)
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if not rel:
                raise  # the dataset folder itself must be readable
            continue  # an unreadable subfolder is skipped, as os.walk does
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    subdirs.append(e)
                elif e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                    real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_dir, e.name)
                    out.append((rel + e.name, real, Path(e.path)))
            except OSError:
                continue
        for e in reversed(subdirs):  # popped in sorted order
            stack.append((e.path, rel + e.name + "/"))
    return out


def list_images(folder: Path) -> List[Path]:
    """All image files under ``folder`` (recursive, extension case-insensitive), sorted by relative path, each real
    file once and each real directory entered once, following symbolic links (see the module doc)."""
    found = sorted(_scan(Path(folder)), key=lambda t: t[0])
    seen, out = set(), []
    for _, real, path in found:
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def split_subfolders(folder: Path) -> Optional[Tuple[Path, Path]]:
    """(train dir, held-out dir) if ``folder`` has ``train/`` and ``test/`` or ``val/`` (``test/`` preferred)."""
    train = folder / "train"
    if not train.is_dir():
        return None
    for held in ("test", "val"):
        if (folder / held).is_dir():
            return train, folder / held
    return None


def shared_files(train: Sequence[Path], held: Sequence[Path]) -> List[Path]:
    """The files of ``held`` that are the same file (device and inode, i.e. also via a link) as one of ``train``."""
    ids = set()
    for p in train:
        st = os.stat(p)
        ids.add((st.st_dev, st.st_ino))
    out = []
    for p in held:
        st = os.stat(p)
        if (st.st_dev, st.st_ino) in ids:
            out.append(p)
    return out


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


def image_header_size(path) -> Optional[Tuple[int, int]]:
    """(width, height) from the image file's header (nothing is decoded), or None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return tuple(int(v) for v in im.size)
    except Exception:
        return None


def _map_files(fn: Callable, jobs: list, desc: str, unit: str = "img"):
    """Yield ``fn(job)`` for each job in order, in os.cpu_count() processes when there are many, with a bar."""
    from tqdm.auto import tqdm

    workers = min(os.cpu_count() or 1, len(jobs))
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=len(jobs) < 2) as bar:
        if workers > 1 and len(jobs) >= 64:
            with multiprocessing.get_context().Pool(workers) as pool:
                for r in pool.imap(fn, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers)))):
                    yield r
                    bar.update(1)
        else:
            for job in jobs:
                yield fn(job)
                bar.update(1)


def native_size(files: Sequence[Path], where: str) -> int:
    """The side S of the images when every readable one is S x S (from their headers); else ConfigError asking
    for ``data.image_size`` and naming the sizes found (``where`` names the dataset in the message)."""
    from ..errors import ConfigError
    from .types import DatasetCorruptError

    sizes = Counter(s for s in _map_files(image_header_size, [str(p) for p in files], "reading image sizes")
                    if s is not None)
    if not sizes:
        raise DatasetCorruptError(f"dataset '{where}': none of the {len(files)} image files could be read "
                                  f"({', '.join(p.name for p in files[:5])}{', ...' if len(files) > 5 else ''}); "
                                  "check that they are valid images")
    fix = ("set data.image_size = S in the config (image_size=S in load_splits) to squash every image to "
           "S x S (aspect ratio not kept)")
    if len(sizes) == 1:
        (w, h), n = next(iter(sizes.items()))
        if w == h:
            return w
        raise ConfigError(f"dataset '{where}': all {n} images are {w}x{h}, not square; the models need square "
                          f"images: {fix}")
    ranked = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{w}x{h} ({n} file{'s' if n > 1 else ''})" for (w, h), n in ranked[:4])
    raise ConfigError(f"dataset '{where}': the images have {len(sizes)} different sizes ({shown}"
                      f"{', ...' if len(ranked) > 4 else ''}), so there is no native size to keep: {fix}")


def _decode_files(paths: List[Path], size: int, out: np.ndarray, desc: str) -> np.ndarray:
    """Decode ``paths`` into ``out[i]`` (N, 3, size, size) using os.cpu_count() processes; returns a bool mask of
    the files that decoded."""
    ok = np.zeros(len(paths), dtype=bool)
    for i, img in enumerate(_map_files(decode_image, [(str(p), size) for p in paths], desc)):
        if img is not None:
            out[i] = img
            ok[i] = True
    return ok


def folder_cache_key(folder: Path, files: Sequence[Path], size) -> str:
    """The cache key of the decoded ``files`` of ``folder`` at ``size`` (an int, or ``"native"``: the images' own
    size): the resolved folder, every file's relative path, size and mtime, the size and the resampling filter."""
    folder = Path(folder).resolve()
    fingerprint = []
    for p in files:
        st = p.stat()
        fingerprint.append([Path(os.path.relpath(p, folder)).as_posix(), st.st_size, st.st_mtime_ns])
    key_parts = {"kind": "folder", "path": str(folder), "files": fingerprint, "size": size, "resample": RESAMPLE}
    return cache.hash_key(key_parts)


def cached_image_folder(folder: Path, files: Sequence[Path], size) -> Optional[Tuple[np.ndarray, dict]]:
    """(images, info) of the verified cache entry of these files at ``size`` (int or ``"native"``), or None."""
    key = folder_cache_key(folder, files, size)
    hit = cache.load_entry("folder", key)
    if hit is None:
        return None
    meta = hit.get("__meta__", {})
    return hit["x"], {"cache": "hit", "cache_path": str(cache.cache_dir() / f"folder-{key}.json"),
                      "files": len(files), "skipped": meta.get("skipped", []), "fingerprint": hit["__fingerprint__"]}


def no_images_error(folder: Path):
    """The :class:`~kohonen_vae.data.DatasetNotFoundError` of a folder without image files."""
    from .types import DatasetNotFoundError

    return DatasetNotFoundError(f"dataset 'folder:{folder}': no image files ({', '.join(IMAGE_EXTENSIONS)}, any "
                                f"case) found under {folder}. Point folder:PATH at a folder of images, optionally "
                                "with train/ and test/ (or val/) subfolders.")


def load_image_folder(folder: Path, size: int, label: str, files: Optional[Sequence[Path]] = None,
                      key_size=None) -> Tuple[np.ndarray, dict]:
    """Decoded images of every file under ``folder`` as uint8 (N, 3, size, size) (a memmap when cached), and info
    {"cache", "cache_path", "files", "skipped", "fingerprint" (:func:`cache.content_fingerprint` of the images)}.

    ``files``: the :func:`list_images` of ``folder`` if already listed; ``key_size``: the size recorded in the
    cache key (default ``size``; ``"native"`` when ``size`` was read from the images). Files that fail to decode
    are skipped with a warning that counts them. No image file raises
    :class:`~kohonen_vae.data.DatasetNotFoundError`, none decodable :class:`~kohonen_vae.data.DatasetCorruptError`.
    """
    from .types import DatasetCorruptError

    folder = Path(folder).resolve()
    files = list_images(folder) if files is None else list(files)
    if not files:
        raise no_images_error(folder)
    key_size = int(size) if key_size is None else key_size
    hit = cached_image_folder(folder, files, key_size)
    if hit is not None:
        return hit
    key = folder_cache_key(folder, files, key_size)

    tmp_files: List[str] = []
    meta_path = member = None
    try:
        # Decode straight into a temp .npy memmap in the cache folder, so a large tree never has to fit in RAM. The
        # entry's index (state "writing") is written first: the temp file is recorded before it exists.
        try:
            meta_path, paths = cache.begin_entry("folder", key, ["x"])
            member = paths["x"]
            buf = _temp_memmap(tmp_files, member, (len(files), 3, size, size))
        except OSError as exc:
            warnings.warn(f"could not write the kohonen_vae cache in {cache.cache_dir()} ({exc}); decoding into "
                          f"memory. Set {cache.ENV_CACHE} to a writable folder.", RuntimeWarning, stacklevel=3)
            buf = np.empty((len(files), 3, size, size), dtype=np.uint8)
        ok = _decode_files(files, size, buf, desc=f"decoding {label}")
        skipped = [Path(os.path.relpath(files[i], folder)).as_posix() for i in np.flatnonzero(~ok)]
        if skipped:
            shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            warnings.warn(f"folder:{folder}: skipped {len(skipped)} unreadable image file(s) of {len(files)} "
                          f"({shown})", RuntimeWarning, stacklevel=3)
        if not ok.any():
            raise DatasetCorruptError(f"dataset 'folder:{folder}': none of the {len(files)} image files could be "
                                      f"decoded ({', '.join(skipped[:5])}...); check that they are valid images")
        if not ok.all():  # compact the decodable images into a file of the right length
            keep = np.flatnonzero(ok)
            dst = _temp_memmap(tmp_files, member, (len(keep), 3, size, size)) if tmp_files else \
                np.empty((len(keep), 3, size, size), dtype=np.uint8)
            for j in range(0, len(keep), 1024):
                dst[j:j + 1024] = buf[keep[j:j + 1024]]
            buf = dst
        info = {"cache": "off", "cache_path": None, "files": len(files), "skipped": skipped}
        if not tmp_files:
            info["fingerprint"] = cache.arrays_fingerprint({"x": buf})
            return buf, info
        buf.flush()
        del buf
        with open(tmp_files[-1], "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_files[-1], member)
        tmp_files.pop()
        cache.finish_entry("folder", key, ["x"], extra={"skipped": skipped})
    finally:
        for t in tmp_files:
            try:
                os.unlink(t)
            except OSError:
                pass
    hit = cached_image_folder(folder, files, key_size)
    if hit is None:
        raise RuntimeError(f"the freshly written cache entry {meta_path} could not be read back")
    x, hinfo = hit
    info.update(cache="built", cache_path=str(meta_path), fingerprint=hinfo["fingerprint"])
    return x, info


def _temp_memmap(registry: List[str], member: Path, shape: tuple) -> np.ndarray:
    """A writable uint8 .npy memmap of ``shape`` in a new temp file of ``member`` (named as atomic_write names its
    temp files, so the cache's housekeeping knows it); its path is appended to ``registry``."""
    tmp = cache.member_temp_file(member)
    registry.append(tmp)
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
