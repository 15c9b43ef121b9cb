"""Tests of kohonen_vae.data: layouts, splits, normalisation, caching, folders, errors, sample, download."""
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kohonen_vae.data as kd
from kohonen_vae.data import (DATASETS, DatasetNotFoundError, DatasetSplits, ImageSet, Normalizer, load_splits)
from kohonen_vae.data import cifar as kcifar
from kohonen_vae.data import folder as kfolder
from kohonen_vae.data.loader import SAMPLE_PATH, shared_data_dir

SHARED = shared_data_dir()
needs_shared_cifar = pytest.mark.skipif(not (SHARED / "cifar10" / "train_1.npz").is_file(),
                                        reason=f"shared CIFAR-10 archives not found under {SHARED}")
needs_shared_utk = pytest.mark.skipif(not (SHARED / "utkface64" / "test.npz").is_file(),
                                      reason=f"shared UTKFace archives not found under {SHARED}")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kvae_cache")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, session_cache):
    """Every test uses a private cache folder and ignores any user data setting."""
    monkeypatch.setenv("KOHONEN_VAE_CACHE", str(session_cache))
    monkeypatch.delenv("KOHONEN_VAE_DATA", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Fake CIFAR-10 in both on-disk formats, with known pixel values
# ---------------------------------------------------------------------------------------------------------------
def fake_cifar_arrays(n_per_batch=6, seed=0):
    """6 batches (5 train + test) of random NHWC uint8 images and labels."""
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 256, size=(n_per_batch, 32, 32, 3), dtype=np.uint8) for _ in range(6)]
    ys = [rng.integers(0, 10, size=n_per_batch).astype(np.uint8) for _ in range(6)]
    # A pixel with distinct channel values: image 0 of batch 1, row 2, column 5 = (R, G, B) = (200, 100, 50)
    xs[0][0, 2, 5] = (200, 100, 50)
    return xs, ys


