"""Figures (axes, images, pixel sizes, values) and the self-contained HTML report of tiny trained runs."""
import argparse
import base64
import json
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from kohonen_vae import figures  # noqa: E402
from kohonen_vae.data import Normalizer, load_splits  # noqa: E402
from kohonen_vae.geometry import Grid  # noqa: E402
from kohonen_vae.models import build_model  # noqa: E402
from kohonen_vae.neighborhood import HardNeighborhood  # noqa: E402

TINY = {"arch": "vqvae", "channels": 8, "res_channels": 4, "num_res_blocks": 1, "embed_dim": 4}
NORM = Normalizer([0.5, 0.4, 0.3], [0.25, 0.2, 0.3])


def tiny_model(arch="vqvae", seed=0, **q):
    torch.manual_seed(seed)
    return build_model({**TINY, "arch": arch, "quantizer": {"type": "ksom", "codebook_size": 8,
                                                            "grid_shape": [4, 2], **q}})


def images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


# ----------------------------------------------------------------------------------------------- figures
def test_codebook_mosaic_tiles_code_k_at_column_k_mod_s0():
    model = tiny_model()
    fig = figures.codebook_mosaic(model, NORM, 8, tile_size=None)
    (ax,) = image_axes(fig)
    mosaic = ax.images[0].get_array()
    assert mosaic.shape == (2 * 8, 4 * 8, 3)  # s1 = 2 rows x s0 = 4 columns of 8x8 tiles
    decoded = figures.to_pixels(NORM.denormalize(figures.decode_codebook(model, 0, 8)))
    for k in range(8):
        r, c = divmod(k, 4)
        assert np.allclose(mosaic[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], decoded[k], atol=1e-6)
    w, h = fig.get_size_inches() * fig.dpi
    assert w >= 4 * 8 and h >= 2 * 8


def test_codebook_mosaic_two_levels():
    model = tiny_model("vqvae2")
    fig = figures.codebook_mosaic(model, NORM, 64, fixed_codes=[3, 5], tile_size=16)
    axes = image_axes(fig)
    assert len(axes) == 2
    assert [a.images[0].get_array().shape for a in axes] == [(32, 64, 3), (32, 64, 3)]
    assert "bottom fixed to code 5" in axes[0].get_title() and "top fixed to code 3" in axes[1].get_title()


def test_index_offset_figure_rows_columns_and_offsets_clamped():
    runs = [("KSOM", tiny_model(seed=0), NORM), ("EMA", tiny_model(seed=1, type="ema"), NORM)]
    img = images(1, 8)[0]
    fig = figures.index_offset_figure(runs, img)
    assert len(image_axes(fig)) == 2 * 8  # input + 7 offsets per run
    model = runs[0][1]
    dec = figures.shifted_decodings(model, img, NORM, offsets=[-3, 0, 2])
    with torch.no_grad():
        idx = model.encode_indices(NORM.normalize(img[None]))[0]
        c0, c1 = idx % 4, idx // 4  # first axis varies fastest on the (4, 2) grid
        for row, o in enumerate([-3, 0, 2]):
            moved = (c0 + o).clamp(0, 3) + 4 * (c1 + o).clamp(0, 1)
            assert torch.allclose(dec[row], model.decode_indices([moved])[0], atol=1e-6)


def test_curves_figure_groups_seeds_as_mean_and_band():
    def recs(offset):
        out = []
        for s in (10, 20, 30):
            out.append({"kind": "train", "step": s, "loss": 1.0 / s + offset, "perplexity": [5.0 + offset],
                        "used_codes": [4.0 + offset]})
        out.append({"kind": "val", "step": 30, "loss": 0.5 + offset, "perplexity": [6.0], "used_codes": [5]})
        return out

    fig = figures.curves_figure([("A", recs(0.0)), ("A", recs(0.2)), ("B", recs(1.0))])
    assert len(fig.axes) == 3
    loss_ax = fig.axes[0]
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"A (n=2) train", "A (n=2) val", "B train", "B val"}
    assert np.allclose(lines["A (n=2) train"].get_ydata(), [1 / 10 + 0.1, 1 / 20 + 0.1, 1 / 30 + 0.1])
    assert len(loss_ax.collections) == 2  # min-max bands of group A only (train and val)
    assert np.allclose(figures.group_curve([(np.array([1, 2]), np.array([1.0, 3.0])),
                                            (np.array([1, 2]), np.array([3.0, 5.0]))])[1], [2.0, 4.0])


def test_neighborhood_figure_shows_hard_kernel():
    grid = Grid((5, 3))
    fig = figures.neighborhood_figure(HardNeighborhood(), grid, steps=(0, 100))
    axes = image_axes(fig)
    assert len(axes) == 2
    at0, at100 = (a.images[0].get_array() for a in axes)
    assert at0.shape == (3, 5)
    assert at0.sum() == pytest.approx(9.0)  # the centre code and its 8 Moore neighbours at weight 1
    assert at100.sum() == pytest.approx(1.0 + 8 / 11)  # neighbours at 1 / (1 + 0.1 * 100)


def test_umatrix_and_hitmap_figure():
    grid = Grid((4, 2))
    codebook = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.arange(8.0)
    fig = figures.umatrix_figure(codebook, grid, counts)
    u_ax, hit_ax = image_axes(fig)[:2]
    assert np.allclose(hit_ax.images[0].get_array(), counts.view(2, 4).numpy())
    assert np.allclose(u_ax.images[0].get_array(), figures.umatrix(codebook, grid).view(2, 4).numpy())


