import json
import re

import pytest

from kohonen_vae.reproduce import EXPERIMENTS, SCALES, long_experiments, aggregate, markdown_table, plan, reproduce
from kohonen_vae.training.config import resolve_config


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@pytest.mark.parametrize("scale", SCALES)
def test_every_configuration_grid_builds_and_validates(experiment, scale):
    if experiment == "field":
        pytest.importorskip("vector_quantize_pytorch", reason="the field grid builds vector-quantize-pytorch "
                                                              "quantisers: pip install 'kohonen-vae[field]'")
    if scale == "long" and experiment not in long_experiments():
        with pytest.raises(ValueError, match="long is defined for"):
            plan(experiment, scale, seeds=2)
        return
    runs = plan(experiment, scale, seeds=2)
    exp = EXPERIMENTS[experiment]
    n_variants = len(exp.long_variants) if scale == "long" and exp.long_variants else len(exp.variants)
    assert len(runs) == 2 * n_variants
    resolved = [resolve_config(cfg) for _, _, cfg in runs]
    assert {c["seed"] for c in resolved} == {0, 1}
    # no two variants collapse onto the same configuration
    keys = {repr(sorted(c["model"]["quantizer"].items())) + repr(c["train"]) for c in resolved if c["seed"] == 0}
    assert len(keys) == n_variants
    if scale == "paper":
        assert all(c["train"]["max_steps"] == 30000 and c["train"]["eval_every"] == 1000 for c in resolved)
    if scale == "cpu":
        assert all(c["train"]["max_steps"] <= 1000 for c in resolved)
    if scale == "long":  # whole validation and test splits, 16+ epochs of batch 64
        for c in resolved:
            t, d = c["train"], c["data"]
            assert t["batch_size"] == 64 and t["max_steps"] >= 10000 and t["eval_every"] == 500
            assert d["val_max_images"] is None and d["test_max_images"] is None and t["test_at_end"]


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
    table = (tmp_path / "main-tiny" / "results.md").read_text()
    for label in ("EMA-VQ", "KSOM hard", "KSOM Gaussian"):
        assert re.search(rf"\| {label} \| 2 \| \d+\.\d\d ± \d+\.\d\d \|", table), table
    assert "kohonen-vae reproduce main --scale tiny --seeds 2" in table
    html = out["report"].read_text()
    assert "id='aggregate'" in html and "id='curves'" in html
    assert not re.search(r"(src|href)=[\"'](?!data:|#)", html)
    assert "http://" not in html and "https://" not in html
    summaries = {p: p.stat().st_mtime_ns for p in tmp_path.glob("main-tiny/*/seed*/summary.json")}
    assert len(summaries) == 6

    logs.clear()
    again = reproduce("main", tmp_path, scale="tiny", seeds=2, log=logs.append)
    assert sum("skipped" in line for line in logs) == 6 and not any("training ->" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in summaries} == summaries
    assert again["table"] == out["table"]


def _fake_run(d, best, evals, steps=1000, max_steps=1000, summary=True, test=None):
    import json

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"train": {"max_steps": max_steps}}))
    if summary:
        s = {"steps": steps, "best_val_recon": best, "converge_10_step": evals[-1][0], "converge_20_step": evals[0][0],
             "final_perplexity": [100.0], "final_used_codes": [200], "evals": evals,
             "best_step": min(evals, key=lambda e: e[1])[0] if evals else None}
        if test is not None:
            s["test"] = {"recon": test, "images": 10000}
        (d / "summary.json").write_text(json.dumps(s))
    return d


