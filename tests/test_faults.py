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
    # the tiny model is 32 wide (v_proj 16 x 32): a rank above its modules' is refused
    (["--lora-r", "1000"], "--lora-r 1000 exceeds the rank base_model.model.model.layers.0"
     ".self_attn.q_proj can have (32x32, out x in); use at most 32"),
    (["--lora-r", "100000"], "--lora-r must be a whole number of at least 1 and at most 65536"),
    (["--loss-parts", "3"], "--loss-parts 3 does not divide --batch-size 4"),
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
    elif where in ("step", "term"):  # term: SIGTERM instead of SIGKILL
        import torch
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls.append("step")
            if calls.count("step") == int(nth):
                os.kill(os.getpid(), signal.SIGTERM if where == "term" else signal.SIGKILL)
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



# --- damaged inputs: one line, never a traceback (issue 25) ----------------------------------

def test_a_truncated_model_file_is_one_line(tiny_llama_dir, data_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "run"
    assert main(_args(model, data_dir, out)) == 2
    line = _one_line_error(capsys)
    assert f"cannot load model '{model}'" in line and "SafetensorError" in line
    assert not out.exists()


def test_a_misspelt_hub_model_fails_at_once_in_one_line(data_dir, tmp_path, capsys):
    import time

    out = tmp_path / "run"
    start = time.perf_counter()
    assert main(_args("smollm2-135", data_dir, out)) == 2  # the default is smollm2-135m
    assert time.perf_counter() - start < 10  # no rounds of hub retries
    line = _one_line_error(capsys)
    assert "model 'smollm2-135' not found: not a local folder" in line
    assert not out.exists()


def _deep_json_data(root: Path) -> Path:
    folder = root / "SC" / "deep"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text('["a", "b"]')
    (folder / "train.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "test.json").write_text('[{"sentence": "x", "label": "a"}]')
    return root


def test_deeply_nested_json_is_one_line_in_run_and_tasks(tiny_llama_dir, tmp_path, capsys):
    data = _deep_json_data(tmp_path / "data")
    message = "deep/train.json: JSON nested too deeply to read"
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data), "--tasks", "deep",
            "--out", str(out), *SMALL]
    assert main(argv) == 2
    assert message in _one_line_error(capsys)
    assert main(["tasks", "--data", str(data)]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()


def test_a_latin1_instructions_file_is_one_line(tiny_llama_dir, data_dir, tmp_path, capsys):
    for name, text in (("ins.json", '{"SC": "caf\xe9"}'), ("ins.yaml", "SC: caf\xe9\n")):
        path = tmp_path / name
        path.write_bytes(text.encode("latin-1"))
        out = tmp_path / "run"
        assert main(_args(tiny_llama_dir, data_dir, out, "--instructions", str(path))) == 2
        assert f"--instructions {path}: not UTF-8 text (byte 0xe9" in _one_line_error(capsys)
        assert not out.exists()


def test_a_symlink_loop_as_out_or_data_is_one_line(tiny_llama_dir, data_dir, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(_args(tiny_llama_dir, data_dir, loop)) == 2
    assert f"--out {loop}: Symlink loop" in _one_line_error(capsys)
    assert main(_args(tiny_llama_dir, loop, tmp_path / "run")) == 2
    assert f"data directory {loop}: Symlink loop" in _one_line_error(capsys)
    assert main(["tasks", "--data", str(loop)]) == 2
    assert "Symlink loop" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, data_dir, tmp_path_factory) -> Path:
    """A finished two-task run of the tiny LLaMA; tests damage copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(tiny_llama_dir, data_dir, out)) == 0
    return out


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, symlinks=True)
    return to


def _damage(run: Path, how: str) -> None:
    task = run / "tasks" / "01-yelp"
    adapter = task / "adapter" / "adapter_model.safetensors"
    if how == "truncated adapter":
        adapter.write_bytes(adapter.read_bytes()[:500])
    elif how == "corrupt done.json":
        (task / "done.json").write_text('{"task": "SC/yelp", "accur')
    elif how == "incomplete done.json":
        (task / "done.json").write_text('{"task": "SC/yelp"}')
    elif how == "pickle adapter":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(adapter), adapter.with_name("adapter_model.bin"))
        adapter.unlink()


DAMAGE = {  # what the one line must say, per damage
    "truncated adapter": "01-yelp is damaged: task 1 cannot be restored (SafetensorError",
    "corrupt done.json": "01-yelp/done.json is damaged (",
    "incomplete done.json": "01-yelp/done.json is incomplete (no accuracies or step count)",
    "pickle adapter": "adapter_model.bin is a pickle file; nlora writes and reads safetensors",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_run_files_are_one_line_in_resume_export_and_load(how, finished_run, tmp_path,
                                                                  capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    _damage(run, how)
    (run / "tasks" / "02-agnews" / "done.json").unlink()  # resume restores task 1
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.log"}
    commands = {
        "resume": ["run", "--config", str(run / "config.yaml"), "--out", str(run)],
        "export": ["export", str(run), "--out", str(tmp_path / "exported")],
        "load": ["load", str(run), "--task", "1"],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        assert DAMAGE[how] in _one_line_error(capsys), name
    assert not (tmp_path / "exported").exists()
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "run.log"}
    assert after.keys() - {run / ".nlora.lock"} == before.keys() - {run / ".nlora.lock"}
    assert all(after[p] == before[p] for p in before if p.name != ".nlora.lock")  # nothing lost


REPORT_DAMAGE = {  # file, content, what the one line must say
    "truncated adapter": (None, None, "01-yelp: its saved update cannot be read "
                          "(SafetensorError"),
    "pickle adapter": (None, None, "adapter_model.bin is a pickle file"),
    "garbage metrics.json": ("metrics.json", "garbage", "metrics.json is damaged (Expecting"),
    "list metrics.json": ("metrics.json", "[1, 2]", "metrics.json is damaged (a JSON list, "
                          "not an object)"),
    "matrix of strings": ("metrics.json", '{"accuracy": [["a"]]}',
                          "metrics.json is damaged: accuracy is not a matrix of numbers"),
    "NaN in metrics.json": ("metrics.json", '{"summary": {"AA": NaN}}',
                            "metrics.json is damaged (NaN is not a number nlora writes)"),
    "infinity in metrics.json": ("metrics.json", '{"summary": {"AA": 1e999}}',
                                 "metrics.json is damaged (number 1e999 is not finite)"),
    "garbage config.yaml": ("config.yaml", "a: [b\n", "config.yaml is damaged ("),
    "list config.yaml": ("config.yaml", "- a\n- b\n", "config.yaml is damaged (a YAML list, "
                         "not a mapping of option: value)"),
}


@pytest.mark.parametrize("how", list(REPORT_DAMAGE))
def test_damaged_run_files_are_one_line_in_report(how, finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    name, content, message = REPORT_DAMAGE[how]
    if name is None:
        _damage(run, how)
    else:
        (run / name).write_text(content)
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 2
    assert message in _one_line_error(capsys)
    assert not (out / "report.md").exists()


def test_report_refuses_an_out_that_is_or_is_inside_a_run(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    metrics = (run / "metrics.json").read_bytes()
    for out in (run, run / "report", run / "tasks" / "01-yelp"):
        assert main(["report", str(run), "--out", str(out)]) == 2
        assert f"--out {out} is" in _one_line_error(capsys)
    assert (run / "metrics.json").read_bytes() == metrics  # the run's own file, untouched
    assert not (run / "report").exists() and not (run / "report.md").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0  # outside: fine
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0  # a report again
    capsys.readouterr()


def test_export_refuses_a_symlink_as_out(finished_run, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["export", str(finished_run), "--out", str(link)]) == 2
    assert f"--out {link} is a symbolic link" in _one_line_error(capsys)
    assert link.is_symlink() and real.is_dir() and not any(real.iterdir())


def test_export_reads_nothing_outside_the_run_folder(finished_run, tmp_path, capsys):
    """A symlinked adapter, or a task name with ``..`` in a crafted config.yaml, would merge
    another run's adapter into the export: refused, naming the path."""
    other = _copy_run(finished_run, tmp_path / "other")
    linked = _copy_run(finished_run, tmp_path / "linked")
    adapter = linked / "tasks" / "01-yelp" / "adapter"
    import shutil

    shutil.rmtree(adapter)
    adapter.symlink_to(other / "tasks" / "01-yelp" / "adapter")
    assert main(["export", str(linked), "--out", str(tmp_path / "e1")]) == 2
    assert f"{adapter} leads outside the run folder" in _one_line_error(capsys)
    crafted = _copy_run(finished_run, tmp_path / "crafted")
    config = (crafted / "config.yaml").read_text()
    escape = "SC/yelp/../../../other/tasks/01-yelp"  # tasks/01-yelp/../../../other/...
    assert (crafted / "tasks" / f"01-{escape.split('/', 1)[1]}").resolve() == \
        (other / "tasks" / "01-yelp").resolve()
    (crafted / "config.yaml").write_text(config.replace("- SC/yelp\n- TC/agnews\n",
                                                        f"- {escape}\n"))
    for argv in (["export", str(crafted), "--out", str(tmp_path / "e2")], ["load", str(crafted)]):
        assert main(argv) == 2
        assert f"{crafted / 'config.yaml'}: task '{escape}' is not CATEGORY/DATASET" in \
            _one_line_error(capsys)
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_a_full_disk_is_one_line_naming_the_folder(tiny_llama_dir, data_dir, tmp_path, capsys,
                                                   monkeypatch):
    """No space left while recording task 2 (and run.log unwritable all along): one line
    naming the run folder, no logging tracebacks; task 1 stays finished."""
    import errno

    from nlora import rundir, runner

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullStream:
        write = flush = full

    real_attach, real_write = runner._attach_log_file, rundir.write_text_atomic

    def attach(out_dir):
        handler = real_attach(out_dir)
        handler.stream.close()
        handler.stream = FullStream()
        return handler

    def write(path, text):
        if "02-agnews" in str(path):
            full()
        return real_write(path, text)

    monkeypatch.setattr(runner, "_attach_log_file", attach)
    monkeypatch.setattr(rundir, "write_text_atomic", write)  # a step's records
    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, data_dir, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.strip().splitlines()[-1] == (
        f"nlora: error: no space left on the device holding {out.resolve()}; free some and "
        "rerun the same command to resume (finished tasks are kept)")
    assert (out / "tasks" / "01-yelp" / "done.json").is_file()
    assert not (out / "tasks" / "02-agnews" / "done.json").exists()


@pytest.mark.slow  # two processes end to end
def test_sigterm_says_it_stopped_and_how_to_resume(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    stopped = _cli(tmp_path, _args(tiny_llama_dir, data_dir, out), kill_at="term::3")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "nlora: stopped by SIGTERM; rerun the same command to resume (finished tasks are kept)")
    assert (out / ".nlora.lock").read_text() == ""  # released on the way out
    assert _cli(tmp_path, _args(tiny_llama_dir, data_dir, out)).returncode == 0


@pytest.mark.slow  # a killed process
def test_an_export_killed_midway_leaves_nothing_the_next_export_keeps(finished_run, tmp_path,
                                                                      caplog):
    out = tmp_path / "model"
    killed = _cli(tmp_path, ["export", str(finished_run), "--out", str(out)],
                  kill_at="replace:model:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = list(tmp_path.glob(".model.*.tmp"))
    assert len(leftovers) == 1 and not out.exists()
    with caplog.at_level("INFO", logger="nlora"):
        assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert f"removed {leftovers[0]}, left by an interrupted export" in caplog.text
    assert not list(tmp_path.glob(".model.*.tmp")) and (out / "config.json").is_file()
