"""``load_splits``: find a dataset, decode it once (cached), split train/val with a fixed seed, pick its normaliser."""
from __future__ import annotations

import math
import numbers
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import cache, cifar
from .folder import (cached_image_folder, list_images, load_image_folder, native_size, no_images_error,
                     shared_files, split_subfolders)
from .types import DatasetCorruptError, DatasetNotFoundError, DatasetSplits, ImageSet, Normalizer, to_nchw_tensor

ENV_DATA = "KOHONEN_VAE_DATA"
DATASETS = ("cifar10", "utkface64", "mnist", "sample")
FOLDER_PREFIX = "folder:"
SAMPLE_PATH = Path(__file__).resolve().parents[1] / "assets" / "cifar10_sample.npz"

# Shared numpy layouts: files, and how each dataset is normalised (see paper-spec section 6).
_NPZ_LAYOUTS = {
    "utkface64": {"train": ["train_1.npz", "train_2.npz"], "test": "test.npz", "shape": (3, 64, 64)},
    "mnist": {"train": ["train.npz"], "test": "test.npz", "shape": (1, 28, 28)},
}
#: (C, H, W) of the images of the fixed-size datasets, before any image_size resize
_NATIVE_SHAPES = {"cifar10": (3, 32, 32), "sample": (3, 32, 32),
                  **{name: spec["shape"] for name, spec in _NPZ_LAYOUTS.items()}}
_NORMALISATION = {"cifar10": "standardize", "sample": "standardize", "mnist": "standardize",
                  "utkface64": "minus_one_one", "folder": "minus_one_one"}


# ---------------------------------------------------------------------------------------------------------------
# Where data lives
# ---------------------------------------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """The ``shared/data`` folder beside the repository checkout (``<checkout>/../shared/data``)."""
    import kohonen_vae

    return Path(kohonen_vae.__file__).resolve().parents[2] / "shared" / "data"


def data_roots(data_dir=None) -> Tuple[List[Path], str]:
    """(roots to search in order, where they came from).

    ``data_dir`` if given, else ``$KOHONEN_VAE_DATA``, else ``./data`` then the shared data folder beside the checkout.
    """
    if data_dir is not None:
        return [Path(data_dir).expanduser()], "data_dir argument"
    env = os.environ.get(ENV_DATA)
    if env:
        return [Path(env).expanduser()], f"${ENV_DATA}"
    return [Path.cwd() / "data", shared_data_dir()], "default locations"


def _not_found(name: str, looked: List[str], roots_from: str, layout: str, how: str) -> DatasetNotFoundError:
    lines = [f"dataset {name!r} not found. Looked in ({roots_from}):"] + [f"  - {p}" for p in looked]
    lines += [f"Expected layout: {layout}.",
              f"Fix: pass --data-dir DIR (CLI) / data_dir=DIR (Python), or set {ENV_DATA}=DIR, where DIR contains "
              f"{name}/ (or the files themselves). {how}"]
    return DatasetNotFoundError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Sources: each returns ({x_train, y_train, x_test, y_test} NCHW uint8 arrays (y may be None), info)
# ---------------------------------------------------------------------------------------------------------------
def _load_cifar10(data_dir, download: bool) -> Tuple[Dict[str, np.ndarray], dict]:
    roots, roots_from = data_roots(data_dir)
    looked, found = [], None
    for root in roots:
        for folder in cifar.candidate_folders(root):
            looked.append(str(folder))
            found = cifar.find_layout(folder)
            if found:
                break
        if found:
            break
    if found is None and download:
        target = roots[0]
        cifar.download_cifar10(target)
        found = cifar.find_layout(target)
    if found is None:
        raise _not_found("cifar10", looked, roots_from, cifar.expected_layout_text(),
                         f"Or call load_splits('cifar10', download=True) to fetch {cifar.CIFAR10_TARBALL} "
                         f"(~163 MiB, md5-checked) into {roots[0]}.")
    layout, folder, files = found
    from tqdm.auto import tqdm

    def build():
        with tqdm(total=len(files), desc=f"reading cifar10 ({layout} layout)", unit="file") as bar:
            reader = cifar.read_npz_layout if layout == "npz" else cifar.read_pickle_layout
            return reader(files, progress=bar)

    arrays, cinfo = cache.cached_arrays("cifar10", {"kind": "cifar10", "layout": layout,
                                                    "files": cache.files_fingerprint(files)}, build)
    return arrays, {"source": str(folder.resolve()), "layout": layout, **cinfo}