def test_aggregate_means_and_stds(tmp_path):
    from kohonen_vae.reproduce import Variant

    runs = []
    for seed, (loss, c20) in enumerate([(0.010, 100), (0.014, 300)]):
        d = _fake_run(tmp_path / f"s{seed}", loss, [(c20, loss * 1.1), (c20 + 50, loss)])
        runs.append((Variant("EMA-VQ", {"type": "ema"}), seed, d))
    rows = aggregate("main", runs)
    assert len(rows) == 1 and rows[0]["n"] == 2
    mean, std = rows[0]["loss"]
    assert mean == pytest.approx(12.0) and std == pytest.approx(2.0 * 2 ** 0.5)
    assert rows[0]["c20"][0] == pytest.approx(200) and rows[0]["perplexity"] == [pytest.approx(100.5 - 0.5)]
    # the common threshold is EMA-VQ's mean best, 0.012: seed 0 reaches it at 100 (0.011), seed 1 never does
    assert rows[0]["reach"] == (100.0, 0.0) and rows[0]["reached"] == 1
    assert ("| EMA-VQ | 2 | 12.00 ± 2.83 | 100 ± 0 (1 of 2 runs) | 250 ± 141 | 200 ± 141 | 100 | 200 |"
            in markdown_table("main", rows))


def test_partial_grid_counts_only_finished_runs_and_marks_the_rest(tmp_path):
    from kohonen_vae.reproduce import Variant

    ema, hard = Variant("EMA-VQ", {"type": "ema"}), Variant("KSOM hard", {"type": "ksom"})
    runs = [
        (ema, 0, _fake_run(tmp_path / "ema0", 0.010, [(500, 0.02), (1000, 0.010)])),
        # a run extended to 2,000 steps that has not got there yet: its old summary must not count
        (ema, 1, _fake_run(tmp_path / "ema1", 0.5, [(500, 0.5)], steps=1000, max_steps=2000)),
        (hard, 0, _fake_run(tmp_path / "hard0", 0.008, [(500, 0.009), (1000, 0.008)])),
        (hard, 1, _fake_run(tmp_path / "hard1", None, [], summary=False)),  # still training
    ]
    rows = {r["label"]: r for r in aggregate("main", runs)}
    assert rows["EMA-VQ"]["n"] == 1 and rows["EMA-VQ"]["planned"] == 2
    assert rows["EMA-VQ"]["loss"] == (pytest.approx(10.0), 0.0)  # the unfinished 0.5 is not averaged in
    assert rows["KSOM hard"]["reach"] == (500.0, 0.0)  # 0.009 <= EMA-VQ's best 0.010 at step 500
    table = markdown_table("main", rows.values())
    assert "| EMA-VQ | 1 of 2* |" in table and "| KSOM hard | 1 of 2* |" in table
    assert "not counted" in table


def test_long_scale_tables_give_test_mse_and_step_of_best(tmp_path):
    """Issue 15: the long-horizon table has the final model's test MSE and the step of the best validation
    MSE; a row is only given a test MSE when every counted run has one."""
    from kohonen_vae.reproduce import Variant

    ema, hard = Variant("EMA-VQ", {"type": "ema"}), Variant("KSOM hard", {"type": "ksom"})
    runs = [
        (ema, 0, _fake_run(tmp_path / "ema0", 0.050, [(500, 0.09), (1000, 0.050), (1500, 0.052)], test=0.051)),
        (ema, 1, _fake_run(tmp_path / "ema1", 0.054, [(500, 0.08), (1000, 0.060), (1500, 0.054)], test=0.055)),
        (hard, 0, _fake_run(tmp_path / "hard0", 0.049, [(500, 0.049), (1000, 0.050)])),  # no test split
    ]
    rows = {r["label"]: r for r in aggregate("main", runs)}
    assert rows["EMA-VQ"]["test"] == (pytest.approx(53.0), pytest.approx(2 * 2 ** 0.5))  # 51, 55
    assert rows["EMA-VQ"]["best_step"] == (1250.0, pytest.approx(353.55, abs=0.01))
    assert rows["KSOM hard"]["test"] == (None, None) and rows["KSOM hard"]["best_step"] == (500.0, 0.0)
    table = markdown_table("main", rows.values())
    assert table.splitlines()[0].startswith("| configuration | runs | best val MSE ×10^3 | test MSE ×10^3 | step of best |")
    assert "| EMA-VQ | 2 | 52.00 ± 2.83 | 53.00 ± 2.83 | 1250 ± 354 |" in table
    assert "| KSOM hard | 1 | 49.00 ± 0.00 | – | 500 ± 0 | 500 ± 0 |" in table  # reaches EMA-VQ's best 0.052 at 500
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines()[:5])
    # without any test split the columns are not there (the cpu-scale tables of older runs)
    plain = markdown_table("main", aggregate("main", runs[2:]))
    assert "test MSE" not in plain and "step of best" not in plain


