"""Pictures of a fitted :class:`~kohonen_vae.som.KohonenMap` and its self-contained HTML page.

* U-matrix and hit map: :func:`kohonen_vae.figures.umatrix_figure` (the run reports' figure);
* component planes: one heat-map per feature of the unit weights ``w_k[i]`` at the units' grid positions
  (:func:`component_planes_figure`, new here);
* training: the width sigma(t) and the quantisation error of each update's batch before it
  (:func:`training_figure`).

Grid pictures use the library's layout (:func:`kohonen_vae.figures.grid_image`): unit k at column
``k mod s0``, row ``k div s0``. The page embeds every figure as a base64 PNG ``data:`` URI (as
:mod:`kohonen_vae.report` does) and carries ``<meta name="generator" content="kohonen-vae som">``.
"""
from __future__ import annotations

import base64
import datetime
import html
import math

import torch

from .storage import HTML_GENERATOR_TAG

#: at most this many component planes are drawn (the page says how many were left out)
MAX_PLANES = 64


def component_planes_figure(codebook: torch.Tensor, grid, names=None, max_planes: int = MAX_PLANES,
                            title: str | None = None, path=None):
    """One panel per feature i (the first ``max_planes``): ``w_k[i]`` over the grid, each with its own
    colour scale. Features that vary together across the map show the same pattern."""
    import matplotlib.pyplot as plt

    from ..figures import grid_image, save_figure

    w = codebook.detach().float().cpu()
    d = w.shape[1]
    shown = min(d, max_planes)
    names = [str(n) for n in names] if names is not None else [f"feature {i}" for i in range(d)]
    cols = min(shown, 8)
    rows = math.ceil(shown / cols)
    aspect = grid.shape[0] / max(grid.size // grid.shape[0], 1)
    side = 1.7
    fig, axes = plt.subplots(rows, cols, figsize=(cols * min(side * aspect, 4) + 0.4, rows * (side + 0.35) + 0.3),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= shown:
            ax.axis("off")
            continue
        im = ax.imshow(grid_image(w[:, i], grid), cmap="viridis", interpolation="nearest")
        ax.set_title(names[i][:24], fontsize=7)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.ax.tick_params(labelsize=5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def training_figure(history, path=None):
    """Two panels over the updates: the kernel width sigma(t) and the quantisation error of the update's
    batch measured before the update (so it lags the final map by one update)."""
    import matplotlib.pyplot as plt

    from ..figures import save_figure

    steps = [h["update"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 2.8))
    axes[0].plot(steps, [h["sigma"] for h in history], marker=".")
    axes[0].set_title("neighbourhood width sigma", fontsize=8)
    axes[1].plot(steps, [h["quantization_error"] for h in history], marker=".", color="C1")
    axes[1].set_title("quantisation error of the batch (before the update)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("update", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def _figure_html(fig, alt: str, caption: str) -> str:
    import matplotlib.pyplot as plt

    from ..figures import figure_png_bytes

    png = figure_png_bytes(fig)
    plt.close(fig)
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return html.escape(str(v))


def _table(rows) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f4f4f4;font-weight:500}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
code{background:#f4f4f4;padding:0 .2em}"""


def som_page(som, metrics: dict, counts, feature_names=None, title: str = "Self-organising map",
             command: str | None = None, notes=()) -> str:
    """The HTML page of a fitted map: parameters, metrics, training curve, U-matrix + hit map, component
    planes; every figure embedded (no other file needed)."""
    from ..figures import umatrix_figure

    grid = som.grid_
    shape = "x".join(map(str, grid.shape))
    params = [(k, "<array>" if hasattr(v, "shape") else v) for k, v in som.get_params().items()]
    fitted = [("grid", repr(grid)), ("features", som.n_features_in_), ("updates", som.n_updates_),
              ("width of the last update", som.history_[-1]["sigma"] if som.history_ else None)]
    d = som.n_features_in_
    planes_note = (f" (the first {MAX_PLANES} of {d} features)" if d > MAX_PLANES else "")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', HTML_GENERATOR_TAG,
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{shape} {grid.topology} map{' (periodic)' if grid.periodic else ''}, written "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}"
        + (f" by <code>{html.escape(command)}</code>" if command else "") + ".</p>",
        *[f"<p>{html.escape(n)}</p>" for n in notes],
        "<h2>Metrics</h2>", _table(metrics.items()),
        "<h2>Training</h2>",
        _figure_html(training_figure(som.history_), "training curve",
                     "Kernel width and quantisation error per update."),
        "<h2>U-matrix and hit map</h2>",
        _figure_html(umatrix_figure(som.codebook_.cpu(), grid, counts=torch.as_tensor(counts).float()),
                     "U-matrix and hit map", "Left: mean distance of each unit to its grid neighbours (ridges "
                     "separate clusters). Right: data rows per unit (black: no hit)."),
        "<h2>Component planes</h2>",
        _figure_html(component_planes_figure(som.codebook_, grid, feature_names), "component planes",
                     "Each feature's weight over the map" + planes_note + "."),
        "<h2>Parameters</h2>", _table(params + fitted),
        "</body></html>",
    ]
    return "\n".join(parts)
