"""Hardening of the data layer (issues "Hardening I" item 9 and "Hardening II" items 11-13):
the cache deletes only what its own index records, verifies its entries (size + checksum), folder
datasets visit each real file once and use the images' own size, damaged or crafted CIFAR files give one
clear error naming the file, and ``splits.info["fingerprint"]`` identifies the decoded data."""
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kohonen_vae.data import cache, load_splits
from kohonen_vae.data import cifar as kcifar
from kohonen_vae.data import folder as kfolder
from kohonen_vae.errors import ConfigError
from kohonen_vae.fileio import temp_file_pattern


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Every test has its own empty cache folder and ignores any user data setting."""
    d = tmp_path / "cache"
    monkeypatch.setenv("KOHONEN_VAE_CACHE", str(d))
    monkeypatch.delenv("KOHONEN_VAE_DATA", raising=False)
    return d


def corrupt_error():
    from kohonen_vae.data import DatasetCorruptError
    return DatasetCorruptError


def fake_cifar(n=4, seed=0):
    """6 batches (5 train + test) of ``n`` random NHWC uint8 images and their labels."""
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8) for _ in range(6)],
            [rng.integers(0, 10, size=n).astype(np.uint8) for _ in range(6)])


def write_npz_cifar(folder: Path, n=4, seed=0):
    """The shared numpy CIFAR-10 layout (``train_1..5.npz``, ``test.npz``) of :func:`fake_cifar`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in zip(kcifar.NPZ_FILES, *fake_cifar(n, seed)):
        np.savez(folder / name, x=x, y=y)