def _load_shared_npz(name: str, data_dir) -> Tuple[Dict[str, np.ndarray], dict]:
    spec = _NPZ_LAYOUTS[name]
    wanted = spec["train"] + [spec["test"]]
    roots, roots_from = data_roots(data_dir)
    looked, folder = [], None
    for root in roots:
        for cand in (root / name, root):
            looked.append(str(cand))
            if all((cand / f).is_file() for f in wanted):
                folder = cand
                break
        if folder is not None:
            break
    if folder is None:
        c, h, w = spec["shape"]
        shape = f"({'N,%d,%d,3' % (h, w) if c == 3 else 'N,%d,%d' % (h, w)})"
        raise _not_found(name, looked, roots_from,
                         f"<dir>/{' + '.join(wanted)} with members x {shape} uint8 (and y), <dir> = <root>/{name} "
                         "or <root>", "This dataset has no automatic download; copy the shared archives.")
    files = [folder / f for f in wanted]

    def build():
        xs, ys = [], []
        for f in files:
            z = cifar.read_npz(f, ["x"], optional=("y",), what=f"{name} numpy archive")
            x, y = z["x"], z.get("y")
            if x.dtype != np.uint8 or x.ndim not in (3, 4):
                raise DatasetCorruptError(f"{f}: expected uint8 images, got {x.dtype} {x.shape}; replace it with "
                                          "an intact copy")
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # grey (N,H,W) or NHWC -> NCHW
            if x.shape[1:] != spec["shape"]:
                raise DatasetCorruptError(f"{f}: expected images of shape {spec['shape']} (C,H,W), got "
                                          f"{x.shape[1:]}; replace it with an intact copy")
            xs.append(np.ascontiguousarray(x))
            ys.append(y)
        out = {"x_train": np.concatenate(xs[:-1]), "x_test": xs[-1]}
        if all(y is not None for y in ys):
            out["y_train"] = np.concatenate(ys[:-1]).astype(np.uint8)
            out["y_test"] = ys[-1].astype(np.uint8)
        return out

    arrays, cinfo = cache.cached_arrays(name, {"kind": name, "files": cache.files_fingerprint(files)}, build)
    return arrays, {"source": str(folder.resolve()), "layout": "npz", **cinfo}


def _load_sample() -> Tuple[Dict[str, np.ndarray], dict]:
    if not SAMPLE_PATH.is_file():
        raise DatasetNotFoundError(f"the bundled sample {SAMPLE_PATH} is missing from the installed package; "
                                   "reinstall kohonen-vae or regenerate it with scripts/make_sample.py")
    with np.load(SAMPLE_PATH) as z:
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    arrays["x_train"] = np.ascontiguousarray(arrays["x_train"].transpose(0, 3, 1, 2))
    arrays["x_test"] = np.ascontiguousarray(arrays["x_test"].transpose(0, 3, 1, 2))
    return arrays, {"source": str(SAMPLE_PATH), "layout": "npz (bundled)", "cache": "off", "cache_path": None,
                    "fingerprint": cache.arrays_fingerprint(arrays)}


