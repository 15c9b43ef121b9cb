"""The trainer: learning, exact resume, crash-safe checkpoints, config validation, data parallelism,
deterministic sharded batches and both CIFAR-10 on-disk layouts."""
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kohonen_vae.training import (ConfigError, ResumeError, ShardedBatchSampler, apply_overrides, convergence_steps,
                                  evaluate, load_checkpoint, load_config_file, load_model, read_metrics, resolve_config,
                                  train)
from kohonen_vae import fileio
from kohonen_vae.training import checkpoint as checkpoint_mod

TIMING_FIELDS = {"step_time_s", "images_per_s", "time_s", "eval_time_s"}
FAST = ["train.log_every=5", "train.eval_every=5", "train.checkpoint_every=5", "train.max_steps=20"]


def tiny(*overrides):
    return apply_overrides(load_config_file("tiny"), FAST + list(overrides))


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 20-step run of the tiny config."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = train(tiny(), out)
    return out, summary


def test_run_directory_and_learning(reference_run):
    out, summary = reference_run
    assert sorted(p.name for p in out.iterdir()) == [".kohonen-vae-run", ".kohonen-vae.lock", "checkpoints",
                                                      "config.json", "data.json", "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]
    assert load_checkpoint(out / "checkpoints" / "last.prev.pt")["step"] == 15  # the fallback: the last but one
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == resolve_config(cfg) and cfg["train"]["max_steps"] == 20  # fully resolved and reloadable
    records = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in records if r["kind"] == "train"]
    val_recs = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20] and [r["step"] for r in val_recs] == [5, 10, 15, 20]
    for r in train_recs:
        assert r["loss"] == pytest.approx(r["recon"] + r["commitment"], rel=1e-6)
        assert len(r["perplexity"]) == 1 and r["lr"] == 3e-3
    # it learns: the reconstruction error falls
    assert train_recs[-1]["recon"] < train_recs[0]["recon"]
    assert val_recs[-1]["recon"] < 0.95 * val_recs[0]["recon"]
    # summary agrees with the records
    best = min(val_recs, key=lambda r: r["recon"])
    assert summary["best_val_recon"] == pytest.approx(best["recon"]) and summary["best_step"] == best["step"]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["test"]["images"] == 64 and summary["final_used_codes"] == val_recs[-1]["used_codes"]
    assert load_checkpoint(out / "checkpoints" / "best.pt")["step"] == best["step"]


def test_convergence_steps_by_hand():
    evals = [(1000, 2.0), (2000, 1.3), (3000, 1.15), (4000, 1.0), (5000, 1.05)]
    # best 1.0: +20% threshold 1.2 first met at 3000, +10% threshold 1.1 first met at 4000
    assert convergence_steps(evals) == {1.1: 4000, 1.2: 3000}
    assert convergence_steps([]) == {1.1: None, 1.2: None}


