"""The training loop (nanoGPT style: one function, top to bottom) and its evaluation.

Run directory written by rank 0 only::

    config.json            fully resolved config (``kohonen-vae train --config run/config.json`` reruns it)
    data.json              the dataset's info (sizes, source, split, normaliser mean/std)
    metrics.jsonl          one JSON object per line, schema below
    checkpoints/last.pt    latest state (every train.checkpoint_every steps and at the end), resumable
    checkpoints/best.pt    state at the best validation reconstruction MSE so far
    summary.json           final metrics (written when training finishes)
    tensorboard/           only with train.tensorboard = true

metrics.jsonl records (``kind`` tells them apart; lists have one entry per quantiser level, VQ-VAE-2 order
[top, bottom]; fields marked * are wall-clock measurements and differ between otherwise identical runs)::

    {"kind": "train", "step", "epoch", "loss", "recon", "commitment", "perplexity": [..], "used_codes": [..],
     "lr", "step_time_s"*, "images_per_s"*, "time_s"*}
        means over the train.log_every steps ending at ``step``; loss = recon + commitment; recon is
        MSE(reconstruction, normalised image); perplexity/used_codes are per-batch values, averaged.
    {"kind": "val", "step", "loss", "recon", "commitment", "perplexity": [..], "used_codes": [..],
     "best_recon", "best_step", "images", "eval_time_s"*}
        model.eval() (codebooks frozen) over the validation set (or its first data.val_max_images);
        recon is the MSE over all pixels of the set, perplexity/used_codes from the set's total code counts.

The validation loss of the paper's tables is ``recon`` (reconstruction MSE); the convergence steps are the
first evaluation steps whose ``recon`` is <= 1.1x / 1.2x the run's own best.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..models import build_model, check_image_size
from ..models.factory import ConfigError
from ..quantizers import apply_pending_updates
from ..quantizers.base import perplexity_from_counts
from .checkpoint import (FORMAT, atomic_write_json, atomic_write_text, load_checkpoint, read_metrics, rng_state,
                         save_checkpoint, set_rng_state)
from .config import RESUMABLE_CHANGES, changed_keys, resolve_config
from .sampler import ShardedBatchSampler

#: Functions ``hook(run_dir: Path, summary: dict) -> None`` called on rank 0 after summary.json is written.
#: REPORT HOOK: the report module registers "write the report at the end of training" here
#: (e.g. ``END_OF_TRAINING_HOOKS.append(write_report_hook)``, enabled by a train.report option).
END_OF_TRAINING_HOOKS: list = []

#: env var: if set to a folder, every rank saves its final model state there as rank{r}.pt (tests of DDP)
DUMP_RANK_STATES_ENV = "KOHONEN_VAE_DUMP_RANK_STATES"


class ResumeError(ConfigError):
    """A run cannot be resumed as asked (changed config, missing checkpoint, existing run without --resume)."""


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


def _subset(imageset, max_images):
    if imageset is None:
        return None
    images = imageset.images
    return images if max_images is None else images[:max_images]


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
    if splits is not None:
        return splits
    from ..data import splits_from_config  # lazily: the data layer is only needed when no splits are given

    d = cfg["data"]
    try:
        return splits_from_config(d)
    except ValueError as e:  # bad name/size/fraction, or files that are not what the layout promises
        raise ConfigError(f"data ({d.get('name')}): {e}") from e


def _prepare_run_dir(out: Path, cfg: dict, resume: bool):
    """Checkpoint to resume from (or None); refuses to overwrite an existing run without ``resume``."""
    last = out / "checkpoints" / "last.pt"
    if not resume:
        if last.exists() or (out / "metrics.jsonl").exists():
            raise ResumeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    if not last.exists():
        return None  # nothing to resume yet: start fresh (lets job scripts always pass --resume)
    ckpt = load_checkpoint(last)
    changed = [k for k in changed_keys(ckpt["config"], cfg) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ResumeError(f"cannot resume {out}: the config differs from the saved one in {', '.join(changed)}. "
                          f"Only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")
    return ckpt


# -- the loop ------------------------------------------------------------------------------------------------
def train(config: dict, out_dir, *, resume: bool = False, splits=None) -> dict:
    """Train a model as the paper's protocol (spec section 6) describes; returns the summary dict.

    ``config`` is a (partial) config dict, resolved with :func:`~kohonen_vae.training.config.resolve_config`.
    ``resume``: continue from ``out_dir/checkpoints/last.pt`` (exactly the batches and RNG states an
    uninterrupted run would have used). ``splits``: a ready :class:`~kohonen_vae.data.DatasetSplits`
    (default: load ``config["data"]``).
    """
    cfg = resolve_config(config)
    t_cfg, out = cfg["train"], Path(out_dir)
    group_existed = dist.is_available() and dist.is_initialized()
    device = setup_distributed(t_cfg["device"])
    world, rank = distributed.world_size(), distributed.rank()
    master = rank == 0
    owns_group = world > 1 and not group_existed
    ckpt = _prepare_run_dir(out, cfg, resume)  # every rank reads the same files; only rank 0 writes
    if world > 1:
        dist.barrier()  # nobody looks at the run directory after this point while rank 0 writes to it

    # data
    splits = _load_data(cfg, splits)
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
    val_images = _subset(splits.val, cfg["data"]["val_max_images"])
    test_images = _subset(splits.test, cfg["data"]["test_max_images"])
    normalizer = splits.normalizer

    # model, optimiser, sampler: same seed on every rank, so every replica starts identical
    seed_everything(cfg["seed"])
    model = build_model(cfg["model"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg["lr"], betas=tuple(t_cfg["betas"]),
                                  weight_decay=t_cfg["weight_decay"])
    try:
        sampler = ShardedBatchSampler(len(train_images), t_cfg["batch_size"], cfg["seed"], rank, world)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    levels = len(model.quantizers)
    window = torch.zeros(3 + 2 * levels + 1, dtype=torch.float64, device=device)  # running sums between logs
    step, best_recon, best_step, evals = 0, math.inf, None, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        tr = ckpt["trainer"]
        best_recon = tr["best_recon"] if tr["best_step"] is not None else math.inf
        best_step, evals = tr["best_step"], [tuple(e) for e in tr["evals"]]
        window.copy_(tr["window"].to(device))
    ddp_model = model
    if world > 1:  # KSOM/EMA quantisers all-reduce their own statistics, so their buffers stay identical
        # (no buffer broadcast in forward; newer torch names the option forward_sync_buffers)
        sync_opt = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                    else "broadcast_buffers")
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            **{sync_opt: False})

    # run directory
    writer = None
    if master:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg)
        atomic_write_json(out / "data.json", {**splits.info, "normalization": normalizer.to_dict()})
        kept = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] <= step] if ckpt is not None else []
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        if t_cfg["tensorboard"]:
            writer = _tensorboard_writer(out / "tensorboard")
    metrics_file = open(out / "metrics.jsonl", "a") if master else None

    def log(record: dict) -> None:
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if writer is not None:
                for k, v in record.items():
                    for i, x in enumerate(v if isinstance(v, list) else [v]):
                        if isinstance(x, (int, float)) and k not in ("step", "kind"):
                            writer.add_scalar(f"{record['kind']}/{k}" + (f"/{i}" if isinstance(v, list) else ""),
                                              x, record["step"])

    def checkpoint_state() -> dict:
        return {"format": FORMAT, "step": step, "config": cfg, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state(),
                "trainer": {"best_recon": best_recon if best_step is not None else None, "best_step": best_step,
                            "evals": [list(e) for e in evals], "window": window.cpu()},
                "normalizer": normalizer.to_dict()}

    from tqdm.auto import tqdm

    pbar = tqdm(total=t_cfg["max_steps"], initial=step, disable=not (master and t_cfg["progress"]),
                desc=out.name, dynamic_ncols=True, unit="step")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=t_cfg["bf16"])
    t_start = t_window = time.perf_counter()
    train_seconds, images_seen = 0.0, 0
    model.train()
    while step < t_cfg["max_steps"]:
        # one optimiser step: batch -> forward (KSOM/EMA codebooks update here) -> backward -> clip -> AdamW
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
        step += 1
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
            record = {"kind": "train", "step": step, "epoch": sampler.epoch, "loss": m[0], "recon": m[1],
                      "commitment": m[2], "perplexity": m[3:3 + levels], "used_codes": m[3 + levels:3 + 2 * levels],
                      "lr": optimizer.param_groups[0]["lr"], "step_time_s": (now - t_window) / n_steps,
                      "images_per_s": n_steps * t_cfg["batch_size"] / max(now - t_window, 1e-9),
                      "time_s": now - t_start}
            train_seconds += now - t_window
            images_seen += int(n_steps) * t_cfg["batch_size"]
            log(record)
            pbar.set_postfix(loss=f"{m[0]:.4f}", ppl=f"{m[3]:.0f}", refresh=False)
            window.zero_()
            t_window = now

        if step % t_cfg["eval_every"] == 0 or step == t_cfg["max_steps"]:
            t_eval = time.perf_counter()
            val = evaluate(model, val_images, normalizer, t_cfg["eval_batch_size"], device, t_cfg["bf16"])
            evals.append((step, val["recon"]))
            improved = val["recon"] < best_recon
            if improved:
                best_recon, best_step = val["recon"], step
            log({"kind": "val", "step": step, **val, "best_recon": best_recon, "best_step": best_step,
                 "eval_time_s": time.perf_counter() - t_eval})
            if improved and master:
                save_checkpoint(out / "checkpoints" / "best.pt", checkpoint_state())
            t_window += time.perf_counter() - t_eval  # evaluation time does not count as training time

        if step % t_cfg["checkpoint_every"] == 0 or step == t_cfg["max_steps"]:
            if master:
                save_checkpoint(out / "checkpoints" / "last.pt", checkpoint_state())
        pbar.update(1)
    pbar.close()

    # end of training: test set, summary, hooks
    test = None
    if t_cfg["test_at_end"] and test_images is not None:
        test = evaluate(model, test_images, normalizer, t_cfg["eval_batch_size"], device, t_cfg["bf16"])
    records = read_metrics(out / "metrics.jsonl") if master else []
    last_val = next((r for r in reversed(records) if r["kind"] == "val"), None)
    conv = convergence_steps(evals)
    summary = {
        "run_dir": str(out), "steps": step, "world_size": world, "device": str(device),
        "best_val_recon": best_recon if best_step is not None else None, "best_step": best_step,
        "converge_10_step": conv[1.1], "converge_20_step": conv[1.2],
        "final_val": last_val, "test": test,
        "final_perplexity": last_val["perplexity"] if last_val else None,
        "final_used_codes": last_val["used_codes"] if last_val else None,
        "train_seconds_this_session": train_seconds,
        "images_per_s_this_session": images_seen / train_seconds if train_seconds > 0 else None,
        "evals": [list(e) for e in evals],
    }
    if os.environ.get(DUMP_RANK_STATES_ENV):
        dump = Path(os.environ[DUMP_RANK_STATES_ENV])
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, dump / f"rank{rank}.pt")
    if master:
        metrics_file.close()
        if writer is not None:
            writer.close()
        atomic_write_json(out / "summary.json", summary)
        # REPORT HOOK: "write report at end of training" runs here (see END_OF_TRAINING_HOOKS).
        for hook in END_OF_TRAINING_HOOKS:
            hook(out, summary)
    if owns_group:  # the group was created for this run: leave cleanly (after rank 0 has written everything)
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("train.tensorboard = true needs the tensorboard package: "
                          "pip install 'kohonen-vae[tensorboard]' (or set train.tensorboard = false)") from e
    return SummaryWriter(str(folder))
