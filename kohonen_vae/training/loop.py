"""The training loop (nanoGPT style: one function, top to bottom) and its evaluation.

Run directory written by rank 0 only (its rules: :mod:`kohonen_vae.training.rundir`)::

    config.json            fully resolved config (``kohonen-vae train --config run/config.json`` reruns it)
    data.json              the dataset's info (sizes, source, split, normaliser mean/std)
    metrics.jsonl          one JSON object per line, schema below
    checkpoints/last.pt    latest state (every train.checkpoint_every steps, at the end, on SIGTERM/Ctrl-C)
    checkpoints/last.prev.pt  the last.pt before that (the fallback if last.pt is ever damaged)
    checkpoints/best.pt    state at the best validation reconstruction MSE so far
    summary.json           final metrics (written when training finishes)
    report.html            written by ``kohonen-vae train`` after training when train.report is true
    tensorboard/           only with train.tensorboard = true
    .kohonen-vae-run, .kohonen-vae.lock   marker (the folder is a run) and the lock held while training

metrics.jsonl records (``kind`` tells them apart; lists have one entry per quantiser level, VQ-VAE-2 order
[top, bottom]; fields marked * are wall-clock measurements and differ between otherwise identical runs)::

    {"kind": "train", "step", "epoch", "loss", "recon", "commitment", "perplexity": [..], "used_codes": [..],
     "lr", "step_time_s"*, "images_per_s"*, "time_s"*}
        means over the train.log_every steps ending at ``step``; loss = recon + commitment; recon is
        MSE(reconstruction, normalised image); perplexity/used_codes are per-batch values, averaged.
    {"kind": "val", "step", "loss", "recon", "commitment", "perplexity": [..], "used_codes": [..],
     "best_recon", "best_step", "images", "eval_time_s"*}
        model.eval() (codebooks frozen) over the validation set (or a fixed random subset of
        data.val_max_images of it, the same for every run with the same split seed);
        recon is the MSE over all pixels of the set, perplexity/used_codes from the set's total code counts.

The validation loss of the paper's tables is ``recon`` (reconstruction MSE); the convergence steps are the
first evaluation steps whose ``recon`` is <= 1.1x / 1.2x the run's own best.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..errors import ConfigError, ResumeError, disk_full_error, is_disk_full
from ..models import build_model, check_image_size
from ..quantizers import apply_pending_updates
from ..quantizers.base import perplexity_from_counts
from .checkpoint import (TrainingProgress, atomic_write_json, atomic_write_text, load_checkpoint, make_checkpoint,
                         read_metrics, restore_training_state, save_checkpoint)
from .config import resolve_config
from .rundir import RunDirectory
from .sampler import ShardedBatchSampler

#: env var: if set to a folder, every rank saves its final model state there as rank{r}.pt (tests of DDP)
DUMP_RANK_STATES_ENV = "KOHONEN_VAE_DUMP_RANK_STATES"


class TrainingInterrupted(Exception):
    """SIGTERM or Ctrl-C arrived: the step in flight was finished and ``checkpoints/last.pt`` written."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


