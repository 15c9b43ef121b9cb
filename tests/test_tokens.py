"""Tokens: model.encode/decode_indices, token files (encode_dataset / decode_tokens), safetensors export and
load_pretrained, and that no path ever unpickles a file."""
import argparse
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kohonen_vae import export as export_mod
from kohonen_vae import tokens as tokens_mod
from kohonen_vae.data import load_splits
from kohonen_vae.export import (
    SafetensorsError,
    export_run,
    load_pretrained,
    load_safetensors,
    load_tokenizer,
    save_safetensors,
)
from kohonen_vae.models import build_model
from kohonen_vae.models.factory import ConfigError
from kohonen_vae.tokens import (
    decode_tokens,
    encode_dataset,
    load_tokens,
    to_uint8,
    token_dtype,
)
from kohonen_vae.training import apply_overrides, load_config_file, load_model, train

FAST = ["train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2", "train.test_at_end=false"]


def _train(out, *overrides):
    train(apply_overrides(load_config_file("tiny"), FAST + list(overrides)), out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs on the bundled sample: ``a`` (K = 32), ``b`` (same config, another seed), ``k64`` (K = 64)."""
    root = tmp_path_factory.mktemp("runs")
    return {"a": _train(root / "a", "train.max_steps=4"),
            "b": _train(root / "b", "train.max_steps=1", "seed=1"),
            "k64": _train(root / "k64", "train.max_steps=1", "model.quantizer.codebook_size=64")}


@pytest.fixture(scope="module")
def sample():
    return load_splits("sample")


def _tiny_model(arch):
    torch.manual_seed(0)
    return build_model({"arch": arch, "channels": 16, "res_channels": 4, "num_res_blocks": 1, "embed_dim": 8,
                        "quantizer": {"type": "ksom", "neighborhood": "hard", "codebook_size": 300}})


class Evil:
    """Unpickling this creates ``path``: the stand-in for a pickle that runs arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# -- model API ----------------------------------------------------------------------------------------------------------
def test_token_dtype_is_the_smallest_unsigned_that_holds_k_minus_1():
    for k in (1, 2, 255, 256, 257, 4096, 65_535, 65_536, 65_537, 2**32, 2**32 + 1):
        expected = np.min_scalar_type(k - 1)  # numpy's own smallest type for the largest index
        assert token_dtype(k) == expected, k
    assert token_dtype(256) == np.uint8 and token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


@pytest.mark.parametrize("arch,size", [("vqvae", 16), ("vqvae2", 64)])
def test_decode_of_encode_is_the_reconstruction_bit_for_bit(arch, size):
    model = _tiny_model(arch)
    x = torch.randn(5, 3, size, size)
    model(x)  # one training update: the codebook is no longer its initialisation
    model.train()
    idx = model.encode(x)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert [tuple(i.shape) for i in idx] == [(5, *s) for s in model.latent_shapes(size)]
    assert all(i.dtype == torch.long and int(i.max()) < 300 for i in idx)
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    for a, b in zip(idx, out.indices):
        assert torch.equal(a, b)
    recon = model.decode_indices(idx)
    assert torch.equal(recon, out.reconstruction)  # bit for bit, not just close
    # token-file dtypes (uint16 for K = 300, numpy) decode to the same images
    as_file = [i.numpy().astype(np.uint16) for i in idx]
    assert torch.equal(model.decode_indices(as_file), recon)
    # in batches: each batch exactly as decoded alone (CPU kernels depend on the batch size, so only close to
    # the one-batch result)
    batched = model.decode_indices(as_file, batch_size=2)
    assert torch.equal(batched, torch.cat([model.decode_indices([i[s:s + 2] for i in as_file]) for s in range(0, 5, 2)]))
    torch.testing.assert_close(batched, recon, rtol=1e-5, atol=1e-6)
    # batched encode = per-chunk encodes
    chunks = [model.encode(x[s:s + 2]) for s in range(0, 5, 2)]
    assert all(torch.equal(a, torch.cat([c[lv] for c in chunks])) for lv, a in enumerate(model.encode(x, batch_size=2)))
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        model.decode_indices([torch.full_like(i, 300) for i in idx])
    if arch == "vqvae2":
        with pytest.raises(ValueError, match="one image size"):
            model.decode_indices([idx[0], idx[1][:, :8, :8]])


# -- token files --------------------------------------------------------------------------------------------------------
def test_encode_dataset_and_decode_tokens_round_trip(runs, sample, tmp_path):
    run = runs["a"]
    path = tmp_path / "tokens.npz"
    summary = encode_dataset(run, split="test", out=path, batch_size=64, progress=False)
    assert summary["count"] == 500 and summary["images_per_s"] > 0
    with np.load(path, allow_pickle=False) as z:  # a plain numpy archive
        assert z["indices_bottom"].dtype == np.uint8 and z["indices_bottom"].shape == (500, 8, 8)
        assert list(z["ids"][:3]) == ["test/0", "test/1", "test/2"]
        assert np.array_equal(z["source_index"], np.arange(500))
        stored = z["indices_bottom"]
    tf = load_tokens(path)
    assert isinstance(tf.indices[0], np.memmap) and np.array_equal(tf.indices[0], stored)
    tok = load_tokenizer(run)
    assert tf.meta["config_hash"] == tok.config_hash and tf.meta["weights_hash"] == tok.weights_hash
    assert tf.meta["levels"][0]["codebook_size"] == 32 and tf.meta["levels"][0]["grid"]["shape"] == [8, 4]

    # independently: the trained model on the test images, normalised with the run's normaliser
    model, _ = load_model(run)
    norm = tok.normalizer
    assert norm.to_dict() == sample.normalizer.to_dict()
    images = sample.test.images
    with torch.no_grad():
        outs = [model(norm.normalize(images[s:s + 64])) for s in range(0, 500, 64)]
    assert np.array_equal(stored, torch.cat([o.indices[0] for o in outs]).numpy())
    assert len(np.unique(stored)) > 1  # so the comparison above can fail

    dec = decode_tokens(run, path, tmp_path / "decoded", batch_size=64, progress=False)
    assert dec["count"] == 500
    out = tmp_path / "decoded"
    expected = torch.cat([to_uint8(o.reconstruction, norm) for o in outs]).numpy()
    for i in range(0, 500, 37):
        png = np.asarray(Image.open(out / f"{i:05d}.png")).transpose(2, 0, 1)
        assert np.array_equal(png, expected[i]), i  # decode(encode(x)) = the model's reconstruction, bit for bit
    manifest = json.loads((out / "decoded.json").read_text())
    assert [m["id"] for m in manifest["images"]] == [f"test/{i}" for i in range(500)]
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape == (8 * 34 - 2, 8 * 34 - 2, 3)
    assert np.array_equal(sheet[34:66, 68:100].transpose(2, 0, 1), expected[8 + 2])  # row 1, column 2
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i:05d}.png" for i in range(500)]
                                                           + ["contact_sheet.png", "decoded.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left

    # an existing output folder is never written into
    with pytest.raises(ConfigError, match="not an empty folder"):
        decode_tokens(run, path, out, progress=False)
    # a token file is replaced by a new encode, anything else at --out is refused untouched
    encode_dataset(run, split="val", out=path, batch_size=256, progress=False)
    assert len(load_tokens(path)) == 600
    other = tmp_path / "mine.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(ConfigError, match="not a kohonen-vae token file"):
        encode_dataset(run, split="val", out=other, progress=False)
    assert np.array_equal(np.load(other)["x"], np.arange(3))


def _png(path, chw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(chw.numpy().transpose(1, 2, 0))).save(path)


def test_encode_folder_keeps_file_order_and_ids(runs, sample, tmp_path, monkeypatch):
    monkeypatch.setenv("KOHONEN_VAE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "photos"
    train_files = ["train/b/02.png", "train/a/10.png", "train/a/09.png", "train/c.png", "train/b/01.png",
                   "train/z/00.png", "train/a/11.png", "train/m.png", "train/b/03.png", "train/d.png"]
    for i, name in enumerate(train_files + ["test/x.png", "test/w.png"]):  # created in an unsorted order
        _png(root / name, sample.test.images[i])
    (root / "train" / "broken.png").write_bytes(b"not an image")  # skipped by the data layer
    out = tmp_path / "folder.npz"
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        encode_dataset(runs["a"], data=f"folder:{root}", split="all", out=out, batch_size=4, progress=False)
    tf = load_tokens(out)
    expected_ids = sorted(train_files) + ["test/w.png", "test/x.png"]
    assert list(tf.ids) == expected_ids
    assert list(tf.source_index) == list(range(10)) + [0, 1]
    # each row holds the tokens of the file it names, computed straight from that file
    tok = load_tokenizer(runs["a"])
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(root / i)).transpose(2, 0, 1).copy())
                          for i in expected_ids])
    direct = tok.model.encode(tok.normalizer.normalize(pixels))[0].numpy()
    assert np.array_equal(tf.indices[0], direct)
    creation_order = [expected_ids.index(n) for n in train_files] + [11, 10]
    assert not np.array_equal(direct[creation_order], direct)  # the file order matters, so the check can fail
    # the val split: the run's fixed-seed 20% of the training files, in file order
    encode_dataset(runs["a"], data=f"folder:{root}", split="val", out=out, progress=False)
    val = load_tokens(out)
    assert list(val.ids) == [sorted(train_files)[i] for i in val.source_index] and len(val) == 2
    assert list(val.source_index) == sorted(val.source_index)
    # a flat folder has no test split
    flat = tmp_path / "flat"
    _png(flat / "one.png", sample.test.images[0])
    with pytest.raises(ConfigError, match="no test set"):
        encode_dataset(runs["a"], data=f"folder:{flat}", split="test", out=tmp_path / "t.npz", progress=False)


