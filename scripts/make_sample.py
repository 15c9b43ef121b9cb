#!/usr/bin/env python
"""Regenerate the bundled CIFAR-10 sample kohonen_vae/assets/cifar10_sample.npz from the shared CIFAR-10 arrays.

Picks 300 training and 50 test images per class with numpy.random.default_rng(SEED), keeps them in their original
order, and stores x_train (3000, 32, 32, 3) uint8 NHWC, y_train (3000,) uint8, x_test (500, 32, 32, 3), y_test (500,),
plus train_index / test_index (int32 positions in the original sets) as an .npz with LZMA-compressed members (the same
format as the shared archives). Prints the file size and sha256.

    python scripts/make_sample.py [--data-dir ../shared/data/cifar10] [--out kohonen_vae/assets/cifar10_sample.npz]
"""
import argparse
import hashlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

SEED = 20230215
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 50
REPO = Path(__file__).resolve().parents[1]


def balanced_subset(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices: ``per_class`` images of each class drawn without replacement."""
    picks = [rng.choice(np.flatnonzero(y == c), size=per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def save_lzma_npz(path: Path, arrays: dict) -> None:
    """np.savez-compatible archive whose .npy members are LZMA-compressed; written atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_LZMA) as z:
                for name, a in arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
                    # fixed timestamp so that the same arrays always give the same bytes (and sha256)
                    info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_LZMA
                    info.external_attr = 0o644 << 16
                    z.writestr(info, buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--out", type=Path, default=REPO / "kohonen_vae" / "assets" / "cifar10_sample.npz")
    args = ap.parse_args(argv)
    parts = [np.load(args.data_dir / f"train_{i}.npz") for i in range(1, 6)]
    x_train = np.concatenate([p["x"] for p in parts])
    y_train = np.concatenate([p["y"] for p in parts])
    with np.load(args.data_dir / "test.npz") as t:
        x_test, y_test = t["x"], t["y"]
    rng = np.random.default_rng(SEED)
    tr = balanced_subset(y_train, TRAIN_PER_CLASS, rng)
    te = balanced_subset(y_test, TEST_PER_CLASS, rng)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_lzma_npz(args.out, {"x_train": x_train[tr], "y_train": y_train[tr], "x_test": x_test[te],
                             "y_test": y_test[te], "train_index": tr.astype(np.int32),
                             "test_index": te.astype(np.int32)})
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}: {len(tr)} train + {len(te)} test images, {args.out.stat().st_size / 1e6:.2f} MB")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
