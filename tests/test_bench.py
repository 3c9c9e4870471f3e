"""``fl-clip21 bench`` end to end on a small run: every figure is there and checked where it can be."""

from __future__ import annotations

import json

import pytest

from fl_clip21.cli import main


@pytest.mark.slow  # a Flower simulation per client count; the engines bench is in tests/test_batched.py
def test_bench_prints_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--clients", "3", "--rounds", "2", "--repeats", "1", "--soak-rounds", "6", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "growth" in printed and "per client" in printed
    result = json.loads(out.read_text())
    assert result["machine"]["cpus"] >= 1
    (row,) = result["results"]
    d = row["model_entries"]
    assert row["clients"] == 3 and d == 31  # 30 synthetic features and the bias
    assert row["ratio"] > 0 and row["clip21_client_rounds_per_second"] > 0
    # clip21-gd sends a dense float64 increment: d * 8 bytes of values, plus Flower's framing.
    assert row["clip21_payload_bytes_up_per_client_round"] == d * 8
    assert row["clip21_bytes_up_per_client_round"] > d * 8
    assert row["clip21_bytes_down_per_client_round"] > d * 8
    # The vectorized engine ran the same rounds to the same model.
    assert row["vectorized_max_param_difference"] < 1e-12
    assert row["vectorized_speedup"] > 0
    cpu = row["cpu_us_per_client_round"]
    assert all(cpu[k] > 0 for k in ("configure", "train", "pickle", "aggregate", "fedavg_train", "fedavg_pickle"))
    assert len(row["soak"]["driver_rss_mb"]) == 6 and row["driver_peak_mb"] >= row["driver_rss_mb"] > 0
    mem = result["memory"]
    assert mem["clients"] == 3 and mem["model_bytes"] == 800_000
    # Allocations held: every client holds its v_i; the server holds x and g, no copy per client.
    assert mem["live_client_state_bytes_per_client"] >= mem["model_bytes"]
    server_live = (mem["live_added_bytes_per_client"] - mem["live_client_state_bytes_per_client"]) * 3
    assert 2 * mem["model_bytes"] <= server_live < 3 * mem["model_bytes"]
    assert mem["server_copies_file_bytes"] >= 3 * mem["model_bytes"]


def test_bench_refuses_bad_arguments(capsys):
    assert main(["bench", "--clients", "3,x"]) == 2
    assert "--clients" in capsys.readouterr().err
    assert main(["bench", "--clients", "3", "--soak-rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert "--soak-rounds" in err and "2" in err
    assert main(["bench", "--clients", "3", "--scenario", "/nonexistent/x.toml"]) == 2
    assert "/nonexistent/x.toml" in capsys.readouterr().err
