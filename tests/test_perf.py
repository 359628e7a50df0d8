"""Peak FLOP/s lookup and the MFU arithmetic."""

import types

import pytest

from parallel_gpt import perf


def test_mfu_is_model_flops_over_peak():
    # 6 MFLOP/token x 100k tokens/s = 0.6 TFLOP/s of a 1.2 TFLOP/s peak.
    assert perf.mfu(6e6, 1e5, 1.2e12) == pytest.approx(0.5)
    assert perf.mfu(6e6, 1e5, None) is None


def test_peak_flops_looks_up_the_device_kind_and_counts_devices():
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert perf.peak_flops([h100], "bfloat16") == 989e12
    assert perf.peak_flops([h100] * 8, "bfloat16") == 8 * 989e12
    assert perf.peak_flops([h100], "float32") == 494e12
    unknown = types.SimpleNamespace(platform="gpu", device_kind="Some Future GPU")
    assert perf.peak_flops([unknown], "bfloat16") is None