def write_pickle_layout(folder: Path, xs, ys):
    """The real python CIFAR-10 format: dict with b'data' (N, 3072) = 1024 R, 1024 G, 1024 B per row."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, x, y in zip(names, xs, ys):
        data = np.concatenate([x[..., c].reshape(len(x), 1024) for c in range(3)], axis=1)  # R plane, G, B
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(len(x))]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)


def write_npz_layout(folder: Path, xs, ys):
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"train_{i}.npz" for i in range(1, 6)] + ["test.npz"]
    for name, x, y in zip(names, xs, ys):
        np.savez(folder / name, x=x, y=y)


def test_pickle_layout_equals_npz_layout_pixel_for_pixel(tmp_path):
    xs, ys = fake_cifar_arrays()
    write_pickle_layout(tmp_path / "p" / "cifar-10-batches-py", xs, ys)
    write_npz_layout(tmp_path / "n" / "cifar10", xs, ys)
    a = load_splits("cifar10", data_dir=tmp_path / "p")
    b = load_splits("cifar10", data_dir=tmp_path / "n")
    assert a.info["layout"] == "pickle" and b.info["layout"] == "npz"
    for s in ("train", "val", "test"):
        sa, sb = getattr(a, s), getattr(b, s)
        assert sa.images.dtype == torch.uint8 and sa.images.shape[1:] == (3, 32, 32)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
        assert torch.equal(sa.indices, sb.indices)
    # Channel order: RGB planes, row-major. Training image 0 is in train or val; find it via indices.
    full = torch.cat([a.train.images, a.val.images])[torch.cat([a.train.indices, a.val.indices]).argsort()]
    assert full[0, :, 2, 5].tolist() == [200, 100, 50]
    expected_nchw = torch.from_numpy(np.concatenate(xs[:5]).transpose(0, 3, 1, 2).copy())
    assert torch.equal(full, expected_nchw)
    assert torch.equal(a.test.images, torch.from_numpy(xs[5].transpose(0, 3, 1, 2).copy()))
    assert a.test.labels.dtype == torch.int64 and a.test.labels.tolist() == ys[5].tolist()
    assert len(a.train) == 24 and len(a.val) == 6 and len(a.test) == 6


def test_corrupt_cache_is_rebuilt(tmp_path, session_cache):
    xs, ys = fake_cifar_arrays(seed=1)
    write_npz_layout(tmp_path / "cifar10", xs, ys)
    first = load_splits("cifar10", data_dir=tmp_path)
    assert first.info["cache"] == "built"
    again = load_splits("cifar10", data_dir=tmp_path)
    assert again.info["cache"] == "hit"
    stem = Path(first.info["cache_path"]).with_suffix("")
    x_file = Path(f"{stem}.x_train.npy")
    with open(x_file, "r+b") as f:  # truncate: as if the disk filled up
        f.truncate(os.path.getsize(x_file) // 2)
    with pytest.warns(RuntimeWarning, match="cannot be used .*bytes.*rebuilding"):
        rebuilt = load_splits("cifar10", data_dir=tmp_path)
    assert rebuilt.info["cache"] == "built"
    assert torch.equal(rebuilt.train.images, first.train.images)
    assert load_splits("cifar10", data_dir=tmp_path).info["cache"] == "hit"


def test_cache_invalidated_when_source_changes(tmp_path):
    xs, ys = fake_cifar_arrays(seed=2)
    write_npz_layout(tmp_path, xs, ys)
    a = load_splits("cifar10", data_dir=tmp_path, val_fraction=0.0)
    xs[0][1] = 7
    write_npz_layout(tmp_path, xs, ys)
    b = load_splits("cifar10", data_dir=tmp_path, val_fraction=0.0)
    assert b.info["cache"] == "built" and b.info["cache_path"] != a.info["cache_path"]
    assert bool((b.train.images[1] == 7).all()) and not bool((a.train.images[1] == 7).all())


# ---------------------------------------------------------------------------------------------------------------
# Real shared CIFAR-10
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_splits(session_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOHONEN_VAE_CACHE", str(session_cache))
        mp.delenv("KOHONEN_VAE_DATA", raising=False)
        return load_splits("cifar10")


@needs_shared_cifar
def test_cifar10_npz_layout_shapes_split_and_determinism(cifar_splits):
    s = cifar_splits
    assert isinstance(s, DatasetSplits)
    assert (len(s.train), len(s.val), len(s.test)) == (40000, 10000, 10000)
    for part in (s.train, s.val, s.test):
        assert isinstance(part, ImageSet)
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (3, 32, 32)
        assert part.images.is_contiguous()
        assert part.labels.dtype == torch.int64 and part.labels.shape == (len(part),)
    # Disjoint and together exactly the 50,000 training images.
    tr, va = set(s.train.indices.tolist()), set(s.val.indices.tolist())
    assert not tr & va and tr | va == set(range(50000))
    # The documented first pixels of data_batch_1 row 0 (R plane starts 59, 43, 50) and first test labels.
    full = torch.cat([s.train.images, s.val.images])[torch.cat([s.train.indices, s.val.indices]).argsort()]
    assert full[0, 0, 0, :3].tolist() == [59, 43, 50]
    assert s.test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # Deterministic for a seed (reload comes from the cache), different for another seed.
    again = load_splits("cifar10")
    assert again.info["cache"] == "hit"
    assert torch.equal(again.val.indices, s.val.indices) and torch.equal(again.val.images, s.val.images)
    other = load_splits("cifar10", split_seed=1)
    assert not torch.equal(other.val.indices, s.val.indices)
    assert s.info["sizes"] == {"train": 40000, "val": 10000, "test": 10000} and s.info["image_shape"] == [3, 32, 32]
    # The cache index's checksums against the dataset README's published sha256 of the raw label arrays.
    import json
    members = json.loads(Path(s.info["cache_path"]).read_text())["members"]
    assert members["y_train"]["sha256"] == "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253"
    assert members["y_test"]["sha256"] == "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5"
    assert "sampled_sha256" in members["x_train"] and "sampled_sha256" not in members["x_test"]  # 154 MB vs 31 MB
    assert hashlib.sha256(full.permute(0, 2, 3, 1).contiguous().numpy()).hexdigest() == \
        "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a"  # the README's x_train (NHWC)


@needs_shared_cifar
def test_cifar_normalizer_standardises_train_and_inverts(cifar_splits):
    s = cifar_splits
    norm = s.normalizer
    assert norm.mean.dtype == torch.float32 and norm.mean.shape == (3,) and norm.std.shape == (3,)
    # Independent formulation: exact integer moments sum(x), sum(x^2) per channel (the loader uses histograms).
    n = s.train.images.numel() // 3
    s1 = torch.zeros(3, dtype=torch.int64)
    s2 = torch.zeros(3, dtype=torch.int64)
    y1 = torch.zeros(3, dtype=torch.float64)
    y2 = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(s.train), 4000):
        block = s.train.images[i:i + 4000]
        xi = block.to(torch.int32)
        s1 += xi.sum((0, 2, 3), dtype=torch.int64)
        s2 += (xi * xi).sum((0, 2, 3), dtype=torch.int64)
        y = norm.normalize(block)
        assert y.dtype == torch.float32
        y1 += y.sum((0, 2, 3), dtype=torch.float64)
        y2 += (y * y).sum((0, 2, 3), dtype=torch.float64)
    mean = s1.double() / n / 255
    std = (s2.double() / n / 255 ** 2 - mean ** 2).sqrt()
    assert torch.allclose(norm.mean.double(), mean, atol=1e-6)
    assert torch.allclose(norm.std.double(), std, atol=1e-6)
    # Normalised training pixels: mean 0, std 1 per channel.
    assert torch.allclose(y1 / n, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose((y2 / n - (y1 / n) ** 2).sqrt(), torch.ones(3, dtype=torch.float64), atol=1e-5)
    batch = s.val.images[:64]
    assert torch.allclose(norm.denormalize(norm.normalize(batch)), batch.float() / 255, atol=1e-6)
    # Round trip through plain data.
    again = Normalizer.from_dict(norm.to_dict())
    assert torch.equal(again.mean, norm.mean) and torch.equal(again.std, norm.std)


def test_normalizer_formula_and_device_agnostic():
    norm = Normalizer([0.25, 0.5], [0.5, 0.25])
    x = torch.tensor([0, 51, 255, 128], dtype=torch.uint8).view(1, 2, 1, 2)
    y = norm.normalize(x)
    expected = (x.double() / 255 - torch.tensor([0.25, 0.5]).double().view(1, 2, 1, 1)) \
        / torch.tensor([0.5, 0.25]).double().view(1, 2, 1, 1)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), expected, atol=1e-6)
    assert norm.denormalize(torch.full((1, 2, 1, 1), 100.0)).max() == 1.0  # clamped
    assert norm.denormalize(torch.full((1, 2, 1, 1), -100.0)).min() == 0.0
    with pytest.raises(TypeError, match="uint8"):
        norm.normalize(x.float())
    with pytest.raises(ValueError, match="2 channel"):
        norm.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        out = norm.normalize(x.to(dev))
        assert out.device.type == dev and torch.allclose(out.cpu(), y)


def test_faces_normalizer_maps_to_minus_one_one():
    norm = Normalizer.unit_range(3)
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2).contiguous()
    y = norm.normalize(x)
    assert torch.all(y[..., 0] == -1.0) and torch.all(y[..., 1] == 1.0)
    assert torch.all(norm.denormalize(y) == x.float() / 255)


@needs_shared_utk
def test_utkface_resized_to_32_and_unit_range():
    s = load_splits("utkface64", image_size=32)
    assert (len(s.train), len(s.val), len(s.test)) == (4608, 1152, 640)
    assert s.train.images.shape[1:] == (3, 32, 32) and s.train.images.dtype == torch.uint8
    assert s.normalizer.to_dict()["mean"] == [0.5] * 3 and s.normalizer.to_dict()["std"] == [0.5] * 3
    y = s.normalizer.normalize(s.test.images)
    assert y.min() >= -1 and y.max() <= 1
    # Downscale by 2 = the 2x2 box average given in the dataset README (rounded half to even).
    full = load_splits("utkface64")
    box = full.test.images.double().reshape(-1, 3, 32, 2, 32, 2).mean((3, 5)).round()
    assert torch.equal(s.test.images.double(), box)


def test_resize_non_integer_factor_is_antialiased():
    x = torch.zeros(1, 1, 30, 30, dtype=torch.uint8)
    x[..., ::2] = 255  # one-pixel stripes: antialiasing must average them to grey, not alias
    y = kd.resize_uint8(x, 12)
    assert y.shape == (1, 1, 12, 12) and y.dtype == torch.uint8
    assert (y.float() - 127.5).abs().max() < 30
    assert kd.resize_uint8(x, 30) is x


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------
def make_tree(root: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = {"a.png": (40, 30), "sub/b.JPG": (64, 64), "sub/deeper/c.jpeg": (20, 50), "d.bmp": (33, 17)}
    for rel, (w, h) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(p)
    Image.fromarray(np.full((10, 10), 77, dtype=np.uint8), mode="L").save(root / "grey.png")  # -> RGB
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_loads_resizes_and_caches(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "imgs")
    calls = []
    real = kfolder._decode_files
    monkeypatch.setattr(kfolder, "_decode_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = load_splits(f"folder:{root}", image_size=16, val_fraction=0.4)
    assert len(s.train) + len(s.val) == 5 and len(s.val) == 2 and s.test is None
    assert s.train.images.shape[1:] == (3, 16, 16) and s.train.labels is None
    assert s.normalizer.to_dict()["mean"] == [0.5] * 3
    # grey.png is the 5th file in sorted order (a.png, d.bmp, grey.png, sub/b.JPG, sub/deeper/c.jpeg)
    full = torch.cat([s.train.images, s.val.images])[torch.cat([s.train.indices, s.val.indices]).argsort()]
    assert torch.all(full[2] == 77)
    assert len(calls) == 1 and s.info["cache"] == "built"
    cache_file = Path(s.info["cache_path"]).with_suffix(".x.npy")
    mtime = cache_file.stat().st_mtime_ns

    again = load_splits(f"folder:{root}", image_size=16, val_fraction=0.4)
    assert len(calls) == 1 and again.info["cache"] == "hit" and cache_file.stat().st_mtime_ns == mtime
    assert torch.equal(again.train.images, s.train.images)

    other_size = load_splits(f"folder:{root}", image_size=8)
    assert len(calls) == 2 and other_size.train.images.shape[1:] == (3, 8, 8)

    from PIL import Image
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "a.png")  # file changes -> new key
    changed = load_splits(f"folder:{root}", image_size=16, val_fraction=0.4)
    assert len(calls) == 3 and changed.info["cache"] == "built"
    full = torch.cat([changed.train.images, changed.val.images])[
        torch.cat([changed.train.indices, changed.val.indices]).argsort()]
    assert torch.all(full[0] == 0)


def test_folder_squashes_to_image_size_and_skips_unreadable(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, 20:] = 255  # right half white: stays the right half after squashing to a square
    Image.fromarray(img).save(root / "wide.png")
    Image.fromarray(img).save(root / "wide2.webp", lossless=True)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable image file"):
        s = load_splits(f"folder:{root}", image_size=256, val_fraction=0.5)
    assert len(s.train) + len(s.val) == 2
    x = s.train.images[0]
    assert x.shape == (3, 256, 256)
    assert x[:, :, :120].max() < 10 and x[:, :, 136:].min() > 245
    assert s.info["train_info"]["skipped"] == ["broken.jpg"]


def test_folder_train_test_subfolders(tmp_path):
    root = tmp_path / "ds"
    make_tree(root / "train")
    make_tree(root / "val")
    s = load_splits(f"folder:{root}", image_size=12, val_fraction=0.2)
    assert len(s.train) == 4 and len(s.val) == 1 and len(s.test) == 5
    assert s.test.images.shape == (5, 3, 12, 12)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        load_splits(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        load_splits(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(kd.DatasetCorruptError, match="none of the 1 image files could be read"):
        load_splits(f"folder:{tmp_path / 'bad'}")  # its own size: no header can be read
    with pytest.warns(RuntimeWarning), pytest.raises(kd.DatasetCorruptError, match="none of the 1 image files"):
        load_splits(f"folder:{tmp_path / 'bad'}", image_size=8)


# ---------------------------------------------------------------------------------------------------------------
# Names and missing data
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        load_splits("imagenet21k")
    for n in DATASETS:
        assert n in str(e.value)
    assert "folder:PATH" in str(e.value)
    assert set(DATASETS) == {"cifar10", "utkface64", "mnist", "sample"}


@pytest.mark.parametrize("name", ["cifar10", "utkface64", "mnist"])
def test_missing_dataset_message_lists_paths_and_fix(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as e:
        load_splits(name, data_dir=tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert name in msg and str(tmp_path / name) in msg and str(tmp_path) in msg
    assert "--data-dir" in msg and "KOHONEN_VAE_DATA" in msg
    if name == "cifar10":
        assert "download=True" in msg and "data_batch_1" in msg and "train_1.npz" in msg


def test_env_var_root_is_used(tmp_path, monkeypatch):
    xs, ys = fake_cifar_arrays(seed=3)
    write_npz_layout(tmp_path / "cifar10", xs, ys)
    monkeypatch.setenv("KOHONEN_VAE_DATA", str(tmp_path))
    s = load_splits("cifar10")
    assert s.info["source"] == str((tmp_path / "cifar10").resolve())
    monkeypatch.setenv("KOHONEN_VAE_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        load_splits("cifar10")


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        load_splits("sample", val_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        load_splits("sample", image_size=0)


def test_splits_from_config_is_load_splits_with_config_defaults():
    from kohonen_vae.data import splits_from_config
    a = splits_from_config({"name": "sample", "val_fraction": 0.1, "split_seed": 3})
    b = load_splits("sample", val_fraction=0.1, split_seed=3)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    c = splits_from_config({"name": "sample"})  # defaults: val_fraction 0.2, split_seed 0
    assert len(c.val) == 600 and torch.equal(c.val.images, load_splits("sample").val.images)
    assert not torch.equal(a.val.images[:100], c.val.images[:100])  # the seed and fraction were used
    with pytest.raises(ValueError, match="data.name"):
        splits_from_config({"image_size": 32})
    # a raw config (reproduce) and a normalised one (training) must draw the same split: the defaults agree
    import inspect
    from kohonen_vae.training.config import DEFAULTS
    params = inspect.signature(load_splits).parameters
    for key in ("val_fraction", "split_seed", "download", "image_size", "data_dir"):
        assert DEFAULTS["data"][key] == params[key].default, key


# ---------------------------------------------------------------------------------------------------------------
# Bundled sample
# ---------------------------------------------------------------------------------------------------------------
def test_bundled_sample(monkeypatch, tmp_path):
    monkeypatch.setenv("KOHONEN_VAE_DATA", str(tmp_path / "nothing-here"))  # must not need any data root
    assert SAMPLE_PATH.stat().st_size < 9_000_000
    s = load_splits("sample")
    assert (len(s.train), len(s.val), len(s.test)) == (2400, 600, 500)
    assert s.train.images.shape[1:] == (3, 32, 32) and s.train.images.dtype == torch.uint8
    labels = torch.cat([s.train.labels, s.val.labels])
    assert torch.bincount(labels, minlength=10).tolist() == [300] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [50] * 10
    # Standardised with its own train statistics.
    y = s.normalizer.normalize(s.train.images)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    # Members are LZMA-compressed like the shared archives.
    with zipfile.ZipFile(SAMPLE_PATH) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
    resized = load_splits("sample", image_size=16)
    assert resized.test.images.shape == (500, 3, 16, 16)


@needs_shared_cifar
def test_sample_pixels_are_real_cifar(cifar_splits):
    with np.load(SAMPLE_PATH) as z:
        idx, x = z["train_index"], z["x_train"]
    s = cifar_splits
    full = torch.cat([s.train.images, s.val.images])[torch.cat([s.train.indices, s.val.indices]).argsort()]
    assert torch.equal(full[torch.from_numpy(idx[:50].astype(np.int64))],
                       torch.from_numpy(x[:50].transpose(0, 3, 1, 2).copy()))


# ---------------------------------------------------------------------------------------------------------------
# Download (no network: a fake tarball served through the URL-opener hook)
# ---------------------------------------------------------------------------------------------------------------
def fake_tarball(tmp_path: Path, xs, ys) -> bytes:
    src = tmp_path / "src"
    write_pickle_layout(src / "cifar-10-batches-py", xs, ys)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


def test_download_verifies_md5_and_extracts(tmp_path, monkeypatch):
    xs, ys = fake_cifar_arrays(seed=4)
    blob = fake_tarball(tmp_path, xs, ys)
    opened = []
    monkeypatch.setattr(kcifar, "_urlopen", lambda url: opened.append(url) or io.BytesIO(blob))
    monkeypatch.setattr(kcifar, "CIFAR10_MD5", hashlib.md5(blob).hexdigest())
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError):
        load_splits("cifar10", data_dir=root)  # download is opt-in
    s = load_splits("cifar10", data_dir=root, download=True, val_fraction=0.0)
    assert opened == [kcifar.CIFAR10_URL]
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert torch.equal(s.train.images, torch.from_numpy(np.concatenate(xs[:5]).transpose(0, 3, 1, 2).copy()))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp leftovers
    load_splits("cifar10", data_dir=root, download=True)
    assert len(opened) == 1  # found on disk: no second download


def test_download_keeps_an_incomplete_copy_aside(tmp_path, monkeypatch):
    xs, ys = fake_cifar_arrays(seed=6)
    blob = fake_tarball(tmp_path, xs, ys)
    monkeypatch.setattr(kcifar, "_urlopen", lambda url: io.BytesIO(blob))
    monkeypatch.setattr(kcifar, "CIFAR10_MD5", hashlib.md5(blob).hexdigest())
    root = tmp_path / "data"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"user's partial copy")
    s = load_splits("cifar10", data_dir=root, download=True)
    assert len(s.test) == 6
    aside = [p for p in root.iterdir() if p.name.startswith("cifar-10-batches-py.incomplete-")]
    assert len(aside) == 1 and (aside[0] / "data_batch_1").read_bytes() == b"user's partial copy"


def test_download_checksum_mismatch_raises_and_leaves_nothing(tmp_path, monkeypatch):
    xs, ys = fake_cifar_arrays(seed=5)
    blob = fake_tarball(tmp_path, xs, ys)
    monkeypatch.setattr(kcifar, "_urlopen", lambda url: io.BytesIO(blob))  # real md5 stays -> mismatch
    root = tmp_path / "data"
    with pytest.raises(kd.ChecksumError, match="md5"):
        load_splits("cifar10", data_dir=root, download=True)
    assert list(root.iterdir()) == []


def test_unpickler_refuses_foreign_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(kd.DatasetCorruptError, match="refusing") as e:
        kcifar.read_pickle_batch(p)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError) and str(p) in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Cache housekeeping (`kohonen-vae cache`)
# ---------------------------------------------------------------------------------------------------------------
def test_cache_list_and_prune_touch_only_our_files(monkeypatch, tmp_path):
    import os
    import time

    from kohonen_vae.cli import main
    from kohonen_vae.data import cache

    monkeypatch.setenv(cache.ENV_CACHE, str(tmp_path))
    now = time.time()
    old_key, new_key = "a" * 20, "b" * 20
    cache.save_entry("cifar10", old_key, {"x": np.zeros((4, 3), np.uint8), "y": np.arange(4)})
    cache.save_entry("folder", new_key, {"x": np.ones((2, 2), np.uint8)})
    for p in tmp_path.glob(f"cifar10-{old_key}*"):  # last written / used 40 days ago
        os.utime(p, (now - 40 * 86400, now - 40 * 86400))
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not ours")
    orphan = tmp_path / f"mnist-{'c' * 20}.x.npy"  # named like a member, but no index records it: not ours
    orphan.write_bytes(b"\x00" * 10)
    os.utime(orphan, (now - 2 * 86400, now - 2 * 86400))
    fresh_temp = tmp_path / ".cifar10-xyz.json.abc.tmp"  # a write in progress right now
    fresh_temp.write_bytes(b"\x00")

    entries = cache.list_entries()
    assert [e["name"] for e in entries] == [f"folder-{new_key}", f"cifar10-{old_key}"]  # most recent first
    assert len(entries[1]["files"]) == 3 and entries[1]["bytes"] == sum(p.stat().st_size for p in entries[1]["files"])

    # loading an entry counts as a use: it is no longer 40 days old
    assert cache.load_entry("cifar10", old_key) is not None
    assert cache.remove_entries(older_than_days=30) == (0, 0)  # (the orphan is 2 days old: kept too)
    for p in tmp_path.glob(f"cifar10-{old_key}*"):
        os.utime(p, (now - 40 * 86400, now - 40 * 86400))
    removed, freed = cache.remove_entries(older_than_days=30)
    assert removed == 3 and freed > 0
    assert [e["name"] for e in cache.list_entries()] == [f"folder-{new_key}"]
    assert orphan.exists() and foreign.exists() and fresh_temp.exists()

    assert main(["cache", "--clear"]) == 0
    assert cache.list_entries() == []
    assert foreign.exists() and fresh_temp.exists() and orphan.exists()  # none of them recorded by an index
    assert main(["cache"]) == 0
    assert main(["cache", "--older-than", "-1"]) != 0  # a clear error, not a crash


def test_cache_listing_of_a_missing_folder(monkeypatch, tmp_path):
    from kohonen_vae.data import cache
    monkeypatch.setenv(cache.ENV_CACHE, str(tmp_path / "never-created"))
    assert cache.list_entries() == [] and cache.remove_entries() == (0, 0)
    assert not (tmp_path / "never-created").exists()
