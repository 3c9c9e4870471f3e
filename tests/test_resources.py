"""Ray resources per simulated client: the ``num-cpus`` / ``num-gpus`` scenario keys."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_clip21 import config
from fl_clip21.config import ConfigError
from fl_clip21.flower.simulation import backend_config

REPO = Path(__file__).resolve().parent.parent
NO_GPU = torch.cuda.device_count() == 0


@pytest.fixture
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_num_gpus_defaults_to_zero_and_takes_fractions():
    assert config.resolve({})["num-gpus"] == 0.0
    cfg = config.resolve({}, config.parse_sets(["num-gpus=0.25"]))
    assert cfg["num-gpus"] == 0.25 and type(cfg["num-gpus"]) is float


@pytest.mark.parametrize("value,rule", [("-0.5", "must be >= 0"), ("x", "must be a number"), ("inf", "must be finite")])
def test_bad_num_gpus_names_key_and_value(value, rule):
    with pytest.raises(ConfigError) as ei:
        config.resolve({}, config.parse_sets([f"num-gpus={value}"]))
    assert "num-gpus" in str(ei.value) and value in str(ei.value) and rule in str(ei.value)


def test_client_resources_carry_num_cpus_and_num_gpus(no_ray_address):
    cfg = config.resolve({}, config.parse_sets(["num-cpus=0.5"]))
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}


def test_gpus_are_passed_to_ray_when_the_machine_has_them(no_ray_address, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = config.resolve({}, config.parse_sets(["num-gpus=0.5", "num-cpus=2"]))
    assert backend_config(cfg)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}


def test_gpus_on_a_machine_without_gpu_is_a_config_error(no_ray_address, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = config.resolve({}, config.parse_sets(["num-gpus=0.5"]))
    with pytest.raises(ConfigError) as ei:
        backend_config(cfg)
    assert "num-gpus" in str(ei.value) and "0.5" in str(ei.value) and "no GPU" in str(ei.value)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cli_num_gpus_without_gpu_exits_2_before_ray_starts(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fl_clip21.cli", "run", "scenarios/mean-estimation.toml",
         "--set", "num-gpus=1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "num-gpus" in proc.stderr and "1.0" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()
    assert "round" not in proc.stdout + proc.stderr  # nothing was simulated
    assert time.monotonic() - start < 60


def test_more_cpus_per_client_than_the_machine_has_is_a_config_error(no_ray_address):
    # Flower's actor pool would be empty: the run would crash or hang.
    import os

    too_many = float((os.cpu_count() or 1) + 1)
    cfg = config.resolve({}, config.parse_sets([f"num-cpus={too_many}"]))
    with pytest.raises(ConfigError) as ei:
        backend_config(cfg)
    assert "num-cpus" in str(ei.value) and repr(too_many) in str(ei.value)