# -- setup helpers -----------------------------------------------------------------------------------------
def setup_distributed(device_pref: str) -> torch.device:
    """Join the process group described by torchrun's env (RANK, WORLD_SIZE, ...) if there is one, and
    return this process's device (``auto``: cuda:LOCAL_RANK if CUDA is available, else cpu)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_pref == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif device_pref == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = torch.device(f"cuda:{local_rank}")
    else:
        try:
            device = torch.device(device_pref)
        except RuntimeError as e:
            raise ConfigError(f"train.device = {device_pref!r} is not a device: {e}") from e
    if device.type == "meta":
        raise ConfigError("train.device = \"meta\" holds no data and cannot train; use \"auto\", \"cpu\" or \"cuda\"")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device_pref!r} but CUDA is not available; use device = \"auto\" or \"cpu\"")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def convergence_steps(evals, factors=(1.1, 1.2)) -> dict:
    """``{factor: first step s with val(s) <= factor * min(val)}`` over ``evals = [(step, val), ...]``."""
    if not evals:
        return {f: None for f in factors}
    best = min(v for _, v in evals)
    return {f: next(s for s, v in evals if v <= f * best) for f in factors}


@torch.no_grad()
def evaluate(model, images: torch.Tensor, normalizer, batch_size: int, device, bf16: bool = False) -> dict:
    """Reconstruction MSE, commitment and code usage of ``model`` (eval mode, codebooks frozen) on uint8
    ``images``. Under data parallelism each rank takes a contiguous shard and the sums are all-reduced
    (every rank must call this at the same step)."""
    was_training = model.training
    model.eval()
    world, rank = distributed.world_size(), distributed.rank()
    n = images.shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    sizes = [q.codebook_size for q in model.quantizers]
    sums = torch.zeros(3 + sum(sizes), dtype=torch.float64, device=device)  # [sse, commit*b, n_elem, counts..]
    for start in range(lo, hi, batch_size):
        x = normalizer.normalize(images[start:min(start + batch_size, hi)].to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        sums[0] += F.mse_loss(out.reconstruction.float(), x, reduction="sum").double()
        sums[1] += out.commitment_loss.double() * x.shape[0]
        sums[2] += x.numel()
        sums[3:] += torch.cat([c.double() for c in out.counts])
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    counts = torch.split(sums[3:], sizes)
    recon = float(sums[0] / sums[2].clamp(min=1))
    commitment = float(sums[1] / max(n, 1))
    return {"loss": recon + commitment, "recon": recon, "commitment": commitment,
            "perplexity": [float(perplexity_from_counts(c)) for c in counts],
            "used_codes": [int((c > 0).sum()) for c in counts], "images": int(n)}


def _load_data(cfg: dict, splits):
    """The run's splits (``splits`` if given); the image shape is checked against the model before anything
    is decoded (``check_shape``), so a wrong size fails in a second, not after decoding a dataset."""
    if splits is not None:
        return splits
    from ..data import splits_from_config  # lazily: the data layer is only needed when no splits are given
    from ..errors import DatasetCorruptError

    d = cfg["data"]

    def check(shape):
        c, h, w = shape
        if h != w:
            raise ConfigError(f"the models need square images, the dataset has {h}x{w}; set data.image_size")
        check_image_size(cfg["model"], h, in_channels=c)

    try:
        return splits_from_config(d, check_shape=check)
    except (ConfigError, DatasetCorruptError):
        raise
    except ValueError as e:  # bad name/size/fraction, or files that are not what the layout promises
        raise ConfigError(f"data ({d.get('name')}): {e}") from e


def _check_same_dataset(out: Path, splits) -> None:
    """Refuse to resume on data that differ from the data the run started on (``data.json``'s fingerprint,
    a hash of the decoded images and labels); runs without a recorded fingerprint are not checked."""
    try:
        recorded = json.loads((out / "data.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return
    current = splits.info.get("fingerprint")
    if recorded and current and recorded != current:
        raise ResumeError(f"cannot resume {out}: the dataset changed since the run started (fingerprint {recorded} "
                          f"in data.json, {current} now); point data.data_dir at the original data or start a new run")


# -- the loop ------------------------------------------------------------------------------------------------
def train(config: dict, out_dir, *, resume: bool = False, splits=None, resume_from: str = "last") -> dict:
    """Train a model as the paper's protocol (spec section 6) describes; returns the summary dict.

    ``config`` is a (partial) config dict, resolved with :func:`~kohonen_vae.training.config.resolve_config`.
    ``resume``: continue from ``out_dir/checkpoints/last.pt`` (``resume_from="previous"``: from its predecessor
    ``last.prev.pt``) with exactly the batches and RNG states an uninterrupted run would have used.
    ``splits``: a ready :class:`~kohonen_vae.data.DatasetSplits` (default: load ``config["data"]``).
    The run directory's rules (what is written, what is refused) are in :mod:`kohonen_vae.training.rundir`.
    SIGTERM and Ctrl-C finish the current step, write ``last.pt`` and raise :class:`TrainingInterrupted`.
    """
    # ---- setup: config, devices, run directory, data, model -------------------------------------------
    cfg = resolve_config(config)
    t_cfg, out = cfg["train"], Path(out_dir)
    group_existed = dist.is_available() and dist.is_initialized()
    device = setup_distributed(t_cfg["device"])
    world, rank = distributed.world_size(), distributed.rank()
    master = rank == 0
    owns_group = world > 1 and not group_existed
    run_dir = RunDirectory(out) if master else None
    ckpt = _open_run_directory(run_dir, cfg, resume, resume_from, out)
    try:
        splits = _load_data(cfg, splits)
        if ckpt is not None:
            _check_same_dataset(out, splits)
        train_images, val_images, test_images, normalizer = _prepare_images(cfg, splits, device)
        seed_everything(cfg["seed"])  # same seed on every rank, so every replica starts identical
        model = build_model(cfg["model"]).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg["lr"], betas=tuple(t_cfg["betas"]),
                                      weight_decay=t_cfg["weight_decay"])
        try:
            sampler = ShardedBatchSampler(len(train_images), t_cfg["batch_size"], cfg["seed"], rank, world)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        levels = len(model.quantizers)
        progress = TrainingProgress(window=torch.zeros(3 + 2 * levels + 1, dtype=torch.float64, device=device))
        if ckpt is not None:
            progress = restore_training_state(ckpt, model, optimizer, sampler, device)
        ddp_model = _wrap_data_parallel(model, device) if world > 1 else model
        writer, metrics_file = None, None
        if master:
            writer, metrics_file = _start_run_files(out, cfg, splits, normalizer, progress.step, ckpt is not None)
    except BaseException:
        if master:
            run_dir.abandon()  # a failed start leaves nothing that blocks a rerun
        raise

    def log(record: dict) -> None:
        if master:
            try:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            except OSError as e:
                if is_disk_full(e):
                    raise disk_full_error(out / "metrics.jsonl", e) from e
                raise
            if writer is not None:
                _log_tensorboard(writer, record)

    def save(name: str) -> None:
        if master:
            save_checkpoint(out / "checkpoints" / name, make_checkpoint(
                config=cfg, model=model, optimizer=optimizer, sampler=sampler, progress=progress,
                normalizer=normalizer), keep_previous=name == "last.pt")

    # ---- the loop: batch -> forward (KSOM/EMA codebooks update here) -> backward -> clip -> AdamW -------
    from tqdm.auto import tqdm

    pbar = tqdm(total=t_cfg["max_steps"], initial=progress.step, disable=not (master and t_cfg["progress"]),
                desc=out.name, dynamic_ncols=True, unit="step")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=t_cfg["bf16"])
    stop = _StopRequests()
    t_start = t_window = time.perf_counter()
    session_seconds, images_seen = 0.0, 0
    window = progress.window
    model.train()
    try:
        while progress.step < t_cfg["max_steps"]:
            idx = sampler.next_indices().to(train_images.device)
            x = normalizer.normalize(train_images.index_select(0, idx).to(device, non_blocking=True))
            with torch.autocast(**amp):
                out_ = ddp_model(x)
            recon = F.mse_loss(out_.reconstruction.float(), x)
            loss = recon + out_.commitment_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t_cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg["grad_clip"])
            optimizer.step()
            apply_pending_updates(model)  # quantisers built with update_in_forward=False update once per step
            progress.step += 1
            step = progress.step
            window += torch.cat([torch.stack([loss.detach(), recon.detach(), out_.commitment_loss.detach()]).double(),
                                 torch.stack(out_.perplexity).double(), torch.stack(out_.used_codes).double(),
                                 window.new_ones(1)])

            if step % t_cfg["log_every"] == 0 or step == t_cfg["max_steps"]:
                if world > 1:  # same condition on every rank: a collective outside any data-dependent branch
                    dist.all_reduce(window)
                    window /= world
                now = time.perf_counter()
                m = (window[:-1] / window[-1]).tolist()
                n_steps = float(window[-1])
                log({"kind": "train", "step": step, "epoch": sampler.epoch, "loss": m[0], "recon": m[1],
                     "commitment": m[2], "perplexity": m[3:3 + levels], "used_codes": m[3 + levels:3 + 2 * levels],
                     "lr": optimizer.param_groups[0]["lr"], "step_time_s": (now - t_window) / n_steps,
                     "images_per_s": n_steps * t_cfg["batch_size"] / max(now - t_window, 1e-9),
                     "time_s": now - t_start})
                session_seconds += now - t_window
                progress.train_seconds += now - t_window
                images_seen += int(n_steps) * t_cfg["batch_size"]
                pbar.set_postfix(loss=f"{m[0]:.4f}", ppl=f"{m[3]:.0f}", refresh=False)
                window.zero_()
                t_window = now

            if step % t_cfg["eval_every"] == 0 or step == t_cfg["max_steps"]:
                t_eval = time.perf_counter()
                val = evaluate(model, val_images, normalizer, t_cfg["eval_batch_size"], device, t_cfg["bf16"])
                progress.evals.append((step, val["recon"]))
                improved = val["recon"] < progress.best_recon
                if improved:
                    progress.best_recon, progress.best_step = val["recon"], step
                log({"kind": "val", "step": step, **val, "best_recon": progress.best_recon,
                     "best_step": progress.best_step, "eval_time_s": time.perf_counter() - t_eval})
                if improved:
                    save("best.pt")
                t_window += time.perf_counter() - t_eval  # evaluation time does not count as training time

            stopping = stop.requested(world)
            if step % t_cfg["checkpoint_every"] == 0 or step == t_cfg["max_steps"] or stopping:
                save("last.pt")
            pbar.update(1)
            if stopping:
                raise TrainingInterrupted(
                    f"stopped by {stop.name} after step {step}; the state is saved in {out / 'checkpoints' / 'last.pt'}"
                    f": continue with `kohonen-vae train --resume --out {out}`", stop.signal_number)
        pbar.close()

        # ---- finish: test set, summary ------------------------------------------------------------------
        test = None
        if t_cfg["test_at_end"] and test_images is not None:
            test = evaluate(model, test_images, normalizer, t_cfg["eval_batch_size"], device, t_cfg["bf16"])
        summary = _summary(out, progress, world, device, test, session_seconds, images_seen,
                           read_metrics(out / "metrics.jsonl") if master else [])
        if os.environ.get(DUMP_RANK_STATES_ENV):
            dump = Path(os.environ[DUMP_RANK_STATES_ENV])
            dump.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, dump / f"rank{rank}.pt")
        if master:
            metrics_file.close()
            atomic_write_json(out / "summary.json", summary)
    finally:
        stop.restore()
        pbar.close()
        if master:
            if metrics_file is not None and not metrics_file.closed:
                metrics_file.close()
            if writer is not None:
                writer.close()
            run_dir.close()
    if owns_group:  # the group was created for this run: leave cleanly (after rank 0 has written everything)
        dist.barrier()
        dist.destroy_process_group()
    return summary


# -- pieces of train() ---------------------------------------------------------------------------------------
def _open_run_directory(run_dir, cfg: dict, resume: bool, resume_from: str, out: Path):
    """Rank 0 checks and locks the run directory and picks the checkpoint; every other rank gets rank 0's
    decision (the same error, or the same checkpoint file), so that no rank waits for one that failed."""
    world = distributed.world_size()
    decision, ckpt = {"error": None, "source": None}, None
    if run_dir is not None:
        try:
            run_dir.open(resume)
            try:
                ckpt = run_dir.checkpoint_to_resume(cfg, resume, resume_from)
            except BaseException:
                run_dir.abandon()
                raise
        except ConfigError as e:
            if world == 1:
                raise
            decision["error"] = (type(e).__name__, str(e))
        if ckpt is not None:
            decision["source"] = "last.prev.pt" if resume_from == "previous" else "last.pt"
    if world > 1:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
        if decision["error"] is not None:
            raise ResumeError(decision["error"][1])
        if run_dir is None and decision["source"] is not None:
            ckpt = load_checkpoint(out / "checkpoints" / decision["source"])
    return ckpt


def _prepare_images(cfg: dict, splits, device):
    """Training images (on the device if they fit and ``data_on_device`` allows), the evaluation subsets of
    validation and test (a fixed seeded random subset when capped, see ``data.evaluation_subset``) and the
    normaliser; checks that the model can run on the images."""
    from ..data import evaluation_subset

    t_cfg, d_cfg = cfg["train"], cfg["data"]
    c, h, w = splits.train.images.shape[1:]
    if h != w:
        raise ConfigError(f"the models need square images, the dataset has {h}x{w}; set data.image_size")
    check_image_size(cfg["model"], h, in_channels=c)
    train_images = splits.train.images
    on_device = t_cfg["data_on_device"]
    if on_device == "auto":
        on_device = device.type != "cpu" and train_images.numel() < (4 << 30)
    if on_device:
        train_images = train_images.to(device)
    seed = d_cfg["split_seed"]
    val = None if splits.val is None else evaluation_subset(splits.val.images, d_cfg["val_max_images"], seed)
    test = None if splits.test is None else evaluation_subset(splits.test.images, d_cfg["test_max_images"], seed)
    return train_images, val, test, splits.normalizer


def _wrap_data_parallel(model, device):
    # KSOM/EMA quantisers all-reduce their own statistics, so their buffers stay identical (no buffer
    # broadcast in forward; newer torch names the option forward_sync_buffers)
    sync_opt = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{sync_opt: False})


def _start_run_files(out: Path, cfg: dict, splits, normalizer, step: int, resumed: bool):
    """config.json, data.json and metrics.jsonl (records up to ``step`` kept on resume); returns the
    TensorBoard writer (or None) and the metrics file opened for appending."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "data.json", {**splits.info, "normalization": normalizer.to_dict()})
    kept = [r for r in read_metrics(out / "metrics.jsonl") if r.get("step", 0) <= step] if resumed else []
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    writer = _tensorboard_writer(out / "tensorboard") if cfg["train"]["tensorboard"] else None
    return writer, open(out / "metrics.jsonl", "a")


