"""CIFAR-10 readers: the numpy layout (``train_1..5.npz``, ``test.npz``), the standard python pickle layout
(``cifar-10-batches-py/``), and the optional download of ``cifar-10-python.tar.gz`` (md5-verified, atomic).

Both readers return NCHW uint8 arrays with R, G, B channel order: ``x_train`` (50000, 3, 32, 32), ``y_train`` (50000,)
uint8, ``x_test`` (10000, 3, 32, 32), ``y_test`` (10000,) (other counts are accepted for the pickle layout).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
PICKLE_DIR = "cifar-10-batches-py"
NPZ_FILES = [f"train_{i}.npz" for i in range(1, 6)] + ["test.npz"]
PICKLE_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class ChecksumError(OSError):
    """A downloaded file does not have the expected checksum (the partial file has been deleted)."""


# ---------------------------------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------------------------------
def find_layout(folder: Path) -> Optional[tuple]:
    """("npz" | "pickle", folder, [files]) if ``folder`` holds a complete layout, else None."""
    if all((folder / f).is_file() for f in NPZ_FILES):
        return "npz", folder, [folder / f for f in NPZ_FILES]
    for d in (folder, folder / PICKLE_DIR):
        if all((d / f).is_file() for f in PICKLE_FILES):
            return "pickle", d, [d / f for f in PICKLE_FILES]
    return None


def candidate_folders(root: Path) -> List[Path]:
    """Folders looked at under one data root, in order (each also checked for a ``cifar-10-batches-py/`` inside)."""
    return [root / "cifar10", root]


def expected_layout_text() -> str:
    """Human-readable description of the accepted layouts (for error messages)."""
    return ("numpy layout <dir>/train_1.npz .. train_5.npz + test.npz (members x (N,32,32,3) uint8, y), or the "
            f"python layout <dir>/{PICKLE_DIR}/data_batch_1 .. data_batch_5 + test_batch, "
            "with <dir> = <root>/cifar10 or <root>")


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------
def read_npz_layout(files: List[Path], progress=None) -> Dict[str, np.ndarray]:
    """Read the numpy layout: NHWC uint8 members ``x`` -> NCHW arrays (see module doc)."""
    xs, ys = [], []
    for f in files:
        with np.load(f) as z:
            x, y = z["x"], z["y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != (x.shape[0],):
            raise ValueError(f"{f}: expected x (N,32,32,3) uint8 and y (N,), got x {x.dtype}{x.shape}, y {y.shape}")
        xs.append(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        ys.append(y.astype(np.uint8))
        if progress is not None:
            progress.update(1)
    return {"x_train": np.concatenate(xs[:5]), "y_train": np.concatenate(ys[:5]), "x_test": xs[5], "y_test": ys[5]}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (what the CIFAR batches contain), never arbitrary objects."""

    _NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric"}
    _NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module, name):
        if (module in self._NUMPY_MODULES and name in self._NUMPY_NAMES) or (module, name) == ("_codecs", "encode"):
            # _codecs.encode is how Python 3 writes bytes in protocol-2 pickles (numpy's raw array data)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which a CIFAR batch never "
                                     "contains; refusing to unpickle it")


def read_pickle_batch(path: Path):
    """One python batch file -> (x (N, 3, 32, 32) uint8, y (N,) uint8).

    Each row of ``b'data'`` (N, 3072) holds 1024 R, then 1024 G, then 1024 B values, each a row-major 32x32
    plane, so ``reshape(N, 3, 32, 32)`` is already NCHW in RGB order.
    """
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict)")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: not a CIFAR-10 batch (keys {sorted(d)}; need 'data' and 'labels')")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: expected data (N, 3072) uint8 and N labels, got {data.dtype}{data.shape} "
                         f"and labels {labels.shape}")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels.astype(np.uint8)


def read_pickle_layout(files: List[Path], progress=None) -> Dict[str, np.ndarray]:
    """Read the python layout (``data_batch_1..5``, ``test_batch``) into NCHW arrays (see module doc)."""
    parts = []
    for f in files:
        parts.append(read_pickle_batch(f))
        if progress is not None:
            progress.update(1)
    return {"x_train": np.concatenate([p[0] for p in parts[:5]]), "y_train": np.concatenate([p[1] for p in parts[:5]]),
            "x_test": parts[5][0], "y_test": parts[5][1]}


# ---------------------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------------------
def _urlopen(url: str):
    """Open ``url`` for reading (a module-level hook so tests can substitute a fake server)."""
    return urllib.request.urlopen(url, timeout=60)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_cifar10(root: Path, url: Optional[str] = None, md5: Optional[str] = None) -> Path:
    """Download ``cifar-10-python.tar.gz`` into ``root``, check its md5, extract ``cifar-10-batches-py/`` atomically.

    Returns the folder holding the batches. A checksum mismatch deletes the partial download and raises
    :class:`ChecksumError`. An existing tarball with the right md5 is reused instead of re-downloaded.
    """
    from tqdm.auto import tqdm

    url = url or CIFAR10_URL
    md5 = md5 or CIFAR10_MD5
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / CIFAR10_TARBALL
    if not (tarball.is_file() and _md5(tarball) == md5):
        fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{CIFAR10_TARBALL}.", suffix=".part")
        try:
            h = hashlib.md5()
            with os.fdopen(fd, "wb") as out, _urlopen(url) as resp:
                total = getattr(resp, "length", None) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {CIFAR10_TARBALL}") as bar:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if got != md5:
                raise ChecksumError(f"downloaded {url} has md5 {got}, expected {md5}: the file is corrupt or not "
                                    f"CIFAR-10; it was deleted. Retry, or place {CIFAR10_TARBALL} / {PICKLE_DIR}/ "
                                    f"in {root} yourself.")
            os.replace(tmp, tarball)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return extract_cifar10(tarball, root)


def extract_cifar10(tarball: Path, root: Path) -> Path:
    """Extract the batches of ``tarball`` into ``root/cifar-10-batches-py`` via a temp folder + ``os.replace``."""
    final = Path(root) / PICKLE_DIR
    tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=".cifar10-extract-"))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not m.isfile() or not parts or parts[0] != PICKLE_DIR:
                    continue  # only regular files under cifar-10-batches-py/ are taken
                members.append(m)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmpdir, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(tmpdir, members=members)
        layout = find_layout(tmpdir / PICKLE_DIR)
        if layout is None:
            raise ValueError(f"{tarball} does not contain {PICKLE_DIR}/{{{', '.join(PICKLE_FILES)}}}")
        if final.exists():  # an incomplete copy (a complete one would have been used): keep it aside, never delete
            os.replace(final, final.with_name(f"{PICKLE_DIR}.incomplete-{int(time.time())}"))
        os.replace(tmpdir / PICKLE_DIR, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return final


__all__ = ["CIFAR10_URL", "CIFAR10_MD5", "ChecksumError", "find_layout", "candidate_folders", "read_npz_layout",
           "read_pickle_layout", "read_pickle_batch", "download_cifar10", "extract_cifar10"]
