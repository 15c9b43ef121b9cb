"""The paper's figures and a few diagnostics, as matplotlib Figures (Agg backend, no display needed).

Every function returns the :class:`matplotlib.figure.Figure`; with ``path=...`` it also saves it as PNG
atomically (temp file in the same folder, fsync, ``os.replace``). Close figures you no longer need
(``matplotlib.pyplot.close(fig)``) when making many.

Grid layout (all grid pictures): code k is drawn at column ``k mod s0``, row ``k div s0`` (the first grid axis
varies fastest, as in the code index), i.e. s0 columns x s1 rows for a 2-D (s0, s1) grid, one row for a 1-D
grid, and s0 columns x (s1 s2 ...) rows for higher dimensions. Hexagonal grids are drawn on the same
rectangle of axial coordinates (a sheared picture of the hexagonal map).

=========================  ===================================================================================
function                   what it shows
=========================  ===================================================================================
codebook_mosaic            every code decoded alone, tiled at its grid position (one panel per level)
index_offset_figure        an image and its decodings after moving every index by (o, o) on the grid
curves_figure              loss, perplexity and used codes over training; runs grouped by label (mean + band)
neighborhood_figure        the kernel h_t(d(winner, k)) on the grid at a few steps t
umatrix_figure             U-matrix (mean distance to grid neighbours) and hit map (usage counts)
reconstructions_figure     a grid of inputs next to the same grid of their reconstructions
=========================  ===================================================================================
"""
from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a display (must precede pyplot)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .metrics import _model_device, decode_codebook, umatrix  # noqa: E402

DPI = 100


# ----------------------------------------------------------------------------------------------- saving
def figure_png_bytes(fig, dpi: int = DPI) -> bytes:
    """The figure rendered as PNG bytes (cropped to its content: ``bbox_inches="tight"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    return buf.getvalue()


def save_figure(fig, path, dpi: int = DPI) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically (temp file + fsync + os.replace); returns the path."""
    from .fileio import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, figure_png_bytes(fig, dpi))
    return path


def _finish(fig, path):
    if path is not None:
        save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------- pixels
