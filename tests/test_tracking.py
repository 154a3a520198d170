"""Curves: run.log keeps loss, penalty and learning rate per step and the accuracies; with
``--report-to tensorboard`` the same numbers go to TensorBoard event files, with ``--report-to
wandb`` to an offline Weights & Biases run (read back from its file)."""

from __future__ import annotations

import json
import re
import struct

import pytest
from conftest import TINY_TASKS

from nlora import tracking
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
def test_curves_continue_after_a_resume(tiny_llama_dir, data_dir, tmp_path,
                                        interrupt_training):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    interrupt_training(2)
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 130
    interrupt_training(None)
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 0
    assert [s[0] for s in _logged_steps(run)] == list(range(1, 13))
    assert [s for s, _ in _scalars(run)["train/loss"]] == list(range(1, 13))


def test_report_to_is_not_part_of_the_config(tiny_llama_dir, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run) == 0
    assert "report" not in (run / "config.yaml").read_text()
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "tensorboard") == 0  # resumes


def test_tracker_not_installed_is_one_line(tiny_llama_dir, data_dir, tmp_path, capsys,
                                           monkeypatch):
    monkeypatch.setattr(tracking, "is_installed", lambda package: False)
    for name in tracking.REPORT_TO:
        assert _run(tiny_llama_dir, data_dir, tmp_path / "r", "--report-to", name) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pip install 'nlora[{name}]'" in err
        assert not (tmp_path / "r").exists()


# --- Weights & Biases (offline) ---------------------------------------------------------------

def _wandb_records(run_file):
    """The records of an offline W&B run file, read independently of wandb's own reader: the
    LevelDB log format (32 KiB blocks; 7-byte record headers: crc32c, length, type FULL=1 /
    FIRST=2 / MIDDLE=3 / LAST=4) after W&B's 7-byte file header, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    records, pos, pieces, block = [], 7, b"", 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pieces += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def _wandb_runs(run):
    """Per offline W&B run in RUN/wandb (in start order): its run record and its history as
    {step: {key: value}}."""
    out = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        records = _wandb_records(next(folder.glob("run-*.wandb")))
        info = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history = {}
        for r in records:
            if r.WhichOneof("record_type") == "history":
                items = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
                         for i in r.history.item}
                history.setdefault(items["_step"], {}).update(items)  # one step, several logs
        out.append((info, history))
    return out


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow  # W&B's service process takes seconds to start
def test_wandb_logs_offline_the_same_curves(tiny_llama_dir, data_dir, tmp_path, offline_wandb,
                                            interrupt_training):
    run = tmp_path / "myrun"
    interrupt_training(2)
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "wandb") == 130
    interrupt_training(None)
    assert _run(tiny_llama_dir, data_dir, run, "--report-to", "wandb") == 0

    steps = _logged_steps(run)
    assert [s[0] for s in steps] == list(range(1, 13))
    runs = _wandb_runs(run)
    assert len(runs) == 2  # the first attempt and the resume: one W&B run id, offline
    run_id = (run / "wandb" / "nlora-run-id").read_text().strip()
    for info, _ in runs:
        assert info.run_id == run_id and info.display_name == "myrun"
        assert info.project == "nlora"
    first, second = runs[0][1], runs[1][1]
    assert sorted(k for k in first if "train/loss" in first[k]) == list(range(1, 9))
    assert sorted(k for k in second if "train/loss" in second[k]) == list(range(9, 13))
    history = {**first, **second}
    for step, _, loss, penalty, lr in steps:
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-5)
        assert history[step]["train/penalty"] == pytest.approx(penalty, rel=1e-5)
        assert history[step]["train/learning_rate"] == pytest.approx(lr)
    metrics = json.loads((run / "metrics.json").read_text())
    assert history[12]["accuracy/CB"] == pytest.approx(metrics["accuracy"][2][2])


@pytest.mark.slow
def test_a_study_logs_each_cell_as_a_wandb_run_grouped_by_study(
    tiny_llama_dir, data_dir, tmp_path, offline_wandb
):
    from test_study import spec_dict, write_spec

    spec = spec_dict(tiny_llama_dir, data_dir)
    spec.update(methods={"seqlora": {}}, seeds=[1], report={"reference": "seqlora"})
    spec.pop("select")
    path = write_spec(tmp_path / "spec.yaml", spec)
    assert main(["study", str(path), "--out", str(tmp_path / "s"), "--report-to", "wandb"]) == 0
    cell = tmp_path / "s" / "final" / "seqlora" / "tiny" / "seed1"
    (info, history), = _wandb_runs(cell)
    assert info.display_name == "final/seqlora/tiny/seed1" and info.run_group == "tiny"
    steps = _logged_steps(cell)
    assert [history[s[0]]["train/loss"] for s in steps] == pytest.approx([s[2] for s in steps],
                                                                        rel=1e-5)
