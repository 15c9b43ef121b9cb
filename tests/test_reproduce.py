import re

import pytest

from kohonen_vae.reproduce import EXPERIMENTS, SCALES, aggregate, markdown_table, plan, reproduce
from kohonen_vae.training.config import resolve_config


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@pytest.mark.parametrize("scale", SCALES)
def test_every_configuration_grid_builds_and_validates(experiment, scale):
    runs = plan(experiment, scale, seeds=2)
    assert len(runs) == 2 * len(EXPERIMENTS[experiment].variants)
    resolved = [resolve_config(cfg) for _, _, cfg in runs]
    assert {c["seed"] for c in resolved} == {0, 1}
    # no two variants collapse onto the same configuration
    keys = {repr(sorted(c["model"]["quantizer"].items())) + repr(c["train"]) for c in resolved if c["seed"] == 0}
    assert len(keys) == len(EXPERIMENTS[experiment].variants)
    if scale == "paper":
        assert all(c["train"]["max_steps"] == 30000 and c["train"]["eval_every"] == 1000 for c in resolved)
    if scale == "cpu":
        assert all(c["train"]["max_steps"] <= 1000 for c in resolved)


def test_grids_cover_the_papers_tables():
    q = lambda e: [cfg["model"]["quantizer"] for _, _, cfg in plan(e, "paper", 1)]
    rob = q("robustness")
    assert {(r["type"], r.get("neighborhood", "none"), r["count_init"], r["update_unused"]) for r in rob} == {
        (t, nb, n0, uu) for t, nb in (("ema", "none"), ("ksom", "hard"), ("ksom", "exponential"))
        for n0 in (0.0, 1.0) for uu in (True, False)}
    abl = q("ablation")
    assert sorted((a.get("neighborhood", "none"), a.get("grid_dims", 2), a.get("shrink")) for a in abl) == sorted(
        [("none", 2, None), ("hard", 1, 0.1), ("exponential", 1, 0.1)]
        + [(nb, 2, tau) for nb in ("hard", "exponential") for tau in (1.0, 0.1, 0.01)])
    sens = q("sensitivity")
    assert sorted(s["codebook_size"] for s in sens if s["codebook_size"] != 512) == [128, 256, 1024]
    assert sorted(round(1 - s["decay"], 3) for s in sens if "decay" in s) == [0.001, 0.03, 0.1, 0.5]
    assert sorted(s["commitment_weight"] for s in sens if "commitment_weight" in s) == [0.0, 0.1, 0.5, 1.0]
    assert len(sens) == 12  # the default (512, 0.25, 0.01) is trained once for all three axes
    assert {s.get("target") for s in q("gradient-som") if s["type"] == "gdsom"} == {"winner", "input"}
    faces = [cfg for _, _, cfg in plan("faces", "paper", 1)]
    assert all(c["model"]["arch"] == "vqvae2" and c["data"]["name"] == "utkface64" for c in faces)


def test_unknown_experiment_and_bad_seeds():
    with pytest.raises(ValueError, match="choose one of main"):
        plan("imagenet")
    with pytest.raises(ValueError, match="seeds"):
        plan("main", "tiny", seeds=0)


def test_tiny_reproduction_end_to_end_then_skips_finished_runs(tmp_path):
    logs = []
    out = reproduce("main", tmp_path, scale="tiny", seeds=2, log=logs.append)
    assert sum("training" in line for line in logs) == 6
    table = (tmp_path / "main" / "results.md").read_text()
    for label in ("EMA-VQ", "KSOM hard", "KSOM Gaussian"):
        assert re.search(rf"\| {label} \| 2 \| \d+\.\d\d ± \d+\.\d\d \|", table), table
    assert "kohonen-vae reproduce main --scale tiny --seeds 2" in table
    html = out["report"].read_text()
    assert "id='aggregate'" in html and "id='curves'" in html
    assert not re.search(r"(src|href)=[\"'](?!data:|#)", html)
    assert "http://" not in html and "https://" not in html
    summaries = {p: p.stat().st_mtime_ns for p in tmp_path.glob("main/*/seed*/summary.json")}
    assert len(summaries) == 6

    logs.clear()
    again = reproduce("main", tmp_path, scale="tiny", seeds=2, log=logs.append)
    assert sum("skipped" in line for line in logs) == 6 and not any("training ->" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in summaries} == summaries
    assert again["table"] == out["table"]


def test_aggregate_means_and_stds(tmp_path):
    import json

    from kohonen_vae.reproduce import Variant

    runs = []
    for seed, (loss, c20) in enumerate([(0.010, 100), (0.014, 300)]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "best_val_recon": loss, "converge_10_step": c20 + 50, "converge_20_step": c20,
            "final_perplexity": [100.0 + seed], "final_used_codes": [200 + seed]}))
        runs.append((Variant("EMA-VQ", {"type": "ema"}), seed, d))
    rows = aggregate("main", runs)
    assert len(rows) == 1 and rows[0]["n"] == 2
    mean, std = rows[0]["loss"]
    assert mean == pytest.approx(12.0) and std == pytest.approx(2.0 * 2 ** 0.5)
    assert rows[0]["c20"][0] == pytest.approx(200) and rows[0]["perplexity"] == [pytest.approx(100.5)]
    assert "| EMA-VQ | 2 | 12.00 ± 2.83 | 250 ± 141 | 200 ± 141 | 100 | 200 |" in markdown_table("main", rows)
