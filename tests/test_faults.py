"""The fault suite: every bad input is one line and exit 2 before any work; the run folder
lock; kill -9 at several moments, then resume, ends byte-identical to an uninterrupted run;
report and load on run folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from nlora.cli import main

TASKS = "SC/yelp,TC/agnews"
SMALL = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size", "4",
         "--lr", "5e-3", "--max-source-length", "64", "--seed", "3"]


def _args(model_dir, data_dir, out, *extra):
    return ["run", "--model", str(model_dir), "--data", str(data_dir), "--tasks", TASKS,
            "--out", str(out), *SMALL, *extra]


def _one_line_error(capsys) -> str:
    """The error line; anything else on stderr may only be progress bars (model loading)."""
    text = capsys.readouterr().err.strip()
    lines = [line.split("\r")[-1] for line in text.split("\n") if line.strip()]
    bars = [line for line in lines[:-1] if "it/s]" not in line and "batch/s]" not in line]
    assert not bars, lines
    assert "Traceback" not in "".join(lines)
    assert lines[-1].startswith("nlora: error: "), lines
    return lines[-1]


# --- bad input ------------------------------------------------------------------------------

def _bad_data(root: Path) -> dict[str, Path]:
    """Small data folders, each with one fault (and otherwise valid)."""
    rows = [{"sentence": f"text {i}", "label": ["good", "bad"][i % 2]} for i in range(8)]
    cases = {
        "latin1": ("SC/latin1", '[{"sentence": "caf\xe9", "label": "good"}]'.encode("latin-1")),
        "bom": ("SC/bom", b"\xef\xbb\xbf" + json.dumps(rows).encode()),
        "duplabels": ("SC/duplabels", None),
    }
    folders = {}
    for key, (name, train) in cases.items():
        base = root / key
        folder = base / name
        folder.mkdir(parents=True)
        labels = ["good", "bad", "good"] if key == "duplabels" else ["good", "bad"]
        (folder / "labels.json").write_text(json.dumps(labels))
        (folder / "train.json").write_bytes(train or json.dumps(rows).encode())
        (folder / "test.json").write_text(json.dumps(rows))
        folders[key] = base
    twice = root / "twice"
    for category in ("SC", "TC"):
        folder = twice / category / "same"
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(["good", "bad"]))
        for split in ("train", "test"):
            (folder / f"{split}.json").write_text(json.dumps(rows))
    folders["twice"] = twice
    return folders


EPOCHS_RANGE = "--epochs must be a whole number of at least 1 and at most 100000"
BAD_OPTIONS = [  # (extra arguments, what the one line must say)
    (["--epochs", "0"], EPOCHS_RANGE + ", got 0"),
    (["--epochs", "-2"], EPOCHS_RANGE + ", got -2"),
    (["--epochs", "1,0"], EPOCHS_RANGE + ", got 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--l1-lambda", "-1"], "--l1-lambda must be a finite number >= 0 or 'auto', got -1"),
    (["--l1-lambda", "inf"], "--l1-lambda must be a finite number >= 0 or 'auto', got inf"),
    (["--l1-lambda", "nan"], "--l1-lambda must be a finite number >= 0 or 'auto', got nan"),
    (["--lora-dropout", "2"], "--lora-dropout must be a finite number >= 0 and < 1, got 2"),
    (["--lora-r", "0"], "--lora-r must be a whole number of at least 1"),
    (["--max-source-length", "0"], "--max-source-length must be a whole number of at least 8"),
    (["--batch-size", "0"], "--batch-size must be a whole number of at least 1"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 (the global batch) does not"),
    (["--train-per-task", "0"], "--train-per-task must be a whole number of at least 1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--seed", "-1"], "--seed must be a whole number of at least 0 and at most 2147483647"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0"),
    (["--precision", "fp16"], "--precision fp16 needs a GPU"),
    (["--target-modules", "nothing_here"],
     "--target-modules nothing_here matches no module of the model; its linear layers are "
     "named down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["--l1-on", "reference"], "--l1-on reference needs square modules"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_bad_options_are_one_line_before_any_work(extra, message, tiny_llama_dir, data_dir,
                                                  tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, data_dir, out, *extra)) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()  # nothing created: the corrected command starts afresh


def test_bad_data_and_places_are_one_line_naming_them(tiny_llama_dir, data_dir, tmp_path,
                                                      capsys):
    bad = _bad_data(tmp_path / "data")
    cases = [  # (--data, --tasks, --out, what the line must say)
        (bad["latin1"], "latin1", None, "latin1/SC/latin1/train.json: not UTF-8 text (byte 0xe9"),
        (bad["bom"], "bom", None, "SC/bom/train.json: starts with a UTF-8 byte-order mark"),
        (bad["duplabels"], "duplabels", None, "labels.json: label 'good' is listed twice"),
        (bad["twice"], "same", None, "task 'same' is ambiguous"),
        (data_dir, TASKS, tmp_path / "a-file", "is a file, not a folder"),
        (data_dir, TASKS, tmp_path / "a-file" / "run", "a-file is a file"),
    ]
    (tmp_path / "a-file").write_text("not a folder")
    for data, tasks, out, message in cases:
        out = out or tmp_path / "never"
        argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data), "--tasks", tasks,
                "--out", str(out), *SMALL]
        assert main(argv) == 2, message
        assert message in _one_line_error(capsys)
    assert not (tmp_path / "never").exists()
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_model_typo_does_not_lock_the_folder(tiny_llama_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tmp_path / "no-such-model", data_dir, out)) == 2
    assert "not found" in _one_line_error(capsys)
    assert not out.exists()
    assert main(_args(tiny_llama_dir, data_dir, out)) == 0  # the corrected command runs


def test_an_oversized_subsample_and_left_out_rows_are_logged(tiny_llama_dir, tmp_path):
    folder = tmp_path / "data" / "SC" / "mini"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(["good", "bad"]))
    rows = [{"sentence": f"text {i}", "label": ["good", "bad", "maybe"][i % 3]} for i in range(9)]
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text(json.dumps(rows[:4]))
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(tmp_path / "data"),
            "--tasks", "mini", "--out", str(out), *SMALL]
    argv[argv.index("--train-per-task") + 1] = "100"
    assert main(argv) == 0
    log = (out / "run.log").read_text()
    assert "SC/mini train: left out 3 rows whose label is not in labels.json" in log
    assert "SC/mini train: --train-per-task 100 is more than its 6 rows; using all 6" in log
    assert "SC/mini test: left out 1 rows" in log


# --- the lock -------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()} on test".encode())
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_second_run_on_the_same_folder_is_refused_and_a_dead_ones_lock_taken_over(
    tiny_llama_dir, data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".nlora.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_args(tiny_llama_dir, data_dir, out)) == 2
        err = _one_line_error(capsys)
        assert f"is in use by another nlora run (PID {holder.pid} on test)" in err
        assert not (out / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel drops it
        holder.wait()
    assert main(_args(tiny_llama_dir, data_dir, out)) == 0
    assert f"took over the lock of PID {holder.pid} on test" in (out / "run.log").read_text()
    assert (out / ".nlora.lock").read_text() == ""  # released at the end


# --- kill -9 and resume ---------------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    where, name, nth = (os.environ["KILL_AT"].split(":") + ["", ""])[:3]
    calls = []

    def count_and_maybe_die(what):
        calls.append(what)
        if calls.count(what) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "replace":  # just before an atomic write's rename: its temporary is complete
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == name:
                count_and_maybe_die(name)
            return real_replace(src, dst)

        os.replace = replace
    elif where == "step":
        import torch
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            count_and_maybe_die("step")
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = step
    elif where == "eval":
        from nlora import distributed
        real_predict = distributed.predict

        def predict(*a, **k):
            count_and_maybe_die("eval")
            return real_predict(*a, **k)

        distributed.predict = predict
    from nlora.cli import main
    sys.exit(main(sys.argv[1:]))
""")

