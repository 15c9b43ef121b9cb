"""CIFAR-10 readers: the numpy layout (``train_1..5.npz``, ``test.npz``), the standard python pickle layout
(``cifar-10-batches-py/``), and the optional download of ``cifar-10-python.tar.gz`` (md5-verified, atomic).

Both readers return NCHW uint8 arrays with R, G, B channel order: ``x_train`` (50000, 3, 32, 32), ``y_train`` (50000,)
uint8, ``x_test`` (10000, 3, 32, 32), ``y_test`` (10000,) (other counts are accepted for the pickle layout).

A file that is truncated, garbled or not what the layout promises raises one
:class:`~kohonen_vae.data.DatasetCorruptError` (a ValueError) whose one-line message names the file. The python
batches are pickles: they are read with a restricted unpickler that rebuilds only plain containers (dict, list,
bytes, str, numbers) and numpy arrays, so a crafted pickle in a data folder cannot run code.
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

from .types import DatasetCorruptError, corrupt_file_error

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
def read_npz(path: Path, members: List[str], optional: tuple = (), what: str = "numpy archive (.npz)") -> dict:
    """{name: array} of the ``members`` (required) and ``optional`` members of the ``.npz`` file ``path``, read
    without pickles; a file that cannot be read so raises :class:`DatasetCorruptError` naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single .npy array, not a .npz archive")
            missing = [m for m in members if m not in z.files]
            if missing:
                raise KeyError(f"no member {', '.join(missing)} (it has {', '.join(z.files) or 'none'})")
            return {m: z[m] for m in list(members) + [o for o in optional if o in z.files]}
    except Exception as exc:  # BadZipFile, EOFError, zlib/lzma errors, ValueError, KeyError, ...: all "damaged"
        raise corrupt_file_error(path, what, exc) from exc


def read_npz_layout(files: List[Path], progress=None) -> Dict[str, np.ndarray]:
    """Read the numpy layout: NHWC uint8 members ``x`` -> NCHW arrays (see module doc)."""
    xs, ys = [], []
    for f in files:
        z = read_npz(f, ["x", "y"], what="CIFAR-10 numpy archive")
        x, y = z["x"], z["y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.shape != (x.shape[0],):
            raise DatasetCorruptError(f"{f}: expected x (N,32,32,3) uint8 and y (N,), got x {x.dtype}{x.shape}, "
                                      f"y {y.shape}; replace it with an intact copy")
        xs.append(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        ys.append(y.astype(np.uint8))
        if progress is not None:
            progress.update(1)
    return {"x_train": np.concatenate(xs[:5]), "y_train": np.concatenate(ys[:5]), "x_test": xs[5], "y_test": ys[5]}


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as protocol-2 pickles use it for raw bytes (``encode(str, "latin1")``), and nothing else."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"CIFAR-10 batch asks for _codecs.encode(..., {encoding!r}); only 'latin1' "
                                     "(how protocol-2 pickles store bytes) is allowed: refusing to unpickle it")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR batches: plain containers (dict, list, bytes, str, numbers: no class needed) and
    numpy arrays only. The only callables it hands out are numpy's array/dtype/scalar rebuilders and a latin1-only
    ``_codecs.encode``; any other global (``os.system``, ``builtins.open``, ...) is refused, so no code runs."""

    _NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric"}
    _NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}

    def find_class(self, module, name):
        if module in self._NUMPY_MODULES and name in self._NUMPY_NAMES:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes in protocol-2 pickles
            return _latin1_encode
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which a CIFAR batch never "
                                     "contains; refusing to unpickle it")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("CIFAR-10 batch uses persistent ids; refusing to unpickle it")


def read_pickle_batch(path: Path):
    """One python batch file -> (x (N, 3, 32, 32) uint8, y (N,) uint8).

    Each row of ``b'data'`` (N, 3072) holds 1024 R, then 1024 G, then 1024 B values, each a row-major 32x32
    plane, so ``reshape(N, 3, 32, 32)`` is already NCHW in RGB order. A truncated, garbled or crafted file
    raises :class:`DatasetCorruptError` naming it (see the module doc).
    """
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as exc:  # UnpicklingError (refused or garbled), EOFError (truncated), ValueError, ...
        raise corrupt_file_error(path, "CIFAR-10 python batch (pickle)", exc) from exc

    def bad(why: str) -> DatasetCorruptError:
        return DatasetCorruptError(f"{path}: not a CIFAR-10 python batch ({why}); replace it with an intact copy")

    if not isinstance(d, dict):
        raise bad(f"expected a dict, got {type(d).__name__}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise bad(f"keys {sorted(map(str, d))}; need 'data' and 'labels'")
    try:
        data = np.asarray(d["data"])
        labels = np.asarray(d["labels"])
    except Exception as exc:
        raise bad(f"data or labels are not arrays: {type(exc).__name__}") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],) \
            or labels.dtype.kind not in "iu":
        raise bad(f"expected data (N, 3072) uint8 and N integer labels, got {data.dtype}{data.shape} "
                  f"and labels {labels.dtype}{labels.shape}")
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


__all__ = ["CIFAR10_URL", "CIFAR10_MD5", "ChecksumError", "find_layout", "candidate_folders", "read_npz", "read_npz_layout",
           "read_pickle_layout", "read_pickle_batch", "download_cifar10", "extract_cifar10"]