def test_tokens_of_another_run_or_k_are_refused(runs, tmp_path):
    path = tmp_path / "a.npz"
    encode_dataset(runs["a"], split="test", out=path, progress=False)
    a, b, k64 = (load_tokenizer(runs[n]) for n in ("a", "b", "k64"))
    assert a.config_hash == b.config_hash != k64.config_hash and a.weights_hash != b.weights_hash
    with pytest.raises(ConfigError) as e:
        decode_tokens(runs["b"], path, tmp_path / "out-b", progress=False)
    assert f"weights hash {a.weights_hash[:12]} (token file) vs {b.weights_hash[:12]}" in str(e.value)
    assert str(runs["a"]) in str(e.value)  # names the tokenizer that made them
    with pytest.raises(ConfigError) as e:
        decode_tokens(runs["k64"], path, tmp_path / "out-k", progress=False)
    assert f"config hash {a.config_hash[:12]} (token file) vs {k64.config_hash[:12]}" in str(e.value)
    assert "K of level 'bottom' 32 vs 64" in str(e.value)
    assert not (tmp_path / "out-b").exists() and not (tmp_path / "out-k").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_interrupted_encode_leaves_no_token_file(runs, tmp_path, monkeypatch):
    out = tmp_path / "tokens.npz"
    stale = tmp_path / ".tokens.npz.999999999-abcdefgh.tmp"  # what a process killed earlier left behind
    stale.write_bytes(b"partial")
    foreign = tmp_path / ".tokens.npz.notes.tmp"
    foreign.write_bytes(b"someone else's")
    calls = []
    from kohonen_vae.models.vqvae import VQVAE

    original = VQVAE.encode

    def encode_then_interrupt(self, images, batch_size=None):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, images, batch_size)

    monkeypatch.setattr(VQVAE, "encode", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(runs["a"], split="test", out=out, batch_size=100, progress=False)
    assert calls == [100, 100]
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]  # no output, no temporaries, stale gone