def test_reconstructions_figure_and_atomic_save(tmp_path):
    model = tiny_model()
    x = images(6, 8)
    path = tmp_path / "sub" / "recon.png"
    fig = figures.reconstructions_figure(model, x, NORM, columns=3, path=path)
    axes = image_axes(fig)
    assert len(axes) == 2
    assert axes[0].images[0].get_array().shape == (2 * 8 + 1, 3 * 8 + 2, 3)  # 2 rows x 3 columns, 1-px gaps
    assert np.allclose(axes[0].images[0].get_array()[:8, :8], x[0].permute(1, 2, 0).numpy() / 255.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["recon.png"]  # no temporary file left


# ------------------------------------------------------------------------------------------------ report
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def train_tiny(out, qtype, splits):
    from kohonen_vae.training import train

    q = {"type": qtype, "codebook_size": 8, "grid_shape": [4, 2]}
    if qtype == "ksom":
        q["neighborhood"] = "hard"
    cfg = {"seed": 0, "data": {"name": "sample", "val_max_images": 16, "test_max_images": 16},
           "model": {**TINY, "quantizer": q},
           "train": {"batch_size": 8, "max_steps": 4, "eval_every": 2, "log_every": 1, "checkpoint_every": 2,
                     "eval_batch_size": 16, "progress": False, "device": "cpu"}}
    return train(cfg, out, splits=splits)


def check_self_contained(text):
    stripped = DATA_URI.sub("DATA", text)
    for bad in ("http://", "https://", "//", "<link", "<script", "@import", "url("):
        assert bad not in stripped, bad
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert re.findall(r"\bsrc=", stripped) == ["src="] * len(srcs)
    for uri in DATA_URI.findall(text):
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    return len(srcs)


def test_report_of_tiny_runs_is_self_contained_and_complete(tmp_path, capsys):
    from kohonen_vae import report

    full = load_splits("sample")
    splits = type(full)(train=type(full.train)(full.train.images[:64], None, "train"), val=full.val, test=None,
                        normalizer=full.normalizer, info=full.info)
    train_tiny(tmp_path / "ksom", "ksom", splits)
    train_tiny(tmp_path / "ema", "ema", splits)
    assert not (tmp_path / "ksom" / "report.html").exists()  # train() itself writes no report
    assert report.write_report([tmp_path / "ksom"]) == tmp_path / "ksom" / "report.html"

    single = (tmp_path / "ksom" / "report.html").read_text()
    # curves, reconstructions, mosaic, U-matrix, neighbourhood, offset
    assert check_self_contained(single) == 6
    for section in ("curves", "run-0-metrics", "run-0-config", "run-0-reconstructions", "run-0-mosaic",
                    "run-0-umatrix-bottom", "run-0-neighborhood", "run-0-offset"):
        assert f'id="{section}"' in single, section

    # the CLI entry: kohonen-vae report RUN_DIR RUN_DIR --out FILE
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    out = tmp_path / "cmp.html"
    assert report.run(parser.parse_args([str(tmp_path / "ksom"), str(tmp_path / "ema"), "--out", str(out),
                                         "--device", "cpu"])) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}" in printed
    assert "map smooth" in printed and "KSOM-hard" in printed and "EMA-VQ" in printed
    text = out.read_text()
    # curves + offset + per run (reconstructions, mosaic, U-matrix) + KSOM neighbourhood
    assert check_self_contained(text) == 2 + 3 + 3 + 1
    for section in ("comparison", "curves", "offset", "run-0-mosaic", "run-1-mosaic", "run-0-config",
                    "run-1-config", "run-0-neighborhood"):
        assert f'id="{section}"' in text, section
    assert "KSOM-hard" in text and "EMA-VQ" in text
    assert "map smoothness" in text and "topographic error" in text
    summary = json.loads((tmp_path / "ema" / "summary.json").read_text())
    assert f"{summary['best_val_recon']:.4g}" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.html", "ema", "ksom"]  # atomic, no temp files
    # a file that is not one of our reports is never replaced
    (tmp_path / "notes.html").write_text("<html>my notes</html>")
    with pytest.raises(ValueError, match="not a kohonen-vae report"):
        report.write_report([tmp_path / "ksom"], tmp_path / "notes.html")
    assert (tmp_path / "notes.html").read_text() == "<html>my notes</html>"

    with pytest.raises(FileNotFoundError, match="not a run directory"):
        report.write_report([tmp_path], tmp_path / "x.html")


def test_seed_grouping_ignores_settings_that_change_nothing_computed(tmp_path):
    """Issue 11 item 18: runs that differ only in the seed and train.report are seeds of one configuration."""
    from kohonen_vae.report import Run, assign_labels
    from kohonen_vae.training import resolve_config

    def run(name, **train):
        cfg = resolve_config({"seed": len(name), "data": {"name": "sample"}, "model": {"quantizer": {"type": "ema"}},
                              "train": train})
        return Run(path=tmp_path / name, config=cfg, records=[], summary=None, model=None, normalizer=None,
                   checkpoint="last", step=0)

    runs = [run("a", report=True), run("bb", report=False, progress=False), run("ccc", lr=3e-4)]
    assign_labels(runs)
    assert runs[0].label == runs[1].label == "EMA-VQ [a]"
    assert runs[2].label == "EMA-VQ [ccc]"
