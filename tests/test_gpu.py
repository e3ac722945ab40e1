"""The GPU readiness smoke (`benchmarks/gpu_smoke.py`) as tests.

On a machine with 2 CUDA devices: its three checks (DoP-2 ring prefill, multi-master decode,
migration then decode on the destination) with NCCL, bfloat16 and compiled Triton kernels.
Everywhere: the whole script on the CPU (gloo, float32, the Triton kernels in the lowered
graphs under TRITON_INTERPRET=1), so CI covers the smoke itself and runs one ring prefill and
one multi-master decode end to end through the interpreted kernels.
"""

import json

import pytest
import torch

from benchmarks.gpu_smoke import format_table, main, run_checks, start_harness
from espc.frontend.spec import ModelSpec

CHECKS = ["ring-prefill", "shared-decode", "migrate-decode"]
GPUS = torch.cuda.device_count()


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA devices, this machine has {GPUS}")
def test_smoke_checks_pass_on_two_gpus_with_nccl_bfloat16_and_compiled_triton(monkeypatch):
    # conftest interprets Triton for the CPU tests; the ranks spawned here must compile it.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = ModelSpec(preset="tiny")
    with start_harness(
        spec, device="cuda", backend="nccl", dtype=torch.bfloat16, attention="triton", slots=4096, timeout=300
    ) as harness:
        checks = run_checks(harness, spec, torch.bfloat16, (1001, 334), seed=0)
    assert [check.name for check in checks] == CHECKS
    assert all(check.passed for check in checks), format_table(checks)


def test_smoke_runs_end_to_end_on_the_cpu_with_interpreted_triton(tmp_path, capsys):
    path = tmp_path / "smoke.json"
    code = main(["--device", "cpu", "--lengths", "19", "8", "--json", str(path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(path.read_text())
    config = result["config"]
    assert (config["device"], config["backend"], config["dtype"], config["attention"]) == ("cpu", "gloo", "float32", "triton")
    assert [check["name"] for check in result["checks"]] == CHECKS
    assert [check["rows"] for check in result["checks"]] == [2, 2, 1]
    for check in result["checks"]:
        assert check["passed"] and check["max_abs_error"] <= check["tolerance"] and not check["problems"], check
        assert check["name"] in printed
    assert result["passed"]
