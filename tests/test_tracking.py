"""Curves: run.log keeps loss, penalty and learning rate per step and the accuracies; with
``--report-to tensorboard`` the same numbers go to TensorBoard event files."""

from __future__ import annotations

import json
import re

import pytest
from conftest import TINY_TASKS

from nlora import runner
from nlora.cli import main

FAST = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "2", "--batch-size", "4",
        "--lr", "5e-3", "--max-source-length", "64", "--seed", "3"]
STEP = re.compile(r"step (\d+) \((\S+)\): loss (\S+), penalty (\S+), lr (\S+)")


def _run(model_dir, data_dir, out, *extra):
    return main(["run", "--model", str(model_dir), "--data", str(data_dir), "--tasks",
                 ",".join(TINY_TASKS), "--out", str(out), *FAST, *extra])


def _logged_steps(run):
    return [(int(m[1]), m[2], float(m[3]), float(m[4]), float(m[5]))
            for m in STEP.finditer((run / "run.log").read_text())]


def _scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_log_and_tensorboard_hold_the_same_curves(tiny_llama_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 0
    steps = _logged_steps(run)
    done = [json.loads(p.read_text()) for p in sorted(run.glob("tasks/*/done.json"))]
    per_task = [d["train"]["steps"] for d in done]
    assert per_task == [4, 4, 4]  # 8 rows / batch 4 x 2 epochs
    assert [s[0] for s in steps] == list(range(1, 13))  # continued over the tasks
    assert [s[1] for s in steps] == ["yelp"] * 4 + ["agnews"] * 4 + ["CB"] * 4
    for d, end in zip(done, (4, 8, 12), strict=True):  # the last step of each task
        assert steps[end - 1][2] == pytest.approx(d["train"]["last_loss"], rel=1e-5)
        assert steps[end - 1][3] == pytest.approx(d["train"]["last_penalty"], rel=1e-5)
    # PEFT starts B at 0, so ΔW and its ℓ1 penalty are 0 at each task's first step only
    assert [s[3] > 0 for s in steps] == [k % 4 != 0 for k in range(12)]
    assert all(s[4] == 5e-3 for s in steps)

    scalars = _scalars(run)
    for k, tag in ((2, "train/loss"), (3, "train/penalty"), (4, "train/learning_rate")):
        assert [step for step, _ in scalars[tag]] == list(range(1, 13))
        assert [v for _, v in scalars[tag]] == pytest.approx([s[k] for s in steps], rel=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    for i, name in enumerate(TINY_TASKS):
        curve = scalars[f"accuracy/{name.split('/')[1]}"]
        expected = [(4 * (j + 1), metrics["accuracy"][i][j]) for j in range(i, 3)]
        assert curve == [(s, pytest.approx(v)) for s, v in expected]
    assert re.search(r"evaluated in \d+s \(step 12\): yelp", (run / "run.log").read_text())


@pytest.mark.slow  # end to end: make test (the fast tier) skips it
def test_curves_continue_after_a_resume(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    real_train = runner.train_task

    def interrupt_task_3(model, method, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return real_train(model, method, index, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(runner, "train_task", interrupt_task_3)
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 130
    monkeypatch.setattr(runner, "train_task", real_train)
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 0
    assert [s[0] for s in _logged_steps(run)] == list(range(1, 13))
    assert [s for s, _ in _scalars(run)["train/loss"]] == list(range(1, 13))


def test_report_to_is_not_part_of_the_config(tiny_llama_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run) == 0
    assert "report" not in (run / "config.yaml").read_text()
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 0  # resumes


def test_tensorboard_not_installed_is_one_line(tiny_llama_dir, data_dir, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.setattr(runner, "is_tensorboard_available", lambda: False)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "r", "--report-to", "tensorboard") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'nlora[tensorboard]'" in err
    assert not (tmp_path / "r").exists()
