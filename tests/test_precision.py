"""``--precision auto``: bf16 only where the hardware multiplies bf16 natively, fp32 elsewhere;
what was used is in the run log and in each step's done.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASKS

from nlora import precision
from nlora.cli import main

CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert precision.cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, ("fp32", None)),
    ({"avx2", "avx512f", "avx512_bf16"}, ("bf16", "AVX512-BF16")),
    ({"avx512_bf16", "amx_tile", "amx_bf16"}, ("bf16", "AMX-BF16")),
    (set(), ("fp32", None)),  # no /proc/cpuinfo (not Linux): nothing known, fp32
])
def test_auto_is_bf16_only_on_native_bf16_cpus(flags, expected, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    used, why = precision.resolve_precision("auto", CPU)
    assert used == expected[0]
    assert (expected[1] in why) if expected[1] else "no native bf16" in why
    # asked for explicitly: kept as asked, with the reason to expect bf16 slow where not native
    assert precision.resolve_precision("fp32", CPU) == ("fp32", "asked for")
    used, why = precision.resolve_precision("bf16", CPU)
    assert used == "bf16" and ("slower than fp32" in why) == (expected[1] is None)


def test_a_run_says_and_records_the_precision_it_used(tiny_llama_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["run", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--tasks",
                 TINY_TASKS[0], "--train-per-task", "4", "--test-per-task", "4",
                 "--batch-size", "4", "--max-source-length", "64", "--precision", "auto",
                 "--out", str(run)]) == 0
    # this machine's own flags, read here: AVX512-BF16 or AMX-BF16 mean bf16
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    expected = "bf16" if ("avx512_bf16" in text or "amx_bf16" in text) else "fp32"
    assert f"precision: {expected} (auto: " in (run / "run.log").read_text()
    done = json.loads(next(run.glob("tasks/*/done.json")).read_text())
    assert done["train"]["precision"] == expected
    assert "auto" in (run / "config.yaml").read_text()  # the config keeps what was asked
