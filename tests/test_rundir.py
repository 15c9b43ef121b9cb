"""Run directories (issue "Hardening I"): never touch a user's files, never resume from a wrong state.

Each test names the item of the issue it pins; each failed on the code before the fix."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from kohonen_vae.cli import main
from kohonen_vae.errors import CheckpointError, ConfigError, DiskFullError, ResumeError
from kohonen_vae.training import apply_overrides, load_checkpoint, load_config_file, read_metrics, train
from kohonen_vae.training import checkpoint as checkpoint_mod
from kohonen_vae.training.rundir import LOCK, RunLock, RunLockedError

TIMING_FIELDS = {"step_time_s", "images_per_s", "time_s", "eval_time_s"}
FAST = ["train.log_every=2", "train.eval_every=4", "train.checkpoint_every=4", "train.max_steps=12",
        "train.batch_size=8", "data.val_max_images=16", "data.test_max_images=16", "model.channels=16",
        "model.res_channels=4", "model.embed_dim=8", "quantizer.codebook_size=16"]


def tiny(*overrides):
    return apply_overrides(load_config_file("tiny"), FAST + list(overrides))


def deterministic(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(tiny(), out)
    return out


def snapshot(folder):
    """Every file's bytes, but our lock file (a refused run may take the lock to look, and writes its pid)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != LOCK}


# -- 2: --resume with last.pt missing must refuse, not start over -------------------------------------------
def test_resume_refuses_when_last_is_missing_but_results_exist(reference, tmp_path):
    out = tmp_path / "run"
    train(tiny("train.max_steps=8"), out)
    (out / "checkpoints" / "last.pt").unlink()
    (out / "checkpoints" / "last.prev.pt").unlink()
    before = snapshot(out)
    with pytest.raises(ResumeError, match="last.pt is missing.*best.pt.*metrics.jsonl"):
        train(tiny(), out, resume=True)
    assert snapshot(out) == before  # metrics.jsonl not truncated, best.pt not replaced


# -- 3: a folder that is not one of our runs is refused ------------------------------------------------------
def test_train_refuses_a_folder_holding_someone_elses_files(tmp_path):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "summary.json", "report.html", "data.json", "checkpoints/best.pt"):
        (out / name).write_text(f"user's {name}")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    for resume in (False, True):
        with pytest.raises(ResumeError, match="not a kohonen-vae run.*notes.txt"):
            train(tiny(), out, resume=resume)
    assert snapshot(out) == before
    # an empty folder is fine, a file is not a folder
    (tmp_path / "empty").mkdir()
    train(tiny("train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2"), tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train(tiny(), tmp_path / "file")


# -- 4: one writer at a time; a killed holder leaves no stale lock ------------------------------------------
def test_second_run_into_a_locked_folder_is_refused_and_kill9_frees_the_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out).acquire()
    try:
        with pytest.raises(RunLockedError, match=f"in use by another kohonen-vae run \\(pid {os.getpid()}"):
            train(tiny(), out)
    finally:
        holder.release()
    # a process that holds the lock and is killed with SIGKILL: the lock goes with it
    code = ("import sys, time; from kohonen_vae.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError):
        RunLock(out).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK).exists()  # the file stays (it is ours), the lock does not
    RunLock(out).acquire().release()


# -- 5: checksums: flipped bytes, truncation, garbage; the previous checkpoint is offered -------------------
def _flip_a_tensor_byte(path):
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x10]))


