"""Same answer on any number of processes: a 1-process run against 2 gloo processes on CPU
(torchrun, and two "nodes" meeting on loopback), on a tiny model and real data rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nlora.cli import main

# global batch 8: 1 process x 1 micro-batch of 8, or 2 processes x 2 micro-batches of 2
COMMON = ["--tasks", "SC/yelp,TC/agnews", "--train-per-task", "16", "--test-per-task", "6",
          "--epochs", "1", "--batch-size", "8", "--lr", "5e-3", "--max-source-length", "64",
          "--seed", "5", "--eval-batch-size", "4"]  # LoRA dropout stays on (0.1)


def _argv(model_dir, data_dir, out, *extra):
    return ["run", "--model", str(model_dir), "--data", str(data_dir), *COMMON,
            "--out", str(out), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # nlora picks CPU (gloo) itself without a GPU
    return env


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(_argv(tiny_llama_dir, data_dir, out)) == 0
    return out


def _same_results(one: Path, two: Path) -> None:
    a, b = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json")
                                                                       .read_text())
    assert a["accuracy"] == b["accuracy"]
    for folder in ("01-yelp", "02-agnews"):
        da = json.loads((one / "tasks" / folder / "done.json").read_text())["train"]
        db = json.loads((two / "tasks" / folder / "done.json").read_text())["train"]
        assert da["steps"] == db["steps"] == 2
        for key in ("first_loss", "last_loss", "last_penalty"):
            assert db[key] == pytest.approx(da[key], rel=1e-5), key
        wa = load_file(one / "tasks" / folder / "adapter/adapter_model.safetensors")
        wb = load_file(two / "tasks" / folder / "adapter/adapter_model.safetensors")
        for key in wa:
            assert (wa[key] - wb[key]).abs().max() < 1e-5, key
        pa = (one / "tasks" / folder / "predictions.jsonl").read_text()
        assert pa == (two / "tasks" / folder / "predictions.jsonl").read_text()


@pytest.mark.slow  # end to end: make test-fast skips it
def test_two_processes_give_the_one_process_result(one_process, tiny_llama_dir, data_dir,
                                                   tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "nlora.cli", *_argv(tiny_llama_dir, data_dir, out, "--grad-accum", "2")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_results(one_process, out)
    assert done.stdout.count("Accuracy (%)") == 1  # the table is printed once
    log = (out / "run.log").read_text()
    assert "global batch 8 = 2 process(es) x 2 micro-batch(es) x 2 rows" in log
    assert log.count("evaluated in") == 2  # one process writes the log


@pytest.mark.slow  # end to end: make test-fast skips it
def test_the_releases_part_means_do_not_depend_on_the_process_count(tiny_llama_dir, data_dir,
                                                                    tmp_path):
    """--loss-parts 4 (the releases' per-GPU mean losses): its parts are rows k, k + 4, ... of
    each global batch, so two processes give the one-process result here too."""
    one = tmp_path / "one"
    assert main(_argv(tiny_llama_dir, data_dir, one, "--loss-parts", "4")) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "nlora.cli", *_argv(tiny_llama_dir, data_dir, two, "--loss-parts", "4")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_results(one, two)


@pytest.mark.slow  # end to end: make test-fast skips it
def test_gorp_full_rank_steps_do_not_depend_on_the_process_count(tiny_llama_dir, data_dir,
                                                                 tmp_path):
    """GORP's projections are SVDs of the summed gradient, the same on every process. The
    sum's order differs from one process's, and Adam's step on a projected gradient's weak
    directions (near-equal singular values: a rotated basis) amplifies that rounding to
    ~1e-4 in the weights here (LoRA alone stays below 1e-5): the same answers and losses,
    weights and shared space equal to 1e-3."""
    extra = ("--method", "gorp", "--gorp-full-lr", "1e-2", "--gorp-rank", "4")
    one = tmp_path / "one"
    assert main(_argv(tiny_llama_dir, data_dir, one, *extra)) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "nlora.cli", *_argv(tiny_llama_dir, data_dir, two, *extra)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((one / "metrics.json").read_text())["accuracy"] == json.loads(
        (two / "metrics.json").read_text())["accuracy"]
    for folder in ("01-yelp", "02-agnews"):
        da = json.loads((one / "tasks" / folder / "done.json").read_text())["train"]
        db = json.loads((two / "tasks" / folder / "done.json").read_text())["train"]
        assert db["last_loss"] == pytest.approx(da["last_loss"], rel=1e-4)
        assert (one / "tasks" / folder / "predictions.jsonl").read_text() == (
            two / "tasks" / folder / "predictions.jsonl").read_text()
        wa = load_file(one / "tasks" / folder / "adapter/adapter_model.safetensors")
        wb = load_file(two / "tasks" / folder / "adapter/adapter_model.safetensors")
        assert all((wa[k] - wb[k]).abs().max() < 1e-3 for k in wa)
    a = load_file(one / "tasks/02-agnews/gorp_state.safetensors")
    b = load_file(two / "tasks/02-agnews/gorp_state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("space.") for k in a)
    for key in a:  # a space by its projector (its basis vectors' signs are arbitrary)
        x, y = (a[key] @ a[key].T, b[key] @ b[key].T) if key.startswith("space.") else (
            a[key], b[key])
        assert (x - y).abs().max() < 1e-3, key


@pytest.mark.slow  # end to end: make test-fast skips it
def test_two_nodes_on_loopback_give_the_one_process_result(one_process, tiny_llama_dir,
                                                           data_dir, tmp_path):
    out, port = tmp_path / "nodes", str(_free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
             str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", port, "-m", "nlora.cli", *_argv(tiny_llama_dir, data_dir, out)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    _same_results(one_process, out)
    assert "global batch 8 = 2 process(es) x 1 micro-batch(es) x 4 rows" in (
        out / "run.log").read_text()


def test_accelerate_cpu_launch_of_one_process_is_refused(tiny_llama_dir, data_dir, tmp_path,
                                                         monkeypatch, capsys):
    # what `accelerate launch --cpu --num_processes 2` hands its single process
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_argv(tiny_llama_dir, data_dir, tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nlora: error: ") and err.count("\n") == 0
    assert "torchrun --nproc_per_node N -m nlora.cli run" in err
    assert not (tmp_path / "r").exists()