KILL_POINTS = [  # each resumes what the previous one left
    "replace:config.yaml:1",  # writing the run folder's first file
    "step::2",  # task 1's last training step
    "replace:adapter:1",  # saving task 1's adapter (a temporary folder is left)
    "replace:done.json:1",  # recording task 1 (its adapter is saved)
    "eval::2",  # task 1 finished; evaluating after task 2
    "replace:predictions.jsonl:1",  # recording task 2
]


def _cli(tmp_path, argv, kill_at=None):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "KILL_AT": kill_at or "none::0", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(driver), *argv], env=env, capture_output=True,
                          text=True, timeout=600)


def _tree(run: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(run.rglob("*")):
        rel = str(path.relative_to(run))
        if path.is_file() and path.name not in ("run.log", ".nlora.lock"):
            data = path.read_bytes()
            if path.name == "done.json":  # timings differ between runs; the rest must not
                record = json.loads(data)
                record.get("train", {}).pop("seconds", None)  # the zero-shot row has no train
                record.pop("eval_seconds")
                data = json.dumps(record, sort_keys=True).encode()
            files[rel] = data
    return files


@pytest.mark.slow  # end to end: make test-fast skips it
def test_kill_9_at_six_moments_then_resume_is_byte_identical(tiny_llama_dir, data_dir,
                                                             tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_args(tiny_llama_dir, data_dir, whole)) == 0
    for point in KILL_POINTS:
        killed = _cli(tmp_path, _args(tiny_llama_dir, data_dir, cut), kill_at=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    assert list(cut.rglob(".*.tmp"))  # the last kill left a temporary file behind
    final = _cli(tmp_path, _args(tiny_llama_dir, data_dir, cut))
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list(cut.rglob(".*.tmp"))  # leftovers removed on resume
    expected, got = _tree(whole), _tree(cut)
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], rel
    log = (cut / "run.log").read_text()
    for leftover in (".config.yaml.", "tasks/01-yelp/.adapter.", "tasks/01-yelp/.done.json.",
                     "tasks/02-agnews/.predictions.jsonl."):
        assert f"removed {leftover}" in log, leftover
    assert "took over the lock of PID" in log
    assert "restored task 1/2 01-yelp" in log


# --- report and load ------------------------------------------------------------------------

def test_report_refuses_what_is_not_a_run_and_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "is not an nlora run folder (no config.yaml)" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: nlora\n")
    (tmp_path / "file").write_text("x")
    assert main(["report", str(run), "--out", str(tmp_path / "file")]) == 2
    assert "--out" in _one_line_error(capsys)


def test_report_and_load_use_only_finished_tasks(tiny_llama_dir, data_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from nlora.load import load_model, verify_predictions
    from nlora.param_metrics import LoraUpdate

    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, data_dir, out)) == 0
    capsys.readouterr()
    # the model after task 2 = base + ΔW1 + ΔW2, each from its saved adapter (independently)
    loaded = load_model(out, task=2)
    base = load_file(tiny_llama_dir / "model.safetensors")
    state = loaded.model.state_dict()
    for folder in ("01-yelp", "02-agnews"):
        meta = json.loads((out / "tasks" / folder / "adapter/loads_on.json").read_text())
        assert meta["merge_first"] == (["tasks/01-yelp/adapter"] if folder == "02-agnews" else [])
    deltas = {}
    for folder in ("01-yelp", "02-agnews"):
        saved = load_file(out / "tasks" / folder / "adapter/adapter_model.safetensors")
        for key in saved:
            if ".lora_A." in key:
                module = key.split("base_model.model.")[1].split(".lora_A.")[0]
                b = saved[key.replace("lora_A", "lora_B")]
                update = LoraUpdate(A=saved[key], B=b, scaling=32.0 / 8).delta()
                deltas[module] = deltas.get(module, 0) + update
    for module, delta in deltas.items():
        torch.testing.assert_close(state[f"{module}.weight"], base[f"{module}.weight"] + delta,
                                   rtol=1e-5, atol=1e-6)
    assert verify_predictions(loaded) == (8, 8)  # both tasks' 4 test rows, as recorded
    # an unfinished task 2 (no done.json): load and report stop at task 1
    (out / "tasks/02-agnews/done.json").unlink()
    assert main(["load", str(out), "--task", "2"]) == 2
    assert "has 1 finished task(s), 1..1" in _one_line_error(capsys)
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "adapters found for the first 1 of 2 tasks only" in md
    assert main(["load", str(out), "--task", "1", "--verify", "--out",
                 str(tmp_path / "model1")]) == 0
    assert "reproduces 4/4" in capsys.readouterr().out
    assert (tmp_path / "model1" / "config.json").is_file()