def to_pixels(images: torch.Tensor, normalizer=None) -> np.ndarray:
    """(B, C, H, W) images -> float numpy (B, H, W, C) in [0, 1]: uint8 is divided by 255; floats are
    taken as normalised space and mapped back with ``normalizer.denormalize`` (or clamped if None)."""
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif normalizer is not None:
        x = normalizer.denormalize(images.detach())
    else:
        x = images.detach().float().clamp(0, 1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def tile(pixels: np.ndarray, columns: int, pad: int = 0, fill: float = 1.0) -> np.ndarray:
    """Tile images (B, H, W, C) row by row, ``columns`` per row (image b at row b div columns, column
    b mod columns), with ``pad`` pixels of ``fill`` between tiles; returns (rows*(H+pad)-pad, ..., C)."""
    b, h, w, c = pixels.shape
    rows = -(-b // columns)
    out = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, c), fill, dtype=np.float32)
    for i in range(b):
        r, col = divmod(i, columns)
        out[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = pixels[i]
    return out


def _show(ax, img: np.ndarray, **kwargs):
    ax.set_xticks([])
    ax.set_yticks([])
    if img.ndim == 3 and img.shape[-1] == 1:
        return ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest", **kwargs)
    return ax.imshow(img, interpolation="nearest", **kwargs)


def grid_image(values, grid) -> np.ndarray:
    """Per-code values (K,) as a 2-D array (K / s0 rows, s0 columns): code k at (k div s0, k mod s0)."""
    v = torch.as_tensor(values).detach().float().cpu().reshape(-1)
    if v.numel() != grid.size:
        raise ValueError(f"expected one value per code ({grid.size}), got {v.numel()}")
    return v.reshape(grid.size // grid.shape[0], grid.shape[0]).numpy()


def _resize(images: torch.Tensor, side: int | None) -> torch.Tensor:
    if side is None or tuple(images.shape[-2:]) == (side, side):
        return images
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------------- codebook mosaic
def codebook_mosaic(model, normalizer, image_size, levels: Sequence[int] | None = None,
                    fixed_codes: Sequence[int] | None = None, tile_size: int | None = 32, batch_size: int = 64,
                    title: str | None = None, path=None):
    """The paper's "codebook map": for each code k, decode a latent map filled entirely with k and tile the
    K images at k's grid position (column k mod s0, row k div s0), one panel per level in ``levels``
    (default: all; VQ-VAE-2 order [top, bottom]). Other levels are fixed to ``fixed_codes[level]``
    (default 0; the report passes each level's most used code). Tiles are resized to ``tile_size`` px
    (None: native size). A KSOM map shows islands of similar tiles; EMA-VQ looks random.
    """
    levels = list(range(len(model.quantizers))) if levels is None else list(levels)
    names = list(getattr(model, "level_names", [str(i) for i in range(len(model.quantizers))]))
    fixed = list(fixed_codes) if fixed_codes is not None else [0] * len(model.quantizers)
    panels = []
    for lv in levels:
        grid = model.quantizers[lv].grid
        pix = to_pixels(_resize(normalizer.denormalize(decode_codebook(model, lv, image_size, fixed, batch_size)),
                                tile_size), None)
        panels.append((lv, grid, tile(pix, grid.shape[0])))
    scale = max(1.0, 512 / max(p[2].shape[1] for p in panels))  # tiny maps are drawn enlarged
    width = scale * sum(p[2].shape[1] for p in panels) / DPI + 0.3 * len(panels)
    height = scale * max(p[2].shape[0] for p in panels) / DPI + 0.6
    fig, axes = plt.subplots(1, len(panels), figsize=(max(width, 2.0), max(height, 1.5)), squeeze=False)
    for ax, (lv, grid, img) in zip(axes[0], panels):
        _show(ax, img)
        others = [f"{names[j]} fixed to code {fixed[j]}" for j in range(len(names)) if j != lv]
        ax.set_title(f"{names[lv]} codes, grid {'x'.join(map(str, grid.shape))}"
                     + (f" ({', '.join(others)})" if others else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


# -------------------------------------------------------------------------------------- index offsets
def shifted_decodings(model, image: torch.Tensor, normalizer, offsets: Sequence[int] = range(-3, 4)) -> torch.Tensor:
    """Decodings (len(offsets), C, H, W), normalised space, of one uint8 image (C, H, W) after moving every
    index of every level by o along every grid axis (``Grid.shift``: clamped at the border, wrapped on
    periodic grids), one row per o."""
    device = _model_device(model)
    x = normalizer.normalize(image.unsqueeze(0).to(device))
    with torch.no_grad():
        idx = model.encode_indices(x)
        shifted = []
        for q, ix in zip(model.quantizers, idx):
            shifted.append(torch.cat([q.grid.shift(ix, (int(o),) * q.grid.ndim) for o in offsets]))
        return model.decode_indices(shifted)


def index_offset_figure(runs, image: torch.Tensor, offsets: Sequence[int] = range(-3, 4), path=None):
    """The paper's "index offset" figure: one row per run ``(label, model, normalizer)``; columns: the input
    image (uint8 (C, H, W)), then its decodings after shifting every index by (o, o) on the grid for each o
    in ``offsets`` (o = 0 is the plain reconstruction). KSOM degrades smoothly with |o|; EMA-VQ breaks."""
    runs = list(runs)
    if not runs:
        raise ValueError("index_offset_figure needs at least one (label, model, normalizer) run")
    offsets = list(offsets)
    cols = 1 + len(offsets)
    h, w = image.shape[-2:]
    side = max(1.0, min(1.6, 96 / max(h, w)))
    fig, axes = plt.subplots(len(runs), cols, figsize=(cols * side + 0.8, len(runs) * side + 0.5), squeeze=False)
    inp = to_pixels(image.unsqueeze(0))[0]
    for r, (label, model, normalizer) in enumerate(runs):
        dec = to_pixels(shifted_decodings(model, image, normalizer, offsets), normalizer)
        _show(axes[r, 0], inp)
        axes[r, 0].set_ylabel(label, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
        for c, o in enumerate(offsets):
            _show(axes[r, c + 1], dec[c])
            if r == 0:
                axes[r, c + 1].set_title(f"o = {o:+d}" if o else "o = 0", fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------- curves
def _series(records, kind: str, key: str, level: int | None):
    xs, ys = [], []
    for r in records:
        if r.get("kind") != kind or key not in r or r[key] is None:
            continue
        v = r[key]
        if isinstance(v, list):
            if level is None or level >= len(v):
                continue
            v = v[level]
        xs.append(float(r["step"]))
        ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def _levels(records) -> int:
    for r in records:
        if isinstance(r.get("perplexity"), list):
            return len(r["perplexity"])
    return 1


def group_curve(series: Sequence[tuple[np.ndarray, np.ndarray]]):
    """``(steps, mean, lo, hi)`` of several runs' (steps, values): on the steps common to all runs (or, if
    none are common, on the first run's steps with linear interpolation); lo/hi are the min and max."""
    series = [(x, y) for x, y in series if len(x)]
    if not series:
        return None
    common = series[0][0]
    for x, _ in series[1:]:
        common = np.intersect1d(common, x)
    if len(common) == 0:
        common = series[0][0]
    stack = np.stack([np.interp(common, x, y) for x, y in series])
    return common, stack.mean(0), stack.min(0), stack.max(0)


def curves_figure(runs, path=None, log_loss: bool = True):
    """Training curves of several runs, given as ``(label, records)`` with ``records`` the dicts of a
    metrics.jsonl (``kind`` "train"/"val", ``step``, ``loss``, ``perplexity`` and ``used_codes`` lists per
    level). Three panels: loss, perplexity and used codes over steps; solid = training (means over each log
    window), dashed with dots = validation (whole set, codebook frozen). Runs sharing a label (seeds of one
    configuration) are drawn as their mean with a min-max band; levels of VQ-VAE-2 as separate lines."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for label, records in runs:
        groups.setdefault(label, []).append(list(records))
    if not groups:
        raise ValueError("curves_figure needs at least one (label, records) run")
    # one legend entry per configuration (its colour) plus the two line styles, below the panels: with a dozen
    # configurations a per-line legend inside a panel hid the curves
    legend_cols = 4
    legend_rows = -(-(len(groups) + 3) // legend_cols)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4 + 0.17 * legend_rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(groups) > len(colors):  # distinct colours for up to 20 configurations
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    handles = []
    panels = [("loss", "loss (MSE + commitment)"), ("perplexity", "perplexity"), ("used_codes", "used codes")]
    for gi, (label, members) in enumerate(groups.items()):
        color = colors[gi % len(colors)]
        levels = _levels(members[0])
        suffix = f" (n={len(members)})" if len(members) > 1 else ""
        handles.append(Line2D([], [], color=color, lw=2, label=f"{label}{suffix}"))
        for ax, (key, _) in zip(axes, panels):
            for lv in ([None] if key == "loss" else range(levels)):
                for kind, style in (("train", dict(ls="-")), ("val", dict(ls="--", marker=".", ms=4))):
                    g = group_curve([_series(m, kind, key, lv) for m in members])
                    if g is None:
                        continue
                    x, mean, lo, hi = g
                    name = f"{label}{suffix} {kind}" + (f" L{lv}" if lv is not None and levels > 1 else "")
                    alpha = 1.0 if lv in (None, levels - 1) else 0.55
                    ax.plot(x, mean, color=color, alpha=alpha, label=name, **style)
                    if len(members) > 1:
                        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "loss" and log_loss and any(line.get_ydata().size and (line.get_ydata() > 0).all()
                                              for line in ax.get_lines()):
            ax.set_yscale("log")
    handles += [Line2D([], [], color="0.35", ls="-", label="train (window means)"),
                Line2D([], [], color="0.35", ls="--", marker=".", ms=4, label="validation")]
    if any(_levels(members[0]) > 1 for members in groups.values()):
        handles.append(Line2D([], [], color="0.35", alpha=0.55, lw=2, label="faded: upper levels (VQ-VAE-2 top)"))
    legend_height = (0.17 * legend_rows + 0.02) / fig.get_figheight()
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    return _finish(fig, path)


# ---------------------------------------------------------------------------------- neighbourhood maps
def neighborhood_figure(neighborhood, grid, steps: Sequence[int] = (0, 100), winner: int | None = None,
                        title: str | None = None, path=None):
    """Heat-maps of h_t(d(winner, k)) over the grid, one panel per step t in ``steps`` (the paper shows
    t = 0 and t = 100), with a shared colour scale [0, 1]. ``winner`` defaults to the code at the grid's
    centre. The panel title gives the total weight sum_k h_t(winner, k) an input writes."""
    if winner is None:
        winner = int(grid.coords_to_index(torch.tensor([s // 2 for s in grid.shape])))
    coords = grid.coords()
    dist = grid.offset_distance(coords - coords[winner])
    steps = list(steps)
    aspect = grid.shape[0] / max(grid.size // grid.shape[0], 1)
    panel_h = 2.6
    fig, axes = plt.subplots(1, len(steps), figsize=(len(steps) * min(panel_h * aspect, 6) + 1.0, panel_h + 0.4),
                             squeeze=False)
    im = None
    for ax, t in zip(axes[0], steps):
        w = neighborhood.weights(dist, t).float()
        im = ax.imshow(grid_image(w, grid), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"t = {t}: total weight {float(w.sum()):.1f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


# -------------------------------------------------------------------------------- U-matrix and hit map
def umatrix_figure(codebook: torch.Tensor, grid, counts=None, title: str | None = None, path=None):
    """Left: U-matrix, U_k = mean ||e_j - e_k|| over the grid neighbours j of k (dark valleys = clusters of
    similar codes, bright ridges = borders). Right (if ``counts`` (K,) is given): hit map, how many vectors
    of the evaluation set chose each code (black = dead code)."""
    n = 2 if counts is not None else 1
    aspect = grid.shape[0] / max(grid.size // grid.shape[0], 1)
    panel_h = 2.6
    fig, axes = plt.subplots(1, n, figsize=(n * (min(panel_h * aspect, 6) + 0.9), panel_h + 0.4), squeeze=False)
    im = axes[0, 0].imshow(grid_image(umatrix(codebook, grid), grid), cmap="magma", interpolation="nearest")
    axes[0, 0].set_title("U-matrix (mean distance to grid neighbours)", fontsize=8)
    fig.colorbar(im, ax=axes[0, 0], fraction=0.046, pad=0.02)
    if counts is not None:
        im = axes[0, 1].imshow(grid_image(counts, grid), cmap="inferno", interpolation="nearest")
        axes[0, 1].set_title("hit map (vectors per code)", fontsize=8)
        fig.colorbar(im, ax=axes[0, 1], fraction=0.046, pad=0.02)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------- reconstructions
def reconstruct(model, images: torch.Tensor, normalizer, batch_size: int = 64) -> torch.Tensor:
    """Reconstructions (B, C, H, W) in normalised space of uint8 images, model in eval mode (restored)."""
    device = _model_device(model)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(normalizer.normalize(images[s:s + batch_size].to(device))).reconstruction
                              for s in range(0, len(images), batch_size)])
    finally:
        for m, mode in was:
            m.training = mode


def reconstructions_figure(model, images: torch.Tensor, normalizer, columns: int = 8, title: str | None = None,
                           path=None):
    """Two panels: a grid of the uint8 input images (``columns`` per row) and, at the same positions, their
    reconstructions by ``model`` (in eval mode)."""
    inputs = to_pixels(images)
    recon = to_pixels(reconstruct(model, images, normalizer), normalizer)
    columns = min(columns, len(images))
    a, b = tile(inputs, columns, pad=1), tile(recon, columns, pad=1)
    scale = max(1.0, 480 / a.shape[1])  # small images (CIFAR) are drawn enlarged
    fig, axes = plt.subplots(1, 2, figsize=(2 * a.shape[1] * scale / DPI + 0.6, a.shape[0] * scale / DPI + 0.5))
    _show(axes[0], a)
    axes[0].set_title("inputs", fontsize=8)
    _show(axes[1], b)
    axes[1].set_title("reconstructions", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


# --------------------------------------------------------------------------------- channel errors
_CHANNEL_STYLES = {"binary": "-", "gray-grid": "--", "path": ":", "random": "-", "neighbor-grid": "--",
                   "neighbor-path": ":"}


def channel_curves_figure(panels, path=None, title: str | None = None):
    """Reconstruction MSE against an error rate (log x), one column per panel ``(title, xlabel, curves)``; top row
    the MSE, bottom row MSE / clean MSE (log y, a dotted line at 2: "MSE doubles"). ``curves`` are dicts
    ``{"method", "variant", "style", "rates", "mse", "clean_mse"}``: one colour per method (the same in every
    panel), one line style per ``style`` (assignment or substitution kind: solid, dashed, dotted)."""
    from matplotlib.ticker import FuncFormatter

    panels = list(panels)
    if not panels:
        raise ValueError("channel_curves_figure needs at least one (title, xlabel, curves) panel")
    methods = list(OrderedDict.fromkeys(c["method"] for _, _, curves in panels for c in curves))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(methods) > len(colors):
        colors = [plt.get_cmap("tab20")(i) for i in range(20)]
    color = {m: colors[i % len(colors)] for i, m in enumerate(methods)}
    variants = list(OrderedDict.fromkeys((c["variant"], c.get("style", c["variant"]))
                                         for _, _, curves in panels for c in curves))
    spare = ["-", "--", ":", "-."]
    style = {}
    for v, s in variants:
        style[v] = _CHANNEL_STYLES.get(s, spare[len(style) % len(spare)])
    legend_cols = 4
    legend_rows = -(-(len(methods) + len(variants)) // legend_cols)
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels) + 0.4, 6.4 + 0.17 * legend_rows),
                             squeeze=False)
    for col, (ptitle, xlabel, curves) in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        for c in curves:
            x = np.asarray(c["rates"], dtype=float)
            y = np.asarray(c["mse"], dtype=float)
            kw = dict(color=color[c["method"]], ls=style[c["variant"]], marker=".", ms=4, lw=1.3)
            top.plot(x, y, **kw)
            bottom.plot(x, y / float(c["clean_mse"]), **kw)
        bottom.axhline(2.0, color="0.3", ls=(0, (1, 3)), lw=1)
        top.set_title(ptitle, fontsize=9)
        for ax, ylabel in ((top, "reconstruction MSE"), (bottom, "MSE / clean MSE")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7, which="both")
            ax.grid(alpha=0.3, which="both")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, not 2 x 10^-1
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    handles = [Line2D([], [], color=color[m], lw=2, label=m) for m in methods]
    handles += [Line2D([], [], color="0.35", ls=style[v], label=v) for v, _ in variants]
    legend_height = (0.17 * legend_rows + 0.05) / fig.get_figheight()
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    return _finish(fig, path)


def channel_images_figure(rows, inputs: torch.Tensor, rate_titles: Sequence[str], path=None):
    """Decodings under errors, like :func:`index_offset_figure`: one row per ``(label, decodings, normalizer)``
    with ``decodings`` a list [clean, then one per error rate], each (n, C, H, W) in normalised space; columns:
    the uint8 inputs (n, C, H, W), the clean reconstruction, then each rate (titled by ``rate_titles``). Each
    cell tiles the n images side by side."""
    rows = list(rows)
    if not rows:
        raise ValueError("channel_images_figure needs at least one row")
    titles = ["input", "clean"] + list(rate_titles)
    if any(len(dec) != len(titles) - 1 for _, dec, _ in rows):
        raise ValueError(f"every row needs {len(titles) - 1} decodings (clean + one per rate)")
    n = inputs.shape[0]
    h, w = inputs.shape[-2:]
    cell_w = max(1.0, min(2.8, n * w / 48))
    cell_h = cell_w * h / (n * w) + 0.05
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(len(titles) * cell_w + 1.4, len(rows) * (cell_h + 0.05) + 0.4),
                             squeeze=False)
    inp = tile(to_pixels(inputs), n, pad=1)
    for r, (label, decodings, normalizer) in enumerate(rows):
        _show(axes[r, 0], inp)
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
        for c, dec in enumerate(decodings):
            _show(axes[r, c + 1], tile(to_pixels(dec[:n], normalizer), n, pad=1))
    for c, t in enumerate(titles):
        axes[0, c].set_title(t, fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)