def test_damaged_checkpoints_are_detected_and_the_previous_one_resumes_exactly(reference, tmp_path):
    out = tmp_path / "run"
    train(tiny("train.max_steps=8"), out)
    last = out / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["step"] == 8 and load_checkpoint(out / "checkpoints" / "last.prev.pt")["step"] == 4
    good = last.read_bytes()
    _flip_a_tensor_byte(last)
    torch.load(last, weights_only=True)  # torch itself does not notice: that was the silent failure
    with pytest.raises(CheckpointError, match="last.pt is damaged: its content does not match its checksum.*"
                                              "last.prev.pt \\(step 4\\) is intact.*--resume-from previous"):
        train(tiny(), out, resume=True)
    for garbage in (good[: len(good) // 2], b"", b"\x00" * 100):
        last.write_bytes(garbage)
        with pytest.raises(CheckpointError, match="last.pt is damaged and cannot be read.*last.prev.pt"):
            load_checkpoint(last)
    # the CLI: one line, exit code 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "kohonen_vae", "train", "--resume", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "damaged" in proc.stderr
    # continuing from the predecessor ends exactly like the uninterrupted run
    train(tiny(), out, resume=True, resume_from="previous")
    assert deterministic(read_metrics(out / "metrics.jsonl")) == deterministic(read_metrics(reference / "metrics.jsonl"))
    a, b = load_checkpoint(last), load_checkpoint(reference / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_checkpoints_of_format_1_still_load_and_resume(reference, tmp_path):
    """Checkpoints written before the format moved to /2 (no checksum, no train_seconds) still resume."""
    out = tmp_path / "run"
    train(tiny("train.max_steps=8"), out)
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        path = out / "checkpoints" / name
        old = load_checkpoint(path)
        old = {k: v for k, v in old.items() if k != "checksum"}
        old["format"] = "kohonen-vae-checkpoint/1"
        old["trainer"] = {k: v for k, v in old["trainer"].items() if k != "train_seconds"}
        # the config of an earlier version lacks the options added since (they take their defaults)
        q = old["config"]["model"]["quantizer"]
        for key in ("codebook_init", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code", "reset_cluster_size"):
            q.pop(key)
        checkpoint_mod.atomic_write(path, lambda f: torch.save(old, f))
    config = json.loads((out / "config.json").read_text())
    for key in ("codebook_init", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code", "reset_cluster_size"):
        config["model"]["quantizer"].pop(key)
    (out / "config.json").write_text(json.dumps(config))
    train(tiny(), out, resume=True)
    assert deterministic(read_metrics(out / "metrics.jsonl")) == deterministic(read_metrics(reference / "metrics.jsonl"))


# -- 6: stale temp files are cleaned (ours only); SIGTERM checkpoints and exits cleanly ---------------------
def test_stale_temp_files_of_our_files_are_removed_on_resume_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    train(tiny("train.max_steps=4"), out)
    ours = [out / "checkpoints" / ".last.pt.abcd1234.tmp", out / ".metrics.jsonl.zz9_x1y2.tmp"]
    foreign = [out / "checkpoints" / ".notes.tmp", out / ".last.pt.abcd1234.tmp.keep"]
    for p in ours + foreign:
        p.write_bytes(b"x" * 100)
    train(tiny("train.max_steps=8"), out, resume=True)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in foreign)


def test_sigterm_finishes_the_step_saves_and_exits_with_one_line(reference, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "kohonen_vae", "train", "--config", "tiny", "--out", str(out)]
    sets = sum([["--set", s] for s in FAST + ["train.max_steps=100000", "train.checkpoint_every=100000",
                                              "train.eval_every=100000"]], [])
    proc = subprocess.Popen(args + sets, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not read_metrics(out / "metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert step >= max(r["step"] for r in read_metrics(out / "metrics.jsonl")) and f"after step {step};" in stderr


# -- 7: disk full: one line naming the file ------------------------------------------------------------------
def test_disk_full_is_one_line_that_names_the_file(tmp_path, monkeypatch, capsys):
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_mod.torch, "save", full)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match="disk full while writing .*best.pt"):
        train(tiny(), out)
    code = main(["train", "--config", "tiny", "--out", str(tmp_path / "cli")] + sum([["--set", s] for s in FAST], []))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "disk full while writing" in err and "best.pt" in err
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# -- 8: a damaged line in the middle of metrics.jsonl loses nothing silently ----------------------------------
def test_damaged_metrics_line_keeps_the_records_after_it_and_says_so(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\x00garbage\n{"kind": "train", "step": 3}\n'
                    '{"kind": "val", "step": 3}\n{"kind": "tr')
    warnings = []
    records = read_metrics(path, warn=warnings.append)
    assert [r["step"] for r in records] == [1, 3, 3]
    assert len(warnings) == 1 and "line(s) (2)" in warnings[0]  # the torn last line (5) is expected, not reported


# -- 10: a report of runs in different trees goes to the current directory, not their common parent ---------
def test_report_of_runs_in_different_trees_defaults_to_the_current_directory(tmp_path, monkeypatch):
    from kohonen_vae.report import write_report

    a, b = tmp_path / "x" / "a", tmp_path / "y" / "b"
    for d in (a, b):
        train(tiny("train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2"), d)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert write_report([a, b], device="cpu", max_images=8).resolve() == work / "report.html"
    assert not (tmp_path / "report.html").exists()


# -- issue 11, item 11: the run-directory side of clean failures ---------------------------------------------
def test_failed_start_leaves_no_folder_and_resume_below_done_steps_changes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="not a folder|no image files|not found"):
        train(tiny("data.name=folder:" + str(tmp_path / "nowhere")), out)
    assert not out.exists()  # nothing half-made blocks the rerun
    train(tiny("train.max_steps=8"), out)
    config = (out / "config.json").read_text()
    with pytest.raises(ResumeError, match="max_steps = 4 is below the 8 steps already done"):
        train(tiny("train.max_steps=4"), out, resume=True)
    assert (out / "config.json").read_text() == config


def test_resume_refuses_a_dataset_that_changed_since_the_run_started(tmp_path, monkeypatch):
    """Issue 11 item 11: resuming on other data would silently mix two datasets in one run."""
    from PIL import Image
    import numpy as np

    monkeypatch.setenv("KOHONEN_VAE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images" / "train" / "a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    cfg = ["data.name=folder:" + str(tmp_path / "images"), "data.val_max_images=8", "data.test_max_images=8"]
    out = tmp_path / "run"
    train(tiny(*cfg, "train.max_steps=4"), out)
    assert json.loads((out / "data.json").read_text())["fingerprint"]
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(root / "07.png")  # one image edited
    before = snapshot(out)
    with pytest.raises(ResumeError, match="the dataset changed since the run started"):
        train(tiny(*cfg, "train.max_steps=8"), out, resume=True)
    assert snapshot(out) == before
