"""The prepared GPU check (``benchmarks.gpu_check``, issue #17) run on the CPU: the same code path on the narrow SD 1.5
build, so the one run on a lent GPU does not fail on a bug that a CPU could have found."""

import math

import pytest
import torch

from benchmarks import gpu_check
from entruth_lite.infringer import presets

SMOKE = ["--device", "cpu", "--width", "narrow", "--resolution", "64", "--steps", "2", "--images", "8",
         "--templated", "2", "--queries", "2", "--inference-steps", "2"]


@pytest.fixture
def one_thread():
    """The narrow model's ops take microseconds: a second intra-op thread only adds synchronisation, which costs
    far more than it saves when other jobs share the cores (tests/test_sd_architecture.py does the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def table_rows(printed: str) -> dict[str, list[str]]:
    """The summary table's rows by their first cell."""
    rows = [line.strip().strip("|").split("|") for line in printed.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_each_preset_is_checked_at_its_own_resolution_unless_one_is_given():
    args = gpu_check.parse_args([])
    assert {name: gpu_check.resolution_of(name, args) for name in presets.gpu_presets()} == {
        name: presets.preset(name).resolution for name in presets.gpu_presets()}
    assert gpu_check.resolution_of("colab-t4", args) == 256 and gpu_check.data_resolution(args) == 512
    assert gpu_check.data_resolution(gpu_check.parse_args(["--preset", "colab-t4"])) == 256
    assert gpu_check.resolution_of("a100", gpu_check.parse_args(["--resolution", "64"])) == 64


def test_gpu_check_runs_every_gpu_preset_on_the_cpu(one_thread, capsys):
    assert gpu_check.main(SMOKE) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    header = rows["preset"]
    gpu_presets = presets.gpu_presets()
    assert gpu_presets and not {"tiny-cpu", "tiny-cpu-lora"} & set(gpu_presets)
    for name in gpu_presets:
        cells = dict(zip(header, rows[name]))
        assert math.isfinite(float(cells["s/step"])) and float(cells["s/step"]) > 0, cells
        assert cells["precision"] == "no" and cells["status"] == "ok" and cells["px"] == "64", cells
        assert 0 < float(cells["p-value"]) <= 1, cells
        assert f"{name}: on the CPU, mixed_precision" in printed  # the override is said, not silent
    assert "GPU check passed" in printed