def test_killed_encode_leaves_only_temporaries_that_the_next_one_removes(runs, tmp_path):
    out = tmp_path / "tokens.npz"
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import time, torch
        from kohonen_vae.models.vqvae import VQVAE
        from kohonen_vae.tokens import encode_dataset
        real = VQVAE.encode
        def slow(self, images, batch_size=None):
            out = real(self, images, batch_size)
            open({str(started)!r}, "w").close()
            time.sleep(60)
            return out
        VQVAE.encode = slow
        encode_dataset({str(runs["a"])!r}, split="test", out={str(out)!r}, batch_size=100, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 180
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert started.exists(), "the encode subprocess did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "started")
    assert not out.exists() and left and all(n.startswith(f".tokens.npz.{proc.pid}-") for n in left)
    encode_dataset(runs["a"], split="test", out=out, batch_size=250, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started", "tokens.npz"] and len(load_tokens(out)) == 500


# -- export -------------------------------------------------------------------------------------------------------------
def test_export_then_load_pretrained_gives_identical_outputs(runs, sample, tmp_path):
    run, exp = runs["a"], tmp_path / "export"
    export_run(run, exp)
    assert sorted(p.name for p in exp.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["format"] == "kohonen-vae-pretrained/1" and cfg["image_shape"] == [3, 32, 32]
    assert cfg["levels"][0]["codebook_size"] == 32 and cfg["levels"][0]["shape"] == [8, 8]
    assert cfg["data"]["name"] == "sample" and "data_dir" not in cfg["data"]

    original, _ = load_model(run)
    loaded = load_pretrained(exp)
    assert not loaded.training and loaded.normalizer.to_dict() == load_tokenizer(run).normalizer.to_dict()
    ref_state = original.state_dict()
    assert set(loaded.state_dict()) == set(ref_state)
    assert all(torch.equal(v, ref_state[k]) and v.dtype == ref_state[k].dtype for k, v in loaded.state_dict().items())
    x = loaded.normalizer.normalize(sample.test.images[:64])
    with torch.no_grad():
        a, b = original(x), loaded(x)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.indices[0], b.indices[0])
    # the export is the same tokenizer: tokens of the run decode with the export and vice versa
    encode_dataset(exp, split="test", out=tmp_path / "e.npz", progress=False)
    encode_dataset(run, split="test", out=tmp_path / "r.npz", progress=False)
    assert np.array_equal(load_tokens(tmp_path / "e.npz").indices[0], load_tokens(tmp_path / "r.npz").indices[0])
    decode_tokens(exp, tmp_path / "r.npz", tmp_path / "dec", contact_sheet=False, progress=False)
    assert not (tmp_path / "dec" / "contact_sheet.png").exists() and (tmp_path / "dec" / "00499.png").is_file()

    # re-export into our own export replaces it; any other file makes the folder off limits
    export_run(run, exp, checkpoint="last")
    assert json.loads((exp / "config.json").read_text())["source"]["checkpoint"] == "last"
    (exp / "notes.txt").write_text("mine")
    before = (exp / "config.json").read_bytes()
    with pytest.raises(ConfigError, match="notes.txt"):
        export_run(run, exp)
    assert (exp / "config.json").read_bytes() == before and (exp / "notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="not written by kohonen-vae export"):
        export_run(run, foreign)
    assert (foreign / "config.json").read_text() == '{"model_type": "bert"}'

    # damaged weights are detected
    data = bytearray((exp / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (exp / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="weights hash"):
        load_pretrained(exp)


def _sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "half": torch.randn(5, generator=g).half(),
            "bf": torch.randn(2, 3, generator=g).bfloat16(), "step": torch.tensor(7), "empty": torch.zeros(0, 3),
            "flags": torch.tensor([True, False, True]), "ids": torch.arange(6, dtype=torch.int32).reshape(2, 3),
            "u8": torch.arange(4, dtype=torch.uint8), "f64": torch.randn(2, dtype=torch.float64, generator=g)}


def test_safetensors_reader_and_writer_match_the_official_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = _sample_tensors()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(ours, tensors, metadata={"format": "pt", "note": "x"})
    st.save_file(tensors, str(theirs), metadata={"format": "pt"})
    for got in (st.load_file(str(ours)), load_safetensors(theirs)[0], load_safetensors(ours)[0]):
        assert set(got) == set(tensors)
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    from safetensors import safe_open

    with safe_open(str(ours), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
    assert load_safetensors(ours)[1] == {"format": "pt", "note": "x"}


def test_safetensors_reader_refuses_malformed_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors(good, _sample_tensors())
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])

    def variant(name, header_obj=None, body=None, length=None, text=None):
        if text is None:
            text = json.dumps(header_obj).encode() if header_obj is not None else raw[8:8 + n]
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text
                      + (raw[8 + n:] if body is None else body))
        return p

    cases = {
        "huge": (variant("huge", length=2**62), "exceeds the file"),
        "short": (variant("short", body=raw[8 + n:-1]), "outside the"),
        "trailing": (variant("trailing", body=raw[8 + n:] + bytes(8)), "cover"),
        "overlap": (variant("overlap", {**header, "u8b": header["u8"]}), "gap or overlap"),
        "dtype": (variant("dtype", {**header, "w": {**header["w"], "dtype": "OBJ"}}), "dtype 'OBJ'"),
        "shape": (variant("shape", {**header, "w": {**header["w"], "shape": [3, 5]}}), "do not hold shape"),
        "json": (variant("json", text=b"{'w': pickle}  "), "not JSON"),
        "list": (variant("list", [1, 2]), "not a JSON object"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(SafetensorsError, match=message):
            load_safetensors(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "pickle.safetensors")  # a pickle (zip) under the right name
    with pytest.raises(SafetensorsError):
        load_safetensors(tmp_path / "pickle.safetensors")


# -- pickles are never loaded -------------------------------------------------------------------------------------------
def test_no_path_ever_unpickles_a_file(runs, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    # the payload is live: loading it the unsafe way does create its marker
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Evil(live)))
    assert live.exists()
    torch.save(Evil(tmp_path / "live-torch"), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "live-torch").exists()

    # 1. an export folder with pickles beside (and instead of) the safetensors weights
    exp = tmp_path / "export"
    export_run(runs["a"], exp)
    torch.save(Evil(marker), exp / "pytorch_model.bin")
    torch.save(Evil(marker), exp / "model.pt")
    (exp / "model.pkl").write_bytes(pickle.dumps(Evil(marker)))
    forbidden = []

    def refuse(name):
        def f(*a, **k):
            forbidden.append(name)
            raise AssertionError(f"{name} called")
        return f

    with monkeypatch.context() as m:
        for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
            m.setattr(mod, name, refuse(f"{mod.__name__}.{name}"))
        model = load_pretrained(exp)
        tok_path = tmp_path / "t.npz"
        encode_dataset(exp, split="test", out=tok_path, progress=False)
        decode_tokens(exp, tok_path, tmp_path / "dec", contact_sheet=False, progress=False)
        load_tokens(tok_path)
    assert forbidden == [] and not model.training and not marker.exists()
    (exp / "model.safetensors").write_bytes((exp / "pytorch_model.bin").read_bytes())
    with pytest.raises(ConfigError):
        load_pretrained(exp)
    (exp / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="never loaded"):
        load_pretrained(exp)
    assert not marker.exists()

    # 2. a run whose checkpoint is a malicious pickle: every command refuses it with a clear error
    run = tmp_path / "evil-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text((runs["a"] / "config.json").read_text())
    for name in ("best.pt", "last.pt"):
        torch.save(Evil(marker), run / "checkpoints" / name)
    with pytest.raises(ConfigError, match="best.pt"):
        encode_dataset(run, split="test", out=tmp_path / "x.npz", progress=False)
    with pytest.raises(ConfigError, match="last.pt"):
        export_run(run, tmp_path / "x-export", checkpoint="last")
    with pytest.raises(ConfigError, match="best.pt"):
        decode_tokens(run, tok_path, tmp_path / "x-dec", progress=False)
    assert not marker.exists()

    # 3. a token file whose arrays are pickled objects
    evil_tokens = tmp_path / "evil.npz"
    with np.load(tok_path) as z:
        meta = z["meta"]
    np.savez(evil_tokens, meta=meta, ids=np.array([Evil(marker)], dtype=object),
             source_index=np.zeros(1, np.int64), indices_bottom=np.array([Evil(marker)], dtype=object))
    with pytest.raises(ConfigError, match="not a kohonen-vae token file"):
        load_tokens(evil_tokens)
    with pytest.raises(ConfigError, match="not a kohonen-vae token file"):
        decode_tokens(runs["a"], evil_tokens, tmp_path / "y-dec", progress=False)
    assert not marker.exists()


# -- command line -------------------------------------------------------------------------------------------------------
def _parser():
    parser = argparse.ArgumentParser(prog="kohonen-vae")
    sub = parser.add_subparsers(dest="command")
    for name, (help_text, add, run) in {**tokens_mod.SUBCOMMANDS, "export": export_mod.SUBCOMMAND}.items():
        p = sub.add_parser(name, help=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def test_command_line_functions(runs, tmp_path, capsys):
    parser = _parser()

    def cli(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args._run(args)

    tok = tmp_path / "tokens.npz"
    assert cli("encode", runs["a"], "--split", "test", "--checkpoint", "last", "--out", tok, "--batch-size", "128") == 0
    printed = capsys.readouterr().out
    assert "encoded 500 images of sample/test" in printed and "images/s" in printed and "K = 32 (uint8)" in printed
    assert load_tokens(tok).meta["tokenizer"]["checkpoint"] == "last"
    assert cli("decode", runs["a"], tok, "--out", tmp_path / "dec", "--no-contact-sheet") == 0
    assert "decoded 500 images" in capsys.readouterr().out
    assert not (tmp_path / "dec" / "contact_sheet.png").exists() and len(list((tmp_path / "dec").glob("*.png"))) == 500
    assert cli("export", runs["a"], "--out", tmp_path / "exp") == 0
    assert "model.safetensors" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"must end in \.npz"):
        cli("encode", runs["a"], "--out", tmp_path / "tokens.bin")
    with pytest.raises(ConfigError, match="no checkpoint 'best'"):
        cli("encode", tmp_path / "dec", "--out", tmp_path / "t2.npz")
    with pytest.raises(SystemExit):
        parser.parse_args(["encode", str(runs["a"]), "--split", "everything", "--out", "x.npz"])
