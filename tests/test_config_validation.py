"""Config values fail at resolve time, before any data is decoded, with one line that names the key
(issue "Hardening II", item 11)."""
import subprocess
import sys

import pytest

from kohonen_vae.errors import ConfigError
from kohonen_vae.training import apply_overrides, load_config_file, resolve_config


def tiny(*overrides):
    return apply_overrides(load_config_file("tiny"), list(overrides))


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "train.lr must be a number in \\(0, 1\\]"),
    ("train.lr=1e30", "train.lr must be a number in \\(0, 1\\]"),
    ("train.lr=nan", "train.lr"),
    ("train.grad_clip=inf", "train.grad_clip must be a finite number"),
    ("quantizer.eps=nan", "quantizer.eps must be a finite number"),
    ("quantizer.commitment_weight=nan", "quantizer.commitment_weight must be a finite number"),
    ("quantizer.count_init=nan", "quantizer.count_init must be a finite number"),
    ("quantizer.shrink=nan", "quantizer.shrink must be a finite number"),
    ("quantizer.sigma=nan", "quantizer.sigma must be a finite number"),
    ("quantizer.decay=1.5", "decay"),
    ("quantizer.grid_shape=[8.5, 4]", "grid_shape must be a list of positive integers.*8.5"),
    ("quantizer.grid_shape=abc", "grid_shape must be a list of positive integers.*'abc'"),
    ("quantizer.grid_shape=[4, 4]", "grid"),  # 16 cells for K = 32 codes
    (f"seed={2 ** 32}", "seed must be an integer in \\[0, 2\\*\\*32\\)"),
    ("seed=-1", "seed must be an integer"),
    ("train.device=meta", "meta.*cannot train"),
    ("data.val_fraction=nan", "data.val_fraction"),
])
def test_bad_values_fail_at_resolve_time(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(tiny(override))


def test_integral_grid_shape_floats_are_accepted_and_stored_as_ints():
    cfg = resolve_config(tiny("quantizer.grid_shape=[8.0, 4]"))
    assert cfg["model"]["quantizer"]["grid_shape"] == [8, 4]
    assert all(type(s) is int for s in cfg["model"]["quantizer"]["grid_shape"])


def test_non_utf8_config_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'seed = 0\n# caf\xe9 in latin-1\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(path)


def test_cli_reports_a_bad_value_in_one_line_without_creating_the_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "kohonen_vae", "train", "--config", "tiny", "--out", str(out),
                           "--set", "quantizer.sigma=nan"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "quantizer.sigma must be a finite number" in proc.stderr
    assert not out.exists()