def test_tiny_field_trains_every_baseline_and_tables_organisation_and_step_times(tmp_path):
    """Issue 12: the field grid (native collapse fixes and vector-quantize-pytorch's VectorQuantize, FSQ and
    SimVQ through type = "vqp") trains in our trainer and its table has the organisation columns."""
    pytest.importorskip("vector_quantize_pytorch", reason="pip install 'kohonen-vae[field]'")
    from kohonen_vae.reproduce import FIELD_VARIANTS

    logs = []
    out = reproduce("field", tmp_path, scale="tiny", seeds=1, log=logs.append)
    rows = {r["label"]: r for r in out["rows"]}
    assert set(rows) == {v.label for v in FIELD_VARIANTS} and all(r["n"] == 1 for r in rows.values())
    for label, r in rows.items():
        assert r["ms_per_step"] is not None and r["ms_per_step"] > 0, label
        te, smooth, ratio = (r["organisation"][k][0] for k in ("topographic_error", "map_smoothness",
                                                                  "perturbation_mse_ratio"))
        assert 0 <= te <= 1 and smooth > 0 and ratio is not None and ratio > 0, label
    assert rows["FSQ 8x8x8"]["organisation"]["topographic_error"][0] == 0  # a lattice: the 2 nearest are neighbours
    table = (tmp_path / "field-tiny" / "results.md").read_text()
    assert "index-perturbation MSE ratio" in table and "ms / step" in table and "| SimVQ | 1 |" in table
    times = json.loads((tmp_path / "field-tiny" / "step_times.json").read_text())
    assert set(times["times"]) == set(rows)


def test_only_trains_the_named_configurations_and_the_table_marks_the_rest(tmp_path):
    logs = []
    out = reproduce("main", tmp_path, scale="tiny", seeds=1, log=logs.append, only=["ksom hard"])
    assert sum("training ->" in line for line in logs) == 1 and sum("not in --only" in line for line in logs) == 2
    rows = {r["label"]: r for r in out["rows"]}
    assert rows["KSOM hard"]["n"] == 1 and rows["EMA-VQ"]["n"] == 0 and rows["EMA-VQ"]["planned"] == 1
    assert "| EMA-VQ | 0 of 1* |" in out["table"]
    with pytest.raises(ValueError, match="not a configuration of main"):
        plan("main", "tiny", 1, only=["KSOM hardd"])


def test_a_finished_run_whose_max_steps_was_raised_is_resumed_not_skipped(tmp_path):
    from kohonen_vae.reproduce import _run_state
    from kohonen_vae.training import train

    (variant, _, cfg), = plan("main", "tiny", 1, only=["EMA-VQ"])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert _run_state(run_dir, cfg) == "done"
    longer = json.loads(json.dumps(cfg))
    longer["train"]["max_steps"] += 3
    assert _run_state(run_dir, longer) == "partial"


def test_reproduce_channel_without_field_runs_is_one_clear_error(tmp_path, capsys):
    from kohonen_vae.cli import main

    assert main(["reproduce", "channel", "--scale", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no finished field runs" in err and "kohonen-vae reproduce field --scale tiny" in err


def test_steps_to_reference_is_a_dash_when_no_ema_vq_run_finished(tmp_path):
    from kohonen_vae.reproduce import Variant

    runs = [(Variant("KSOM hard", {"type": "ksom"}), 0, _fake_run(tmp_path / "h", 0.008, [(500, 0.009)]))]
    rows = aggregate("main", runs)
    assert rows[0]["reached"] is None
    assert "| KSOM hard | 1 | 8.00 ± 0.00 | – |" in markdown_table("main", rows)