def _log_tensorboard(writer, record: dict) -> None:
    for k, v in record.items():
        for i, x in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(x, (int, float)) and k not in ("step", "kind"):
                writer.add_scalar(f"{record['kind']}/{k}" + (f"/{i}" if isinstance(v, list) else ""), x, record["step"])


def _summary(out: Path, progress: TrainingProgress, world: int, device, test, session_seconds: float,
             images_seen: int, records: list) -> dict:
    last_val = next((r for r in reversed(records) if r["kind"] == "val"), None)
    conv = convergence_steps(progress.evals)
    return {
        "run_dir": str(out), "steps": progress.step, "world_size": world, "device": str(device),
        "best_val_recon": progress.best_recon if progress.best_step is not None else None,
        "best_step": progress.best_step,
        "converge_10_step": conv[1.1], "converge_20_step": conv[1.2],
        "final_val": last_val, "test": test,
        "final_perplexity": last_val["perplexity"] if last_val else None,
        "final_used_codes": last_val["used_codes"] if last_val else None,
        "train_seconds_this_session": session_seconds,
        "train_seconds": progress.train_seconds,
        "images_per_s_this_session": images_seen / session_seconds if session_seconds > 0 else None,
        "evals": [list(e) for e in progress.evals],
    }


class _StopRequests:
    """SIGTERM (what schedulers send before they kill a job) and SIGINT (Ctrl-C) set a flag instead of
    killing the process, so the loop can finish its step and checkpoint. A second Ctrl-C stops at once.
    Under data parallelism the flag is all-reduced every step: every rank stops after the same step."""

    def __init__(self):
        self.signal_number = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # pragma: no cover - not allowed here
                pass

    def _handle(self, signum, frame):
        if self.signal_number is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self.signal_number = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else "request"

    def requested(self, world: int) -> bool:
        if world > 1:
            flag = torch.tensor([0 if self.signal_number is None else int(self.signal_number)],
                                device=distributed.collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag) and self.signal_number is None:
                self.signal_number = int(flag)
        return self.signal_number is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # pragma: no cover
                pass
        self._previous = {}


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("train.tensorboard = true needs the tensorboard package: "
                          "pip install 'kohonen-vae[tensorboard]' (or set train.tensorboard = false)") from e
    return SummaryWriter(str(folder))