def write_pickle_cifar(folder: Path, n=4, seed=0):
    """The python CIFAR-10 layout of :func:`fake_cifar`: b'data' rows are 1024 R, 1024 G, 1024 B values."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in zip(kcifar.PICKLE_FILES, *fake_cifar(n, seed)):
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
             b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072)}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)


def age(paths, seconds):
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def entry_json(info) -> Path:
    return Path(info["cache_path"])


def member_file(info, member) -> Path:
    p = entry_json(info)
    return p.with_name(p.name[: -len(".json")] + f".{member}.npy")


# ---------------------------------------------------------------------------------------------------------------
# Item 9: the cache deletes only what its own index records
# ---------------------------------------------------------------------------------------------------------------
def test_clear_deletes_only_recorded_files_never_foreign_lookalikes(private_cache):
    from kohonen_vae.cli import main

    key = "a" * 20
    cache.save_entry("cifar10", key, {"x": np.arange(12, dtype=np.uint8).reshape(4, 3), "y": np.arange(4)})
    d = private_cache
    ours = sorted(d.iterdir())
    assert [p.name for p in ours] == [f"cifar10-{key}.json", f"cifar10-{key}.x.npy", f"cifar10-{key}.y.npy"]
    stale_temp = d / f".cifar10-{key}.x.npy.k3j9x0ab.tmp"  # atomic_write's temp of a recorded member, killed
    stale_temp.write_bytes(b"\0" * 7)
    assert temp_file_pattern(f"cifar10-{key}.x.npy").match(stale_temp.name)
    foreign = {
        "lookalike member": d / f"mnist-{'c' * 20}.x.npy",         # named like a member, no entry records it
        "lookalike json": d / f"folder-{'d' * 20}.json",           # named like an entry, not our JSON
        "lookalike json member": d / f"folder-{'d' * 20}.x.npy",
        "json list": d / f"utkface64-{'e' * 20}.json",
        "temp": d / ".x.tmp",
        "temp of a foreign name": d / ".notes.txt.abcdefgh.tmp",
        "temp like folder decode": d / ".folder-abcdefgh.npy.tmp",
        "plain": d / "notes.txt",
    }
    for what, p in foreign.items():
        p.write_text("[1, 2]" if what == "json list" else json.dumps({"members": {"x": {"file": "notes.txt"}}})
                     if what == "lookalike json" else "not ours")
    age(list(d.iterdir()), 10 * 86400)  # everything 10 days old: age alone never makes a file ours

    listed = cache.list_entries()
    assert [e["name"] for e in listed] == [f"cifar10-{key}"]
    assert sorted(listed[0]["files"]) == sorted(ours + [stale_temp])

    assert main(["cache", "--clear"]) == 0
    for what, p in foreign.items():
        assert p.exists(), f"--clear deleted a foreign file ({what}): {p.name}"
    assert not any(p.exists() for p in ours + [stale_temp])
    assert cache.list_entries() == []


def test_an_interrupted_write_is_an_entry_that_can_be_pruned(private_cache, monkeypatch):
    class Killed(BaseException):
        pass

    def killed_while_writing(path, array, chunk_bytes=0):
        if path.name.endswith(".y.npy"):  # the second member: as if SIGKILL struck inside atomic_write
            fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.write(fd, b"\x93NUMPY partial")
            os.close(fd)
            raise Killed()
        real(path, array, chunk_bytes)

    real = cache.atomic_save_npy
    monkeypatch.setattr(cache, "atomic_save_npy", killed_while_writing)
    key = "b" * 20
    with pytest.raises(Killed):
        cache.save_entry("mnist", key, {"x": np.zeros((3, 2), np.uint8), "y": np.zeros(3, np.uint8)})
    monkeypatch.setattr(cache, "atomic_save_npy", real)
    written = sorted(private_cache.iterdir())
    assert len(written) == 3  # the json (state "writing"), member x, the temp file of member y
    (entry,) = cache.list_entries()
    assert entry["name"] == f"mnist-{key}" and entry["state"] == "writing"
    assert sorted(entry["files"]) == written
    with pytest.warns(RuntimeWarning, match="incomplete"):
        assert cache.load_entry("mnist", key) is None  # never used

    assert cache.remove_entries() == (0, 0)  # may still be in progress in another process: spared for an hour
    assert sorted(private_cache.iterdir()) == written
    age(written, 2 * 3600)
    sizes = sum(p.stat().st_size for p in written)
    assert cache.remove_entries() == (3, sizes)
    assert list(private_cache.iterdir()) == []


def test_legacy_entries_without_checksums_are_listed_pruned_and_rebuilt(tmp_path, private_cache):
    write_npz_cifar(tmp_path / "cifar10", seed=1)
    first = load_splits("cifar10", data_dir=tmp_path)
    meta_path = entry_json(first.info)
    meta = json.loads(meta_path.read_text())
    # the format of kohonen_vae <= 0.x: shapes and dtypes only
    legacy = {"members": {m: {"shape": s["shape"], "dtype": s["dtype"]} for m, s in meta["members"].items()},
              "extra": {}}
    meta_path.write_text(json.dumps(legacy))
    (entry,) = cache.list_entries()
    assert entry["state"] == "legacy" and len(entry["files"]) == 5
    with pytest.warns(RuntimeWarning, match="no checksums"):
        again = load_splits("cifar10", data_dir=tmp_path)
    assert again.info["cache"] == "built" and torch.equal(again.train.images, first.train.images)
    assert cache.list_entries()[0]["state"] == "complete"
    assert all(len(m["sha256"]) == 64 for m in json.loads(meta_path.read_text())["members"].values())
    meta_path.write_text(json.dumps(legacy))
    removed, _ = cache.remove_entries()
    assert removed == 5 and list(private_cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Item 12: verified entries (size + checksum)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hashing", ["full", "sampled"])
def test_a_member_zeroed_at_the_same_size_is_detected_and_rebuilt(tmp_path, monkeypatch, hashing):
    if hashing == "sampled":  # every member above the full-hash limit: the sampled digest guards it
        monkeypatch.setattr(cache, "FULL_HASH_MAX_BYTES", 1024)
        monkeypatch.setattr(cache, "SAMPLE_BLOCKS", 8)
        monkeypatch.setattr(cache, "SAMPLE_BLOCK_BYTES", 512)
    write_npz_cifar(tmp_path / "cifar10", seed=2)
    first = load_splits("cifar10", data_dir=tmp_path)
    assert first.info["cache"] == "built"
    assert load_splits("cifar10", data_dir=tmp_path).info["cache"] == "hit"
    x = member_file(first.info, "x_train")
    record = json.loads(entry_json(first.info).read_text())["members"]["x_train"]
    assert record["bytes"] == x.stat().st_size and len(record["sha256"]) == 64
    assert ("sampled_sha256" in record) == (hashing == "sampled")
    size = x.stat().st_size
    with open(x, "r+b") as f:  # zero the pixels, keep the header: shape, dtype and size all still match
        f.seek(128)
        f.write(b"\0" * (size - 128))
    assert x.stat().st_size == size
    with pytest.warns(RuntimeWarning, match="checksum"):
        rebuilt = load_splits("cifar10", data_dir=tmp_path)
    assert rebuilt.info["cache"] == "built"
    assert torch.equal(rebuilt.train.images, first.train.images) and bool(rebuilt.train.images.any())
    assert load_splits("cifar10", data_dir=tmp_path).info["cache"] == "hit"


def test_sampled_digest_catches_any_damaged_range_longer_than_its_spacing(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SAMPLE_BLOCKS", 16)
    monkeypatch.setattr(cache, "SAMPLE_BLOCK_BYTES", 256)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 256, size=50_000, dtype=np.uint8).tobytes()
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    ref = cache.sampled_digest(p)
    spacing = (len(data) - 256) // 15
    for start in rng.integers(0, len(data) - spacing - 256, size=40):
        damaged = bytearray(data)
        damaged[start:start + spacing + 256] = bytes(spacing + 256)
        p.write_bytes(bytes(damaged))
        assert cache.sampled_digest(p) != ref, start
    p.write_bytes(data)
    assert cache.sampled_digest(p) == ref
    p.write_bytes(data + b"\0")  # the size is part of the digest
    assert cache.sampled_digest(p) != ref


# ---------------------------------------------------------------------------------------------------------------
# Item 12: folder datasets visit each real file (and directory) once
# ---------------------------------------------------------------------------------------------------------------
def save_png(path: Path, value: int, size=(8, 8)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_symlink_loop_and_duplicate_symlinks_count_each_image_once(tmp_path):
    root = tmp_path / "imgs"
    save_png(root / "a.png", 10)
    save_png(root / "b.png", 20)
    save_png(root / "sub" / "c.png", 30)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # sub/loop/sub/loop/... forever
    (root / "zz_alias").symlink_to(root / "sub", target_is_directory=True)  # the same folder twice
    (root / "dup.png").symlink_to(root / "a.png")  # the same file twice
    outside = tmp_path / "elsewhere" / "e.png"
    save_png(outside, 50)
    (root / "e_link.png").symlink_to(outside)  # a real file outside the tree: counted once
    files = kfolder.list_images(root)
    assert [p.relative_to(root).as_posix() for p in files] == ["a.png", "b.png", "e_link.png", "sub/c.png"]
    s = load_splits(f"folder:{root}", val_fraction=0.25)
    assert len(s.train) + len(s.val) == 4
    full = torch.cat([s.train.images, s.val.images])[torch.cat([s.train.indices, s.val.indices]).argsort()]
    assert [int(im[0, 0, 0]) for im in full] == [10, 20, 50, 30]


def test_held_out_folder_that_repeats_training_files_is_refused(tmp_path):
    root = tmp_path / "ds"
    save_png(root / "train" / "a.png", 1)
    save_png(root / "train" / "b.png", 2)
    save_png(root / "test" / "c.png", 3)
    (root / "test" / "a_again.png").symlink_to(root / "train" / "a.png")
    with pytest.raises(ConfigError, match=r"test/.*train/.*a_again\.png"):
        load_splits(f"folder:{root}")


# ---------------------------------------------------------------------------------------------------------------
# Item 13: data.image_size for folders: the images' own size, or one clear error, checked before decoding
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("decoded images although the size was invalid")
    monkeypatch.setattr(kfolder, "_decode_files", refuse)


def test_folder_of_one_square_size_keeps_it(tmp_path):
    root = tmp_path / "digits"
    rng = np.random.default_rng(0)
    from PIL import Image
    root.mkdir()
    pix = rng.integers(0, 256, size=(70, 28, 28, 3), dtype=np.uint8)  # enough files for the worker processes
    for i, p in enumerate(pix):
        Image.fromarray(p).save(root / f"{i:02d}.png")
    s = load_splits(f"folder:{root}", val_fraction=0.2)
    assert s.train.images.shape[1:] == (3, 28, 28) and s.info["image_shape"] == [3, 28, 28]
    full = torch.cat([s.train.images, s.val.images])[torch.cat([s.train.indices, s.val.indices]).argsort()]
    assert torch.equal(full, torch.from_numpy(pix.transpose(0, 3, 1, 2).copy()))  # not resampled at all
    assert s.info["image_size"] == 28 and s.info["image_size_from"] == "images"
    again = load_splits(f"folder:{root}", val_fraction=0.2)
    assert again.info["cache"] == "hit" and torch.equal(again.val.images, s.val.images)


def test_folder_of_mixed_sizes_asks_for_image_size_before_decoding(tmp_path, no_decoding):
    root = tmp_path / "mixed"
    save_png(root / "a.png", 1, (40, 30))
    save_png(root / "b.png", 1, (64, 64))
    save_png(root / "c.png", 1, (64, 64))
    save_png(root / "d" / "e.png", 1, (20, 50))
    with pytest.raises(ConfigError) as e:
        load_splits(f"folder:{root}")
    msg = str(e.value)
    assert "data.image_size" in msg and "64x64 (2 files)" in msg and "40x30" in msg and "20x50" in msg
    with pytest.raises(ConfigError, match="not square.*data.image_size"):
        load_splits(f"folder:{root / 'd'}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.5, "abc", True, 0, -3])
def test_invalid_image_size_is_refused_before_decoding(tmp_path, no_decoding, bad):
    save_png(tmp_path / "imgs" / "a.png", 1)
    with pytest.raises(ValueError, match="image_size"):
        load_splits(f"folder:{tmp_path / 'imgs'}", image_size=bad)


def test_check_shape_hook_sees_the_final_shape_before_decoding(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    for i in range(3):
        save_png(root / f"{i}.png", i, (30, 30))
    seen = []
    decoded = []
    real = kfolder._decode_files
    monkeypatch.setattr(kfolder, "_decode_files", lambda *a, **k: decoded.append(1) or real(*a, **k))

    def refuse(shape):
        seen.append(tuple(shape))
        raise ConfigError("30 is not a multiple of 4")
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_splits(f"folder:{root}", check_shape=refuse)
    assert seen == [(3, 30, 30)] and decoded == []
    s = load_splits(f"folder:{root}", image_size=16, check_shape=seen.append)
    assert seen[-1] == (3, 16, 16) and s.train.images.shape[1:] == (3, 16, 16) and decoded == [1]
    write_npz_cifar(tmp_path / "c" / "cifar10")
    load_splits("cifar10", data_dir=tmp_path / "c", image_size=8, check_shape=seen.append)
    assert seen[-1] == (3, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Item 11: damaged and crafted CIFAR files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_cifar_npz_names_the_file(tmp_path, damage):
    write_npz_cifar(tmp_path / "cifar10")
    bad = tmp_path / "cifar10" / "train_3.npz"
    blob = bad.read_bytes()
    bad.write_bytes(blob[: len(blob) // 2] if damage == "truncated" else bytes(np.random.default_rng(0).integers(
        0, 256, size=len(blob), dtype=np.uint8)))
    with pytest.raises(corrupt_error()) as e:
        load_splits("cifar10", data_dir=tmp_path)
    assert isinstance(e.value, ValueError) and str(bad) in str(e.value)
    assert "\n" not in str(e.value)


def test_damaged_shared_npz_names_the_file(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    np.savez(d / "train.npz", x=np.zeros((5, 28, 28), np.uint8), y=np.zeros(5, np.uint8))
    np.savez(d / "test.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, np.uint8))
    blob = (d / "test.npz").read_bytes()
    (d / "test.npz").write_bytes(blob[:-60])
    with pytest.raises(corrupt_error(), match=str(d / "test.npz")):
        load_splits("mnist", data_dir=tmp_path)


def test_truncated_cifar_pickle_names_the_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle_cifar(folder)
    bad = folder / "data_batch_2"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(corrupt_error(), match=str(bad)):
        load_splits("cifar10", data_dir=tmp_path)


class _TouchViaOs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _TouchViaOpen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_TouchViaOs, _TouchViaOpen])
def test_a_crafted_cifar_pickle_cannot_run_code(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle_cifar(folder)
    marker = tmp_path / "pwned"
    evil = {b"data": payload(marker), b"labels": [0]}
    blob = pickle.dumps(evil, protocol=2)
    pickle.loads(blob)  # the payload works when unpickled normally ...
    assert marker.exists()
    marker.unlink()
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(corrupt_error()) as e:  # ... but never through the CIFAR reader
        load_splits("cifar10", data_dir=tmp_path)
    assert str(folder / "test_batch") in str(e.value) and "refus" in str(e.value)
    assert not marker.exists()


def test_the_unpickler_allows_only_latin1_for_raw_bytes(tmp_path):
    import codecs
    p = tmp_path / "data_batch_1"
    # protocol 2 writes bytes as _codecs.encode(str, "latin1"); any other codec is not what CIFAR contains
    blob = pickle.dumps({b"data": b"abc", b"labels": []}, protocol=2)
    assert blob.count(b"latin1") == 1  # written once, then memoised
    p.write_bytes(blob.replace(b"latin1", b"rot_13"))
    assert pickle.loads(p.read_bytes())[codecs.encode("data", "rot_13")] == codecs.encode("abc", "rot_13")
    with pytest.raises(corrupt_error(), match="latin"):
        kcifar.read_pickle_batch(p)


# ---------------------------------------------------------------------------------------------------------------
# Item 11: a fingerprint of the decoded data, for refusing to resume on changed data
# ---------------------------------------------------------------------------------------------------------------
def test_fingerprint_identifies_the_decoded_data(tmp_path, monkeypatch):
    import shutil

    write_npz_cifar(tmp_path / "a" / "cifar10", seed=3)
    built = load_splits("cifar10", data_dir=tmp_path / "a")
    fp = built.info["fingerprint"]
    assert isinstance(fp, str) and len(fp) == 20 and int(fp, 16) >= 0
    hit = load_splits("cifar10", data_dir=tmp_path / "a", split_seed=5)
    assert hit.info["cache"] == "hit" and hit.info["fingerprint"] == fp
    # the same files elsewhere, copied (new mtimes), or in the other layout: the same data, the same fingerprint
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert load_splits("cifar10", data_dir=tmp_path / "b").info["fingerprint"] == fp
    write_pickle_cifar(tmp_path / "p" / "cifar-10-batches-py", seed=3)
    as_pickles = load_splits("cifar10", data_dir=tmp_path / "p")
    assert as_pickles.info["layout"] == "pickle" and as_pickles.info["fingerprint"] == fp
    # without the cache (unwritable) it is computed from the arrays: still the same
    monkeypatch.setattr(cache, "save_entry", lambda *a, **k: None)
    monkeypatch.setenv("KOHONEN_VAE_CACHE", str(tmp_path / "other-cache"))
    assert load_splits("cifar10", data_dir=tmp_path / "b").info["fingerprint"] == fp
    # one pixel changed: another fingerprint
    with np.load(tmp_path / "b" / "cifar10" / "test.npz") as z:
        x, y = z["x"].copy(), z["y"]
    x[3, 4, 5, 1] ^= 1
    np.savez(tmp_path / "b" / "cifar10" / "test.npz", x=x, y=y)
    assert load_splits("cifar10", data_dir=tmp_path / "b").info["fingerprint"] != fp
    assert len(load_splits("sample").info["fingerprint"]) == 20


def test_folder_fingerprint_covers_both_parts(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        save_png(root / "train" / f"{i}.png", i)
    save_png(root / "test" / "t.png", 9)
    fp = load_splits(f"folder:{root}").info["fingerprint"]
    assert load_splits(f"folder:{root}").info["fingerprint"] == fp  # from the cache
    save_png(root / "test" / "t.png", 8)
    assert load_splits(f"folder:{root}").info["fingerprint"] != fp
