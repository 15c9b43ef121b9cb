"""Command line: --set parsing, bundled configs, clean errors, resume without --config, the demo."""
import json
from pathlib import Path
import subprocess
import sys

import pytest

from kohonen_vae.cli import SUBCOMMANDS, build_parser, format_comparison, main
from kohonen_vae.training import (ConfigError, apply_overrides, bundled_configs, load_config_file, parse_value,
                                  read_metrics, resolve_config)


def test_parse_value():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("3e-4") == 3e-4 and parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("null") is None
    assert parse_value("none") == "none"  # a neighbourhood name, not None
    assert parse_value("exponential") == "exponential"
    assert parse_value("[32, 16]") == [32, 16]


def test_set_overrides_and_shorthands():
    base = {"model": {"quantizer": {"type": "ksom", "neighborhood": "hard"}}, "train": {"lr": 1e-3}}
    cfg = apply_overrides(base, ["quantizer.neighborhood=exponential", "train.lr=3e-4", "max_steps=7",
                                 "model.quantizer.grid_shape=[8, 4]", "data.name=folder:/x=y"])
    assert cfg["model"]["quantizer"] == {"type": "ksom", "neighborhood": "exponential", "grid_shape": [8, 4]}
    assert cfg["train"] == {"lr": 3e-4, "max_steps": 7}
    assert cfg["data"]["name"] == "folder:/x=y"  # only the first '=' separates key and value
    assert base["train"]["lr"] == 1e-3  # the input is not modified
    removed = apply_overrides(base, ["quantizer.type=ema", "quantizer.neighborhood="])
    assert removed["model"]["quantizer"] == {"type": "ema"}
    resolve_config(removed)  # valid once the neighbourhood is gone
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(base, ["train.lr"])
    with pytest.raises(ConfigError, match="not a table"):
        apply_overrides(base, ["train.lr.x=1"])


def test_bundled_configs_resolve_with_the_paper_settings():
    names = bundled_configs()
    assert {"cifar10-ema", "cifar10-ksom-hard", "cifar10-ksom-exponential", "faces-vqvae2", "imagenet-vqvae2",
            "tiny", "demo"} <= set(names)
    cfgs = {n: resolve_config(load_config_file(n)) for n in names}
    for name in ("cifar10-ema", "cifar10-ksom-hard", "cifar10-ksom-exponential"):
        c = cfgs[name]
        q, t = c["model"]["quantizer"], c["train"]
        assert c["data"]["name"] == "cifar10" and c["model"]["arch"] == "vqvae" and c["model"]["embed_dim"] == 64
        assert q["codebook_size"] == 512 and q["grid_shape"] == [32, 16] and q["count_init"] == 1.0
        assert (t["lr"], t["batch_size"], t["max_steps"], t["eval_every"]) == (1e-3, 256, 30000, 1000)
        assert (t["grad_clip"], t["weight_decay"], t["betas"], t["bf16"]) == (1.0, 0.0, [0.9, 0.999], False)
    assert cfgs["cifar10-ema"]["model"]["quantizer"]["type"] == "ema"
    assert cfgs["cifar10-ksom-hard"]["model"]["quantizer"]["neighborhood"] == "hard"
    assert cfgs["cifar10-ksom-exponential"]["model"]["quantizer"]["neighborhood"] == "exponential"
    faces, imnet = cfgs["faces-vqvae2"], cfgs["imagenet-vqvae2"]
    assert faces["data"]["name"] == "utkface64" and faces["model"]["arch"] == "vqvae2"
    assert imnet["data"]["name"].startswith("folder:") and imnet["data"]["image_size"] == 256
    for c in (faces, imnet):
        assert (c["train"]["lr"], c["train"]["batch_size"]) == (3e-4, 128)
    # a bundled name and its path load the same thing
    from kohonen_vae.training import BUNDLED_DIR
    assert load_config_file(BUNDLED_DIR / "tiny.toml") == load_config_file("tiny")


