"""`nlora study`: spec checks, validation-only selection, the table against hand-computed
numbers, kill -9 of a worker and of the driver, Ray and submitit's local executor."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nlora.cli import main

T975_DF1 = 12.7062  # published two-sided 95 % t critical value, 1 degree of freedom
TASKS = ["SC/yelp", "NLI/CB"]


def spec_dict(model: Path, data: Path) -> dict:
    return {
        "name": "tiny",
        "options": {"model": str(model), "data_dir": str(data), "train_per_task": 8,
                    "test_per_task": 4, "epochs": 1, "batch_size": 4,
                    "learning_rate": 5e-3, "max_source_length": 64, "eval_mode": "rank",
                    "eval_on": "all", "zero_shot": True},
        "methods": {"nlora": {"grid": {"l1_lambda": [0.0001, 0.01]}},
                    "inclora": {"grid": {"learning_rate": [0.005, 0.02]}}},
        "orders": [{"tiny": TASKS}],
        "seeds": [1, 2],
        "select": {"metric": "AA", "validation_per_task": 4, "seeds": [1]},
        "report": {"reference": "inclora",
                   "metrics": ["AA", "F.Ra", "BWT", "FWT", "density_exact", "minutes"]},
        "resources": {"retries": 2},
    }


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tiny_data(root: Path, source: Path) -> Path:
    for name in TASKS:
        (root / name).mkdir(parents=True)
        for split in ("train", "test", "labels"):
            shutil.copyfile(source / name / f"{split}.json", root / name / f"{split}.json")
    return root


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nlora.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------------------------
# the spec is checked completely before anything runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,words", [
    (lambda s: s["methods"].update(nope={}), ["methods.nope.method", "unknown method 'nope'"]),
    (lambda s: s["options"].update(l1_lamda=1), ["options.l1_lamda", "did you mean"]),
    (lambda s: s["orders"].append("order9"), ["orders[1]", "unknown order 'order9'"]),
    (lambda s: s["orders"].append({"x": ["nosuchtask"]}), ["orders x", "nosuchtask"]),
    (lambda s: s["methods"]["nlora"]["grid"].update(lora_r=[0]), ["lora_r"]),
    (lambda s: s["options"].update(seed=3), ["options.seed", "set by the study"]),
    (lambda s: s["report"].update(reference="olora"), ["report.reference"]),
    (lambda s: s["select"].update(metric="ACR"), ["select.metric"]),
    (lambda s: s.update(sedes=[1]), ["sedes", "did you mean 'seeds'"]),
])
def test_a_bad_spec_is_one_line_naming_the_key_and_the_file(
    change, words, tiny_llama_dir, data_dir, tmp_path, capsys
):
    spec = spec_dict(tiny_llama_dir, data_dir)
    change(spec)
    path = write_spec(tmp_path / "bad.yaml", spec)
    assert main(["study", str(path), "--out", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nlora: error: ") and len(err.splitlines()) == 1, err
    assert str(path) in err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "st").exists()  # nothing ran, nothing was created


def test_shipped_specs_parse(tmp_path):
    from nlora.study.spec import read_spec

    root = Path(__file__).resolve().parents[1] / "studies"
    quick = read_spec(root / "quick.yaml")  # on the embedded sample: fully checked
    assert len(quick.methods) == 2 and len(quick.seeds) == 2
    for name in ("table1.yaml", "table4.yaml"):  # the full data may be absent here
        spec = read_spec(root / name, check=False)
        assert [o.name for o in spec.orders][:3] == ["order1", "order2", "order3"]
    sparsity = read_spec(root / "sparsity.yaml", check=False)  # the retired bench loop's study
    assert len(sparsity.methods) == 8 and sparsity.seeds == [1, 2, 3]
    sweep = read_spec(root / "lambda_sweep.yaml", check=False)
    assert [len(m.points()) for m in sweep.methods] == [4, 1]  # λ chosen on validation


def test_the_validation_split_never_opens_test_json(data_dir, monkeypatch):
    from nlora.families import load_task

    opened: list[str] = []
    real = Path.read_bytes

    def recording(self):
        opened.append(self.name)
        if self.name == "test.json":
            raise AssertionError(f"opened {self}")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", recording)
    task = load_task(data_dir, "SC/yelp", 16, 50, seed=3, eval_split="validation",
                     validation_per_task=10)
    assert "test.json" not in opened and "train.json" in opened
    assert len(task.test) == 10 and len(task.train) == 16
    held = {e.sentence for e in task.test}
    assert not held & {e.sentence for e in task.train}  # training never sees validation rows
    again = load_task(data_dir, "SC/yelp", 16, 50, seed=4, eval_split="validation",
                      validation_per_task=10)
    assert {e.sentence for e in again.test} == held  # the same rows whatever the run's seed


# --------------------------------------------------------------------------------------------
# end to end on the local backend, 2 workers (a reference the other tests compare with)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_study(tiny_llama_dir, data_dir, tmp_path_factory):
    """The study, run once: the tune stage on data whose test.json files are garbage (a
    read of one would fail the run), then the real test files back and the final stage."""
    root = tmp_path_factory.mktemp("study")
    data = tiny_data(root / "data", data_dir)
    spec = write_spec(root / "spec.yaml", spec_dict(tiny_llama_dir, data))
    for name in TASKS:
        os.replace(data / name / "test.json", data / name / "test.real")
        (data / name / "test.json").write_text("poison: not JSON")
    study = root / "study"
    tune = cli("study", str(spec), "--out", str(study), "--workers", "2", "--stage", "tune")
    assert tune.returncode == 0, tune.stderr[-3000:]
    for name in TASKS:
        os.replace(data / name / "test.real", data / name / "test.json")
    assert not (study / "final").exists()
    full = cli("study", str(spec), "--out", str(study), "--workers", "2")
    assert full.returncode == 0, full.stderr[-3000:]
    return {"root": root, "spec": spec, "study": study, "data": data, "stdout": full.stdout}


def _table(study: Path) -> list[dict]:
    with open(study / "report" / "table.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _untimed(study: Path) -> list[dict]:
    """The table without wall-clock rows: a rerun cell reproduces every number but its time."""
    return [row for row in _table(study) if row["metric"] != "minutes"]


def _final_metrics(study: Path, method: str) -> list[dict]:
    return [json.loads((study / f"final/{method}/tiny/seed{s}/metrics.json").read_text())
            for s in (1, 2)]


@pytest.mark.slow
def test_study_selects_on_validation_and_tables_match_hand_computed_values(reference_study):
    study = reference_study["study"]
    index = json.loads((study / "study.json").read_text())
    assert {c["status"] for c in index["cells"].values()} == {"finished"}
    assert len([c for c in index["cells"].values() if c["stage"] == "tune"]) == 4
    slots = {c.get("slot") for c in index["cells"].values()}
    assert slots == {0, 1}  # two worker slots used
    for cell in index["cells"].values():  # an ordinary run folder; tune cells on validation
        config = yaml.safe_load((Path(cell["dir"]) / "config.yaml").read_text())
        assert config["eval_split"] == ("validation" if cell["stage"] == "tune" else "test")
    selection = json.loads((study / "selection.json").read_text())
    for method, points in (("nlora", "l1_lambda"), ("inclora", "learning_rate")):
        rows = selection["methods"][method]["points"]
        scores = []
        for row in rows:  # the score is the tune cell's validation AA (one seed, one order)
            cell = study / row["cells"][0]
            scores.append(json.loads((cell / "metrics.json").read_text())["summary"]["AA"])
            assert row["mean"] == pytest.approx(scores[-1])
        best = rows[scores.index(max(scores))]["point"]
        assert selection["methods"][method]["chosen"] == best
        final = yaml.safe_load((study / f"final/{method}/tiny/seed1/config.yaml").read_text())
        assert final[points] == best[points]

    table = {(r["metric"], r["method"], r["column"]): r for r in _table(study)}
    for method in ("nlora", "inclora"):
        metrics = _final_metrics(study, method)
        aa = [m["summary"]["AA"] for m in metrics]
        mean = (aa[0] + aa[1]) / 2
        half = T975_DF1 * abs(aa[0] - aa[1]) / math.sqrt(2) / math.sqrt(2)  # sd = |a-b|/√2
        for column in ("tiny", "avg"):
            row = table[("AA", method, column)]
            assert float(row["mean"]) == pytest.approx(mean)
            assert float(row["ci95_half_width"]) == pytest.approx(half, abs=1e-3)
            assert row["n"] == "2"
        # FWT by hand: accuracy on task 2 just before training it, minus the zero-shot one
        fwt = [m["accuracy"][1][0] - m["zero_shot"][1] for m in metrics]
        assert float(table[("FWT", method, "tiny")]["mean"]) == pytest.approx(sum(fwt) / 2)
        # minutes: each finished task's training plus evaluation seconds, from done.json
        minutes = [sum(d["train"]["seconds"] + d["eval_seconds"] for d in (
            json.loads(p.read_text()) for p in study.glob(f"final/{method}/tiny/seed{s}/tasks/"
                                                          "*/done.json"))) / 60 for s in (1, 2)]
        assert float(table[("minutes", method, "tiny")]["mean"]) == pytest.approx(
            sum(minutes) / 2)
    # a plain LoRA update B·A has no exact zeros (random A, trained B): density 100 %
    assert float(table[("density_exact", "inclora", "tiny")]["mean"]) == pytest.approx(100.0)
    ours = [m["summary"]["AA"] for m in _final_metrics(study, "nlora")]
    ref = [m["summary"]["AA"] for m in _final_metrics(study, "inclora")]
    diff = table[("AA", "nlora - inclora", "tiny")]
    assert float(diff["mean"]) == pytest.approx((ours[0] - ref[0] + ours[1] - ref[1]) / 2)
    markdown = (study / "report" / "table.md").read_text()
    assert "95 % Student t interval" in markdown and "none: every final cell finished" in markdown
    assert (study / "report" / "table.tex").read_text().count("\\begin{tabular}") == 6
    assert (study / "report" / "means.png").stat().st_size > 1000
    # a cell reruns alone as an ordinary run: nothing left to train
    cell = study / "final/nlora/tiny/seed1"
    again = cli("run", "--config", str(cell / "config.yaml"), "--out", str(cell))
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.slow
def test_a_spec_may_only_add_cells(reference_study, tmp_path):
    spec = yaml.safe_load(reference_study["spec"].read_text())
    spec["options"]["epochs"] = 2
    path = write_spec(tmp_path / "changed.yaml", spec)
    result = cli("study", str(path), "--out", str(reference_study["study"]))
    assert result.returncode == 2
    assert "may only add cells" in result.stderr and "epochs" in result.stderr


def test_an_option_added_since_a_cell_was_planned_counts_at_its_default(tmp_path):
    """A study planned by an older nlora (its records lack a newer method's options) goes
    on; a changed value, or a new option away from its default, is still refused."""
    from nlora.config import RunConfig
    from nlora.errors import ConfigError
    from nlora.study.plan import Cell, Index

    def cell(**options):
        config = RunConfig(method="nlora", tasks=["a", "b"], **options)
        return Cell("final", "nlora", "o", 1, {}, config, tmp_path)

    plan = Index(tmp_path)
    record = cell().record()
    del record["options"]["gorp_rank"]  # planned before that option existed
    plan.cells[cell().id] = record
    plan.check_against([cell()])
    with pytest.raises(ConfigError, match="gorp_rank differ"):
        plan.check_against([cell(gorp_rank=4)])
    with pytest.raises(ConfigError, match="epochs differ"):
        plan.check_against([cell(epochs=7)])


@pytest.mark.slow
def test_a_pack_reports_alone_and_a_copy_of_it_continues_the_study(reference_study, tmp_path):
    """A study packed without weights (to commit between sittings) gives the same table, and
    the study command on a copy of the pack runs only the cells the pack lacks."""
    pack = tmp_path / "pack"
    assert main(["study", "pack", str(reference_study["study"]), "--out", str(pack)]) == 0
    assert not list(pack.rglob("*.safetensors")) and not list(pack.rglob("predictions*"))
    assert main(["study", "report", str(pack)]) == 0
    assert _table(pack) == _table(reference_study["study"])

    copy = tmp_path / "copy"
    shutil.copytree(pack, copy)
    shutil.rmtree(copy / "final/inclora/tiny/seed2")  # a cell that had not finished
    result = cli("study", str(reference_study["spec"]), "--out", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (copy / "logs").iterdir()] == ["final__inclora__tiny__seed2.log"]
    assert _untimed(copy) == _untimed(reference_study["study"])


def _copy_without_final(reference: dict, target: Path, cells: list[str]) -> Path:
    """The reference study with some final cells emptied to their config.yaml: rerunning
    the study must reproduce them."""
    shutil.copytree(reference["study"], target)
    for cell in cells:
        folder = target / cell
        config = (folder / "config.yaml").read_text()
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(config)
        (target / "logs" / (cell.replace("/", "__") + ".log")).unlink()
    shutil.rmtree(target / "report")
    return target


def _wait(predicate, timeout: float = 600.0, what: str = "") -> object:
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _mid_cell(study: Path, cells: list[str]) -> str | None:
    """A cell with its first task done and not yet finished."""
    for cell in cells:
        folder = study / cell
        if (list(folder.glob("tasks/01-*/done.json"))
                and not (folder / "tasks" / "02-CB" / "done.json").exists()):
            return cell
    return None


FINAL = [f"final/{m}/tiny/seed{s}" for m in ("nlora", "inclora") for s in (1, 2)]


@pytest.mark.slow
def test_kill_9_of_a_worker_and_of_the_driver_then_the_same_table(reference_study, tmp_path):
    study = _copy_without_final(reference_study, tmp_path / "study", FINAL)
    argv = [sys.executable, "-m", "nlora.cli", "study", str(reference_study["spec"]),
            "--out", str(study), "--workers", "2"]
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cell = _wait(lambda: _mid_cell(study, FINAL), what="a cell half done")
    index = json.loads((study / "study.json").read_text())
    os.kill(index["cells"][cell]["worker_pid"], signal.SIGKILL)  # a worker, mid-cell
    # then the driver, while cells run (its runs die with it: PR_SET_PDEATHSIG)
    _wait(lambda: _mid_cell(study, [c for c in FINAL if c != cell]), what="another cell")
    driver.kill()
    driver.wait()
    result = cli(*argv[3:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _untimed(study) == _untimed(reference_study["study"])
    logs = "".join(p.read_text() for p in (study / "logs").glob("final__*.log"))
    assert "restored task 1/2" in logs  # a half-finished cell resumed, not restarted


@pytest.mark.slow
def test_ray_runs_the_cells_on_logical_gpus_and_survives_a_killed_worker(
    reference_study, tmp_path
):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'nlora[ray]'")
    spec = yaml.safe_load(reference_study["spec"].read_text())
    spec["resources"].update(gpus_per_run=1, cpus_per_run=1,
                             ray={"init": {"num_cpus": 2, "num_gpus": 2}})
    path = write_spec(tmp_path / "ray.yaml", spec)
    study = _copy_without_final(reference_study, tmp_path / "study", FINAL[:2])
    (study / "spec.yaml").unlink()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path / "home")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "nlora.cli", "study", str(path), "--out", str(study),
         "--backend", "ray"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        text=True)
    cell = _wait(lambda: _mid_cell(study, FINAL[:2]), what="a Ray cell half done")
    log = study / "logs" / (cell.replace("/", "__") + ".log")
    header = [x for x in log.read_text().splitlines() if x.startswith("== ")][-1]
    worker = int(header.split(" pid ")[1].split()[0])
    os.kill(worker, signal.SIGKILL)  # the Ray worker running the cell: Ray retries the task
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output[-3000:]
    assert _untimed(study) == _untimed(reference_study["study"])
    headers = [x for x in log.read_text().splitlines() if x.startswith("== ")]
    assert len(headers) == 2 and "restored task 1/2" in log.read_text()
    index = json.loads((study / "study.json").read_text())
    devices = [index["cells"][c]["cuda_visible_devices"] for c in FINAL[:2]]
    assert sorted(devices) in (["0", "1"], ["0", "0"], ["1", "1"])  # one logical GPU each
    for c in FINAL[:2]:  # what the run itself saw, from the cell's log
        for line in (study / "logs" / (c.replace("/", "__") + ".log")).read_text().splitlines():
            if line.startswith("== "):
                assert "CUDA_VISIBLE_DEVICES 0," in line or "CUDA_VISIBLE_DEVICES 1," in line


@pytest.mark.slow
def test_submitit_local_executor_runs_the_same_cells(reference_study, tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed: pip install "
                        "'nlora[slurm]'")
    spec = yaml.safe_load(reference_study["spec"].read_text())
    spec["resources"]["slurm"] = {"cluster": "local", "array_parallelism": 1, "time_min": 20}
    path = write_spec(tmp_path / "slurm.yaml", spec)
    study = _copy_without_final(reference_study, tmp_path / "study", FINAL[3:])
    result = cli("study", str(path), "--out", str(study), "--backend", "slurm")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert _untimed(study) == _untimed(reference_study["study"])
    index = json.loads((study / "study.json").read_text())
    assert index["cells"][FINAL[3]]["job_id"]
    assert list((study / "slurm").glob("*_submission.sh")) or list((study / "slurm").iterdir())


def test_a_missing_extra_names_it(tiny_llama_dir, data_dir, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real(name, *args, **kwargs)

    from nlora.study import backends
    from nlora.study.spec import Resources

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(Exception) as err:
        backends.run_ray([], Resources(), lambda c, r: None)
    assert "pip install 'nlora[ray]'" in str(err.value)


@pytest.mark.slow
def test_report_lists_cells_not_finished(reference_study, tmp_path, capsys):
    study = _copy_without_final(reference_study, tmp_path / "study", [FINAL[0]])
    assert main(["study", "report", str(study)]) == 0
    out = capsys.readouterr().out
    assert f"- {FINAL[0]}: finished" not in out and FINAL[0] in out.split("not in the table")[1]
    rows = {(r["metric"], r["method"], r["column"]): r for r in _table(study)}
    assert rows[("AA", "nlora", "tiny")]["n"] == "1"  # one seed left, said by n
    assert rows[("AA", "inclora", "tiny")]["n"] == "2"