def _load_folder(path: str, image_size: Optional[int], check_shape) -> Tuple[Dict[str, np.ndarray], dict]:
    """The folder dataset at ``path``: its parts (the folder, or train/ + test|val/) are listed, the size is
    settled (``image_size``, else the images' own: :func:`~kohonen_vae.data.folder.native_size`) and checked
    by ``check_shape`` before anything is decoded."""
    from ..errors import ConfigError

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"dataset 'folder:{path}' not found. Looked at: {folder.resolve()} (not a folder).\n"
            "Expected layout: a folder (any depth) of .png/.jpg/.jpeg/.bmp/.webp images, optionally with train/ and "
            "test/ (or val/) subfolders. Fix: give an existing folder, e.g. folder:/path/to/imagenet.")
    folder = folder.resolve()
    sub = split_subfolders(folder)
    parts = [(folder, folder.name)] if sub is None else [(sub[0], f"{folder.name}/train"),
                                                         (sub[1], f"{folder.name}/{sub[1].name}")]
    lists = [list_images(p) for p, _ in parts]
    for (p, _), files in zip(parts, lists):
        if not files:
            raise no_images_error(p)
    if sub is not None:
        both = shared_files(lists[0], lists[1])
        if both:
            names = ", ".join(Path(os.path.relpath(p, sub[1])).as_posix() for p in both[:3])
            raise ConfigError(f"dataset 'folder:{folder}': {len(both)} of the {len(lists[1])} images in "
                              f"{sub[1].name}/ are the same files as images in train/ (via links: {names}"
                              f"{', ...' if len(both) > 3 else ''}); held-out images must not be training images. "
                              "Remove those links or copies.")
    key_size = "native" if image_size is None else int(image_size)
    size = None if image_size is None else int(image_size)
    hits = [None] * len(parts)
    if size is None:  # the images' own size: from earlier decodes of exactly these files, else their headers
        hits = [cached_image_folder(p, files, "native") for (p, _), files in zip(parts, lists)]
        sides = {h[0].shape[-1] for h in hits if h is not None}
        size = sides.pop() if all(h is not None for h in hits) and len(sides) == 1 else \
            native_size([f for files in lists for f in files], f"folder:{folder}")
    if check_shape is not None:
        check_shape((3, size, size))
    loaded = []
    for (p, label), files, hit in zip(parts, lists, hits):
        loaded.append(hit if hit is not None else
                      load_image_folder(p, size, f"{label} @ {size}px", files=files, key_size=key_size))
    (x_train, tinfo), *rest = loaded
    info = {"source": str(folder), "train_info": tinfo, "cache": tinfo["cache"], "cache_path": tinfo["cache_path"],
            "image_size": size, "image_size_from": "images" if image_size is None else "argument"}
    if sub is None:
        info.update(layout="flat folder (no test set)", fingerprint=cache.hash_key({"x_train": tinfo["fingerprint"]}))
        return {"x_train": x_train}, info
    x_test, hinfo = rest[0]
    info.update(layout=f"train/ + {sub[1].name}/ (as test)", test_info=hinfo,
                fingerprint=cache.hash_key({"x_train": tinfo["fingerprint"], "x_test": hinfo["fingerprint"]}))
    return {"x_train": x_train, "x_test": x_test}, info


