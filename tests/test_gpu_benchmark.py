"""benchmarks/gpu.py at toy sizes on the CPU (--smoke): every part runs and reports its ratios, so
the script is ready for the GPU machine. It checks the script, not speed: no figure is asserted."""
import json
import runpy
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks/gpu.py"


def test_the_gpu_benchmark_runs_every_part_in_smoke_mode(tmp_path):
    bench = runpy.run_path(str(SCRIPT), run_name="gpu_benchmark")
    out = tmp_path / "gpu.json"
    res = bench["main"](["--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["smoke"] is True and res["skipped"] == []
    for model in ("small", "official"):
        assert res[f"train_{model}"]["ratio_iet_vs_plain"] > 0
        assert res[f"sampling_{model}"]["ratio_ours_vs_diffusers"] > 0
    assert res["nn_search"]["ratio_nn_vs_matmul"] > 0


def test_without_cuda_the_full_run_stops_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bench = runpy.run_path(str(SCRIPT), run_name="gpu_benchmark")
    with pytest.raises(SystemExit, match="no CUDA device here"):
        bench["main"]([])
