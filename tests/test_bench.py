import json

import pytest
import torch

import kecompress
from kecompress.bench import count_macs_params, latency_table, measure_latency
from kecompress.errors import KecompressError

from conftest import build

SHAPE = (3, 64, 64)


@pytest.fixture(scope="module")
def resnet18_pair():
    dense = build("resnet18")
    example = torch.randn(1, *SHAPE)
    return dense, kecompress.slice_fit(dense, kecompress.split(dense, "kels", 0.5, example), example)


def test_fit_at_rate_half_has_about_a_quarter_of_the_macs(resnet18_pair):
    dense, fit = resnet18_pair
    dense_macs, dense_params = count_macs_params(dense, SHAPE)
    fit_macs, fit_params = count_macs_params(fit, SHAPE)
    assert dense_params == sum(p.numel() for p in dense.parameters())
    assert fit_params == sum(p.numel() for p in fit.parameters())
    assert 3.3 <= dense_macs / fit_macs <= 4.1  # about 1 / rate**2; the stem keeps its RGB inputs


# The keys of `kecompress bench --json`, as earlier versions wrote them.
JSON_ROW_KEYS = ["batch_size", "macs_ratio"] + [f"{runtime}_{key}" for runtime in ("ort", "torch") for key in (
    "dense_median_ms", "dense_p90_ms", "fit_median_ms", "fit_p90_ms", "speedup", "efficiency")]


def test_measure_latency_reports_every_field(resnet18_pair):
    dense, fit = resnet18_pair
    threads = torch.get_num_threads()
    result = measure_latency(dense, fit, (3, 32, 32), batch_sizes=(1, 2), threads=threads + 1, warmup=1, runs=3)
    assert torch.get_num_threads() == threads and dense.training and fit.training
    assert {"processor", "cpu_count", "torch", "onnxruntime", "threads"} <= set(result.machine)
    assert result.fit.macs < result.dense.macs
    assert [row.batch_size for row in result.results] == [1, 2]
    for row in result.results:
        for latency in (row.onnxruntime, row.torch):
            for value in (latency.dense_median_ms, latency.dense_p90_ms, latency.fit_median_ms, latency.fit_p90_ms,
                          latency.speedup, latency.efficiency):
                assert value > 0
            assert latency.dense_median_ms <= latency.dense_p90_ms and latency.fit_median_ms <= latency.fit_p90_ms
            assert latency.speedup == pytest.approx(latency.dense_median_ms / latency.fit_median_ms)
        assert row.macs_ratio == result.macs_ratio
        assert row.onnxruntime.efficiency == pytest.approx(row.onnxruntime.speedup / row.macs_ratio)
    assert latency_table(result).row_count == 2


def test_the_json_keeps_the_keys_and_values_earlier_versions_wrote(resnet18_pair):
    result = measure_latency(*resnet18_pair, (3, 32, 32), threads=1, warmup=0, runs=2)
    written = json.loads(json.dumps(result.to_json()))  # JSON-able as it is
    assert list(written) == ["machine", "settings", "dense", "fit", "macs_ratio", "results"]
    assert written["dense"] == {"macs": result.dense.macs, "params": result.dense.params}
    earlier = {"input_shape": [3, 32, 32], "warmup": 0, "runs": 2, "runtimes": ["onnxruntime", "torch"]}
    assert {key: written["settings"][key] for key in earlier} == earlier
    assert written["settings"]["exporter"] == "dynamo" and written["settings"]["int8_calibration_images"] is None
    row, typed = written["results"][0], result.results[0]
    assert list(row) == JSON_ROW_KEYS
    assert row["ort_fit_p90_ms"] == typed.onnxruntime.fit_p90_ms and row["torch_speedup"] == typed.torch.speedup


def test_runtimes_not_asked_for_are_none(resnet18_pair):
    result = measure_latency(*resnet18_pair, (3, 32, 32), runtimes=("torch",), threads=1, warmup=0, runs=1)
    row = result.results[0]
    assert row.onnxruntime is None and row.torch.speedup > 0
    assert row.to_json()["ort_speedup"] is None and list(row.to_json()) == JSON_ROW_KEYS
    assert latency_table(result).row_count == 1


def test_the_thread_clock_is_the_one_read(resnet18_pair, monkeypatch):
    from kecompress import bench
    # A thread clock that moves 1 ms between two readings: every run takes 1 ms on it.
    ticks = iter(range(10**6))
    monkeypatch.setitem(bench.CLOCKS, "thread", lambda: next(ticks) / 1e3)
    result = measure_latency(*resnet18_pair, (3, 32, 32), threads=1, warmup=0, runs=2, clock="thread")
    assert result.settings["clock"] == "thread"
    for latency in (result.results[0].onnxruntime, result.results[0].torch):
        assert latency.dense_median_ms == pytest.approx(1.0) and latency.fit_median_ms == pytest.approx(1.0)


@pytest.mark.parametrize("settings", [{"runtimes": ("tensorrt",)}, {"runs": 0}, {"threads": 0},
                                      {"warmup": -1}, {"batch_sizes": ()}, {"batch_sizes": (0,)},
                                      {"clock": "cpu"}, {"clock": "thread", "threads": 2},
                                      {"int8_keep_fp32": ("depthwise",)}])
def test_bad_settings_are_user_errors(settings, resnet18_pair):
    with pytest.raises(KecompressError):
        measure_latency(*resnet18_pair, (3, 32, 32), **settings)
