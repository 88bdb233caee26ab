"""benchmarks/inference.py and benchmarks/loadtest.py, run with tiny settings: their numbers are consistent (no
timing is checked: this machine's speed is nobody's business here)."""

from __future__ import annotations

import json

import pytest

from .conftest import load_benchmark


def test_inference_benchmark_measures_three_runtimes(trained_run, tmp_path, capsys):
    bench = load_benchmark("inference")
    out = bench.main(["--run", f"cnn={trained_run}", "--models", "cnn", "--out", str(tmp_path), "--reps", "3",
                      "--seconds", "0.01", "--batch", "8", "--test-images", "120", "--calibration-images", "32",
                      "--threads", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == json.loads(json.dumps(out))  # the JSON last line
    assert any(line.startswith("cnn       onnx-int8") for line in printed)
    res = out["models"]["cnn"]
    for rt in ("pytorch", "onnx-fp32", "onnx-int8"):
        r = res[rt]
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["images_per_s"] > 0 and 0 <= r["test_acc"] <= 1
    # The same 120 test images for every runtime and for export's sidecar; fp32 ONNX is the PyTorch model.
    side = res["int8_vs_fp32"]["export_sidecar"]
    assert side["images"] == 120
    assert res["onnx-fp32"]["test_acc"] == pytest.approx(side["fp32"], abs=1e-5)  # rounded to 5 decimals
    assert res["onnx-int8"]["test_acc"] == pytest.approx(side["int8"], abs=1e-5)
    assert abs(res["pytorch"]["test_acc"] - res["onnx-fp32"]["test_acc"]) <= 1 / 120 + 1e-9
    assert res["onnx-int8"]["file_mb"] < res["onnx-fp32"]["file_mb"] / 2
    c = res["int8_vs_fp32"]
    assert c["speedup"] == pytest.approx(res["onnx-int8"]["images_per_s"] / res["onnx-fp32"]["images_per_s"],
                                         rel=1e-2)
    assert isinstance(c["target_met"], bool)


def test_loadtest_runs_both_settings_and_samples_memory(trained_run, tmp_path, capsys):
    from cifarlab.export import export_run

    bench = load_benchmark("loadtest")
    model = export_run(trained_run, "onnx", tmp_path)
    out = bench.main([str(model), "--requests", "12", "--concurrency", "1", "4", "--warmup", "2",
                      "--memory-requests", "16", "--memory-every", "8", "--max-batch", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"]["format"] == "onnx"
    on, off = out["results"]["on"], out["results"]["off"]
    assert on["exit_code"] == 0 and off["exit_code"] == 0  # Ctrl-C: drained and stopped
    assert "--max-batch" in on["flags"] and on["flags"][on["flags"].index("--max-batch") + 1] == "4"
    assert off["flags"][off["flags"].index("--max-batch") + 1] == "1"
    for res in (on, off):
        for conc in (1, 4):
            r = res["levels"][conc]
            assert r["requests"] == 12 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert off["levels"][4]["mean_batch"] == 1.0 and 1.0 <= on["levels"][4]["mean_batch"] <= 4.0
    mem = on["memory"]
    assert mem["requests"] == 16 and mem["errors"] == 0 and [s[0] for s in mem["rss_mb"]] == [0, 8, 16]
    assert all(s[1] > 10 for s in mem["rss_mb"])  # a real process's resident memory, in MB
