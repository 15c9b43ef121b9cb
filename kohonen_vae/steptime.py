"""Training-step time of several configurations, measured side by side (interleaved) in one process.

Wall times of runs that trained at different moments on a shared machine say more about the machine than
about the methods. Here every configuration's model takes a few optimiser steps in turn, round after round
(the order rotates each round), on the same real batch, so a burst of other work on the machine hits all
of them alike; the result per configuration is the median over rounds of the mean step time::

    t_c = median_r ( (time of the k steps of c in round r) / k )

One step is exactly the trainer's: forward (the quantiser's codebook update included), loss, backward,
gradient clipping, AdamW.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def _one_step(model, optimizer, x, grad_clip: float) -> None:
    out = model(x)
    loss = F.mse_loss(out.reconstruction.float(), x) + out.commitment_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def interleaved_step_times(configs: dict, images: torch.Tensor, normalizer, *, rounds: int = 12,
                           steps_per_round: int = 4, warmup: int = 3, device=None, seed: int = 0,
                           progress: bool = False) -> dict:
    """``{label: {"ms_per_step": median, "min": ..., "max": ...}}`` for resolved run configs ``{label: config}``
    (each config's model, optimiser settings and batch size) on uint8 ``images`` (at least the largest batch),
    measured as described in the module docstring after ``warmup`` untimed steps each."""
    from .models import build_model

    if not configs:
        return {}
    device = torch.device(device) if device is not None else torch.device("cpu")
    setups = {}
    for label, cfg in configs.items():
        torch.manual_seed(seed)
        model = build_model(cfg["model"]).to(device).train()
        t = cfg["train"]
        optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["betas"]),
                                      weight_decay=t["weight_decay"])
        if images.shape[0] < t["batch_size"]:
            raise ValueError(f"{label}: {images.shape[0]} images for a batch of {t['batch_size']}")
        x = normalizer.normalize(images[: t["batch_size"]].to(device))
        for _ in range(warmup):
            _one_step(model, optimizer, x, t["grad_clip"])
        setups[label] = (model, optimizer, x, t["grad_clip"])
    labels = list(setups)
    samples = {label: [] for label in labels}
    from tqdm.auto import tqdm

    for r in tqdm(range(rounds), desc="step times", disable=not progress, unit="round"):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            model, optimizer, x, clip = setups[label]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                _one_step(model, optimizer, x, clip)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[label].append((time.perf_counter() - t0) / steps_per_round)
    return {label: {"ms_per_step": 1000 * statistics.median(v), "min": 1000 * min(v), "max": 1000 * max(v)}
            for label, v in samples.items()}