def test_errors_are_one_clean_line(capsys):
    assert main(["train", "--config", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kohonen-vae train: error: config 'no-such-config'") and "cifar10-ksom-hard" in err
    assert main(["train", "--config", "tiny", "--set", "train.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "Valid train keys:" in err and "lr" in err and "Traceback" not in err
    assert main(["train", "--config", "tiny", "--set", "quantizer.type=ema"]) == 2  # tiny has a neighbourhood
    assert "not an option of the 'ema' quantizer" in capsys.readouterr().err


def test_missing_dataset_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kohonen_vae", "train", "--config", "cifar10-ema", "--data-dir",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "dataset 'cifar10' not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_train_and_resume_from_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.log_every=2"]
    assert main(["train", "--config", "tiny", "--out", str(out)] + fast) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert main(["train", "--config", "tiny", "--out", str(out)] + fast) == 2  # exists: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(out), "--set", "train.max_steps=6"]) == 0  # config.json reused
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"] == [2, 4, 6]


def test_demo_writes_a_table_and_one_run_per_method(tmp_path, capsys):
    shrink = ["--set", "model.channels=32", "--set", "model.res_channels=8", "--set", "data.val_max_images=32",
              "--no-report"]
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2"] + shrink) == 0
    text = capsys.readouterr().out
    assert "EMA-VQ" in text and "KSOM-hard" in text and "best val MSE" in text and "+20% step" in text
    for method, qtype in (("ema", "ema"), ("ksom-hard", "ksom")):
        run = tmp_path / "demo" / method
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 2 and str(run) in text
        assert json.loads((run / "config.json").read_text())["model"]["quantizer"]["type"] == qtype
        # the table shows this run's numbers
        assert f"{summary['best_val_recon']:.4f}" in text
    assert "ms/step" in text and "to EMA-VQ's best" in text


def test_demo_never_deletes_or_overwrites_and_picks_a_fresh_default_folder(tmp_path, monkeypatch, capsys):
    """Issue 10.1: `demo --out DIR` used to rmtree DIR/ema when DIR/ema/config.json existed."""
    user = tmp_path / "mine"
    (user / "ema" / "src").mkdir(parents=True)
    (user / "ema" / "config.json").write_text('{"mine": true}')
    (user / "ema" / "src" / "main.py").write_text("print('my code')")
    (user / "report.html").write_text("<p>my report</p>")
    assert main(["demo", "--out", str(user), "--steps", "1"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (user / "ema" / "src" / "main.py").read_text() == "print('my code')"
    assert (user / "ema" / "config.json").read_text() == '{"mine": true}'
    assert (user / "report.html").read_text() == "<p>my report</p>"
    # without --out: runs/demo, then runs/demo-2 (never the previous demo's folder)
    from kohonen_vae.cli import demo_folder

    monkeypatch.chdir(tmp_path)
    assert demo_folder(None) == Path("runs") / "demo"
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert demo_folder(None) == Path("runs") / "demo-2"


def test_subcommand_registry_is_extensible():
    def add(p):
        p.add_argument("--x", type=int)

    SUBCOMMANDS["echo-test"] = ("test only", add, lambda args: args.x)
    try:
        assert main(["echo-test", "--x", "5"]) == 5
    finally:
        del SUBCOMMANDS["echo-test"]
    assert "echo-test" not in build_parser().format_help()


def test_format_comparison():
    evals = [[4, 0.9], [8, 0.7], [12, 0.55], [16, 0.5]]
    rows = [("EMA-VQ", {"best_val_recon": 0.5, "best_step": 16, "converge_20_step": 12, "converge_10_step": 16,
                        "final_perplexity": [100.0], "final_used_codes": [200], "evals": evals}, 0.012),
            # stalls at 0.6: its own +20% step is early (4), but it never reaches EMA-VQ's best
            ("Stalled", {"best_val_recon": 0.6, "best_step": 4, "converge_20_step": 4, "converge_10_step": 4,
                         "final_perplexity": [3.0], "final_used_codes": [3], "evals": [[4, 0.6], [16, 0.65]]}, 0.02),
            ("KSOM-hard", {"best_val_recon": 0.4, "best_step": 16, "converge_20_step": 12, "converge_10_step": 16,
                           "final_perplexity": [90.0], "final_used_codes": [150],
                           "evals": [[4, 0.8], [8, 0.45], [12, 0.42], [16, 0.4]]}, None)]
    table = format_comparison(rows)
    header, _, ema, stalled, ksom = table.splitlines()[:5]
    assert header.split()[:4] == ["method", "val", "MSE", "@4"]  # the evaluation closest to a quarter of 16 steps
    assert ema.split() == ["EMA-VQ", "0.9000", "0.5000", "16", "16", "12", "16", "100.0", "200", "12"]
    assert stalled.split() == ["Stalled", "0.6000", "0.6000", "4", "never", "4", "4", "3.0", "3", "20"]
    assert ksom.split() == ["KSOM-hard", "0.8000", "0.4000", "16", "8", "12", "16", "90.0", "150", "-"]