def test_resume_equals_uninterrupted_run(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    train(tiny("train.max_steps=10"), out)
    with pytest.raises(ResumeError, match="--resume"):
        train(tiny(), out)  # an existing run is never overwritten silently
    with pytest.raises(ResumeError, match="train.lr"):
        train(tiny("train.lr=0.01"), out, resume=True)
    train(tiny(), out, resume=True)  # max_steps may grow on resume
    assert deterministic(read_metrics(out / "metrics.jsonl")) == deterministic(read_metrics(ref_out / "metrics.jsonl"))
    a = load_checkpoint(out / "checkpoints" / "last.pt")
    b = load_checkpoint(ref_out / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 20 and a["sampler"] == b["sampler"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # weights, codebooks, EMA statistics, step counters


def test_crash_during_checkpoint_write_leaves_previous_loadable(reference_run, tmp_path, monkeypatch):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 15:
            f.write(b"\x80partial checkpoint" * 1000)  # bytes reach the disk, then the "process dies"
            raise OSError("simulated crash while writing the checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny(), out)
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 10
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left
    # metrics.jsonl already holds step 15: resuming drops what the checkpoint does not cover, ending identical
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 15
    train(tiny(), out, resume=True)
    assert deterministic(read_metrics(out / "metrics.jsonl")) == deterministic(read_metrics(ref_out / "metrics.jsonl"))


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint_mod.save_checkpoint(path, {"format": checkpoint_mod.FORMAT, "step": 1})

    def broken_replace(src, dst):
        raise OSError("simulated kill before rename")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="before rename"):
        checkpoint_mod.save_checkpoint(path, {"format": checkpoint_mod.FORMAT, "step": 2})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    # a torn metrics line (kill mid-append) is ignored by the reader
    (tmp_path / "m.jsonl").write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    assert read_metrics(tmp_path / "m.jsonl") == [{"kind": "train", "step": 1}]


def test_load_model_rebuilds_the_trained_model(reference_run):
    out, _ = reference_run
    model, info = load_model(out, which="last")
    assert not model.training and info.step == 20 and info.config["train"]["max_steps"] == 20
    from kohonen_vae.data import Normalizer, evaluation_subset, load_splits

    splits = load_splits("sample")
    norm = Normalizer.from_dict(json.loads((out / "data.json").read_text())["normalization"])
    images = evaluation_subset(splits.val.images, 64, seed=0)  # what training evaluated (val_max_images = 64)
    x = norm.normalize(images)
    with torch.no_grad():
        direct = F.mse_loss(model(x).reconstruction, x).item()
    # evaluate() computes the same MSE in batches (independent formulation: per-batch sums)
    result = evaluate(model, images, norm, batch_size=24, device=torch.device("cpu"))
    assert result["recon"] == pytest.approx(direct, rel=1e-5)
    last_val = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"][-1]
    assert result["recon"] == pytest.approx(last_val["recon"], rel=1e-5)  # the run's own final validation


def test_config_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match="Valid train keys:.*batch_size.*lr"):
        resolve_config({"train": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match="Valid top-level keys"):
        resolve_config({"optimizer": {}})
    with pytest.raises(ConfigError, match="not an option of the 'ema' quantizer"):
        resolve_config({"model": {"quantizer": {"type": "ema", "neighborhood": "hard"}}})
    with pytest.raises(ConfigError, match="unknown data.name 'cifar100'.*utkface64"):
        resolve_config({"data": {"name": "cifar100"}})
    with pytest.raises(ConfigError, match="train.batch_size"):
        resolve_config({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="at least 64"):  # vqvae2 on the 32x32 sample
        train(tiny("model.arch=vqvae2"), tmp_path / "v2")
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(tiny("train.batch_size=100000"), tmp_path / "big")


def test_sampler_shards_deterministically_and_resumes():
    single = ShardedBatchSampler(10, 4, seed=3)
    ranks = [ShardedBatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    batches = []
    for _ in range(5):  # 2 full batches per epoch (tail of 2 dropped), so this crosses epochs
        b = single.next_indices()
        assert torch.equal(torch.cat([s.next_indices() for s in ranks]), b)  # ranks' slices = the global batch
        batches.append(b)
    epoch0 = torch.cat(batches[:2])
    assert len(set(epoch0.tolist())) == 8  # no repeats within an epoch
    assert torch.equal(epoch0, single.permutation(0)[:8]) and not torch.equal(single.permutation(0), single.permutation(1))
    resumed = ShardedBatchSampler(10, 4, seed=3)
    fresh = ShardedBatchSampler(10, 4, seed=3)
    for _ in range(3):
        fresh.next_indices()
    resumed.load_state_dict(fresh.state_dict())
    assert torch.equal(resumed.next_indices(), batches[3])
    with pytest.raises(ValueError, match="divisible"):
        ShardedBatchSampler(10, 5, seed=0, rank=0, world_size=2)


def test_two_process_data_parallel_run(reference_run, tmp_path):
    """torchrun with 2 CPU ranks (gloo): identical replicas, one set of outputs, same curve as one process."""
    ref_out, _ = reference_run
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    env = {**os.environ, "KOHONEN_VAE_DUMP_RANK_STATES": str(dump), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kohonen_vae", "train", "--config", "tiny", "--out", str(out)] + sum([["--set", s] for s in FAST], [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        pytest.fail("the 2-process run did not finish in 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("done:") == 1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "dump"]
    assert sorted(p.name for p in out.iterdir()) == [".kohonen-vae-run", ".kohonen-vae.lock", "checkpoints",
                                                      "config.json", "data.json", "metrics.jsonl", "summary.json"]
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # both replicas identical (codebooks, EMA statistics, weights)
        assert torch.equal(r0[k], ckpt[k]), k
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # 2 ranks x 8 images = the same global batches as one process: the same curve up to float summation order
    ddp_val = [r["recon"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"]
    ref_val = [r["recon"] for r in read_metrics(ref_out / "metrics.jsonl") if r["kind"] == "val"]
    assert ddp_val == pytest.approx(ref_val, rel=2e-2)


def _fake_cifar(tmp_path, layout, per_file=24):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    if layout == "pickle":
        folder = root / "cifar10" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, per_file).tolist()}
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    else:
        folder = root / "cifar10"
        folder.mkdir(parents=True)
        for name in [f"train_{i}" for i in range(1, 6)] + ["test"]:
            np.savez(folder / f"{name}.npz", x=rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8),
                     y=rng.integers(0, 10, per_file, dtype=np.uint8))
    return root


@pytest.mark.parametrize("layout", ["pickle", "npz"])
def test_cifar10_layouts_through_the_trainer(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("KOHONEN_VAE_CACHE", str(tmp_path / "cache"))
    root = _fake_cifar(tmp_path, layout)
    cfg = tiny("data.name=cifar10", f"data.data_dir={root}", "train.max_steps=4", "train.eval_every=2")
    summary = train(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "data.json").read_text())
    assert info["layout"] == layout and info["sizes"] == {"train": 96, "val": 24, "test": 24}
    assert summary["steps"] == 4 and summary["test"]["images"] == 24 and summary["best_val_recon"] > 0


def test_tensorboard_request_without_the_package_is_a_clear_error(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="pip install 'kohonen-vae\\[tensorboard\\]'"):
        train(tiny("train.tensorboard=true", "train.max_steps=1"), tmp_path / "tb")


def test_bf16_autocast_tracks_fp32(tmp_path):
    fp32 = train(tiny("train.max_steps=2", "train.eval_every=2", "train.test_at_end=false"), tmp_path / "fp32")
    bf16 = train(tiny("train.max_steps=2", "train.eval_every=2", "train.test_at_end=false", "train.bf16=true"),
                 tmp_path / "bf16")
    assert bf16["best_val_recon"] == pytest.approx(fp32["best_val_recon"], rel=0.05)
    assert bf16["best_val_recon"] != fp32["best_val_recon"]  # autocast really changed the arithmetic


def test_deferred_codebook_updates_are_applied_once_per_step(tmp_path):
    """update_in_forward=False defers the KSOM update to after the optimiser step (apply_pending_updates);
    the loss uses the codes from before the update either way, so both runs must be identical."""
    common = ["train.max_steps=4", "train.eval_every=2", "train.log_every=2", "train.test_at_end=false"]
    now = train(tiny(*common), tmp_path / "in_forward")
    deferred = train(tiny(*common, "model.quantizer.update_in_forward=false"), tmp_path / "deferred")
    assert deferred["evals"] == now["evals"]
    a = load_checkpoint(tmp_path / "in_forward" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "deferred" / "checkpoints" / "last.pt")["model"]
    assert int(b["quantizers.0.step"]) == 4
    torch.testing.assert_close(a["quantizers.0.codebook"], b["quantizers.0.codebook"])