# ---------------------------------------------------------------------------------------------------------------
# Resizing and splitting
# ---------------------------------------------------------------------------------------------------------------
def resize_uint8(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), resized once at load time, rounded and clamped.

    Downscaling by an integer factor (e.g. 64 -> 32) is exact box averaging (``F.interpolate(mode="area")``: each
    output pixel is the mean of its k x k block); any other size uses ``mode="bilinear", antialias=True``.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    box = h % size == 0 and w % size == 0
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, x.shape[0], chunk):
        xf = x[s:s + chunk].float()
        if box:
            y = F.interpolate(xf, size=(size, size), mode="area")
        else:
            y = F.interpolate(xf, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def split_indices(n: int, val_fraction: float, split_seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx), sorted int64: ``perm = torch.randperm(n, generator=Generator().manual_seed(seed))``,
    val = perm[:round(n * val_fraction)], train = the rest (sorted for sequential memory access)."""
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(split_seed))
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * float(val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training image out of {n}")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def evaluation_indices(n: int, max_images: Optional[int], seed: int = 0) -> Optional[torch.Tensor]:
    """Which of ``n`` images an evaluation capped at ``max_images`` uses: None (all of them) if there is no
    cap or it is >= n, else ``sort(randperm(n, Generator().manual_seed(seed + 1))[:max_images])``, a fixed
    random subset (the same for every run with the same split seed; independent of file order, so a folder
    sorted by class is not evaluated on its first classes only)."""
    if max_images is None or int(max_images) >= n:
        return None
    g = torch.Generator().manual_seed(int(seed) + 1)  # + 1: not the permutation that drew the split itself
    return torch.randperm(n, generator=g)[: int(max_images)].sort().values


def evaluation_subset(images: torch.Tensor, max_images: Optional[int], seed: int = 0) -> torch.Tensor:
    """``images`` restricted to :func:`evaluation_indices` (all of them when uncapped)."""
    idx = evaluation_indices(images.shape[0], max_images, seed)
    return images if idx is None else _take(images, idx)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, idx).contiguous()


def _labels(y) -> Optional[torch.Tensor]:
    return None if y is None else torch.from_numpy(np.asarray(y).astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------------------
def check_image_size_value(image_size) -> Optional[int]:
    """``image_size`` as an int (None stays None); ValueError naming it unless it is a positive integer (an int,
    or an integral finite float such as 32.0; not a bool, string, NaN or infinity)."""
    if image_size is None:
        return None
    ok = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    if isinstance(image_size, float) and math.isfinite(image_size) and image_size == int(image_size):
        ok = True
    if not ok or int(image_size) < 1:
        raise ValueError(f"image_size (data.image_size) must be a positive integer or None (the images' own size), "
                         f"got {image_size!r}")
    return int(image_size)


def load_splits(name: str, data_dir=None, image_size: Optional[int] = None, val_fraction: float = 0.2,
                split_seed: int = 0, download: bool = False,
                check_shape: Optional[Callable[[tuple], None]] = None) -> DatasetSplits:
    """Load dataset ``name`` and return :class:`DatasetSplits` (train, val, test, normalizer, info).

    Names: ``cifar10``, ``utkface64``, ``mnist``, ``sample`` (bundled 3,000 + 500 CIFAR-10 images), ``folder:PATH``.
    Images are uint8 (N, C, H, W) tensors: cifar10/sample (3, 32, 32), utkface64 (3, 64, 64), mnist (1, 28, 28),
    folder (3, S, S). ``image_size`` (``data.image_size``; a positive integer, validated before anything is read):
    for the fixed-size datasets it resizes once at load time (box average for integer downscale factors, else
    antialiased bilinear; see :func:`resize_uint8`); a folder's images are decoded at S = ``image_size``
    (squashed, aspect ratio not kept). Without it a folder keeps its images' own size when they all share one
    square size, else one ConfigError asks for ``data.image_size`` and names the sizes found
    (:mod:`kohonen_vae.data.folder`). ``check_shape((C, H, W))``, if given, is called with the shape the images
    will have before anything is decoded (e.g. to refuse a size the model cannot run on); what it raises
    propagates.
    Folder datasets visit each real file once (symbolic links resolved, link loops end); a ``test/`` (or ``val/``)
    folder that holds the same files as ``train/`` is refused (ConfigError).
    Split (paper protocol): val = a fixed random ``val_fraction`` of the *training* set, drawn with
    ``torch.Generator().manual_seed(split_seed)``; train = the rest; test = the separate test set (or None).
    Normaliser, y = (x/255 - mean)/std: cifar10, sample, mnist use the per-channel mean/std of ``train``;
    utkface64 and folder use mean = std = 0.5 (pixels to [-1, 1]).
    Data roots: ``data_dir``, else ``$KOHONEN_VAE_DATA``, else ``./data`` then ``<checkout>/../shared/data``; a dataset
    sits in ``<root>/<name>/`` or ``<root>``. Decoded arrays are cached as ``.npy`` in ``$KOHONEN_VAE_CACHE``
    (default ``~/.cache/kohonen_vae``). ``download=True`` (cifar10 only) fetches the md5-checked python tarball into
    the first root (``data_dir``, ``$KOHONEN_VAE_DATA`` or ``./data``) when no copy is found. Raises DatasetNotFoundError (what was looked at, how to get it),
    DatasetCorruptError (a ValueError: a file that is truncated, damaged or crafted; the message names it), or
    ValueError for an unknown name or a bad argument.

    ``info`` holds, besides where the data came from and the cache use: ``sizes``, ``image_shape``,
    ``image_size`` (the side of the images) and ``image_size_from`` ("argument", "images" for a folder's own
    size, "dataset" for a fixed-size dataset's own), and ``fingerprint``: 20 hex digits identifying the decoded
    source images and labels (every array's shape, dtype and sha256, before the split and any resize; see
    :func:`kohonen_vae.data.cache.content_fingerprint`). Equal fingerprints mean byte-identical decoded data,
    wherever the files live and whatever their mtimes; it is free on a cache hit.
    """
    t0 = time.perf_counter()
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, one of {', '.join(DATASETS)} or folder:PATH; got {name!r}")
    image_size = check_image_size_value(image_size)
    if not 0.0 <= float(val_fraction) < 1.0:  # checked again by split_indices; here before anything is read
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):]
        if not path:
            raise ValueError("folder: needs a path, e.g. 'folder:/data/imagenet'")
        arrays, info = _load_folder(path, image_size, check_shape)  # decoded at the settled size
        kind, image_size = "folder", None
    else:
        if name not in _NATIVE_SHAPES:
            raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, folder:PATH")
        c, h, w = _NATIVE_SHAPES[name]
        if check_shape is not None:
            check_shape((c, h, w) if image_size is None else (c, image_size, image_size))
        if name == "cifar10":
            arrays, info = _load_cifar10(data_dir, download)
        elif name in _NPZ_LAYOUTS:
            arrays, info = _load_shared_npz(name, data_dir)
        else:  # "sample"
            arrays, info = _load_sample()
        kind = name
        info.update(image_size=h if image_size is None else image_size,
                    image_size_from="dataset" if image_size is None else "argument")

    x_train = to_nchw_tensor(arrays["x_train"])
    x_test = to_nchw_tensor(arrays["x_test"]) if arrays.get("x_test") is not None else None
    if image_size is not None:
        x_train = resize_uint8(x_train, int(image_size))
        x_test = None if x_test is None else resize_uint8(x_test, int(image_size))
    y_train, y_test = _labels(arrays.get("y_train")), _labels(arrays.get("y_test"))

    tr_idx, va_idx = split_indices(x_train.shape[0], val_fraction, split_seed)
    train = ImageSet(_take(x_train, tr_idx), None if y_train is None else y_train[tr_idx], f"{name}/train", tr_idx)
    val = ImageSet(_take(x_train, va_idx), None if y_train is None else y_train[va_idx], f"{name}/val", va_idx)
    test = None
    if x_test is not None:
        test = ImageSet(x_test.contiguous(), y_test, f"{name}/test", torch.arange(x_test.shape[0]))

    if _NORMALISATION[kind] == "standardize":
        normalizer = Normalizer.from_images(train.images)
    else:
        normalizer = Normalizer.unit_range(train.images.shape[1])

    info = {"dataset": name, **info, "sizes": {"train": len(train), "val": len(val),
                                               "test": None if test is None else len(test)},
            "image_shape": list(train.image_shape), "val_fraction": float(val_fraction),
            "split_seed": int(split_seed), "normalization": normalizer.to_dict(),
            "load_seconds": round(time.perf_counter() - t0, 3)}
    return DatasetSplits(train=train, val=val, test=test, normalizer=normalizer, info=info)


def splits_key(data: dict) -> str:
    """A string equal for two ``data`` tables iff :func:`splits_from_config` gives them the same splits
    (name, data_dir, image_size, val_fraction, split_seed): the key of every cache of loaded splits."""
    import json

    return json.dumps([data.get("name"), data.get("data_dir"), data.get("image_size"), data.get("val_fraction", 0.2),
                       data.get("split_seed", 0)], default=str)


def splits_from_config(data: dict, download: Optional[bool] = None,
                       check_shape: Optional[Callable[[tuple], None]] = None) -> DatasetSplits:
    """:func:`load_splits` with the arguments of a run config's ``data`` table (missing keys take
    :func:`load_splits`' defaults); ``download`` overrides ``data["download"]``; ``check_shape`` as in
    :func:`load_splits`. Training, reproduction and reports all load a run's data through this one function,
    so they see the same split."""
    if "name" not in data:
        raise ValueError("the data config has no 'name' (e.g. data.name = 'cifar10')")
    return load_splits(data["name"], data_dir=data.get("data_dir"), image_size=data.get("image_size"),
                       val_fraction=data.get("val_fraction", 0.2), split_seed=data.get("split_seed", 0),
                       download=data.get("download", False) if download is None else download,
                       check_shape=check_shape)
