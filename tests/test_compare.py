"""`nlora compare`: several methods, one folder each, one table with the best marked."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TASKS

from nlora.cli import main
from nlora.compare import format_comparison

TINY = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size", "4",
        "--lr", "5e-3", "--max-source-length", "64", "--seed", "3"]


def test_the_best_of_each_column_is_marked():
    rows = [
        {"method": "a", "AA": 60.0, "AA_pooled": 66.0, "F.Ra": 5.0, "BWT": -4.0,
         "seconds": 3.0},
        {"method": "b", "AA": 70.0, "AA_pooled": 65.0, "F.Ra": 9.0, "BWT": -1.0,
         "seconds": 4.0},
        {"method": "mtl", "AA": 80.0, "F.Ra": None, "BWT": None, "seconds": 5.0},
    ]
    lines = format_comparison(rows).splitlines()
    assert lines[0].split() == ["method", "AA", "pooled", "F.Ra", "BWT", "time", "(s)"]
    cells = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert cells["a"] == ["60.0", "66.0*", "5.0*", "-4.0", "3"]
    assert cells["b"] == ["70.0", "65.0", "9.0", "-1.0*", "4"]
    assert cells["mtl"] == ["80.0*", "-", "-", "-", "5"]


@pytest.mark.slow  # end to end: make test-fast skips it
def test_compare_runs_each_method_in_its_own_folder_and_resumes(
    tiny_llama_dir, data_dir, tmp_path, capsys, monkeypatch
):
    from nlora import runner

    argv = ["compare", "--methods", "nlora,inclora,mtl", "--model", str(tiny_llama_dir),
            "--data", str(data_dir), "--tasks", ",".join(TINY_TASKS), "--out",
            str(tmp_path / "cmp"), *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("nlora", "inclora", "mtl"):
        metrics = json.loads((tmp_path / "cmp" / name / "metrics.json").read_text())
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert f"{metrics['summary']['AA']:.1f}" in line
    for name in ("nlora", "inclora"):  # same tasks, subsample and seed for every method
        assert (tmp_path / "cmp" / name / "tasks/01-yelp/done.json").is_file()
    rows = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert [r["method"] for r in rows] == ["nlora", "inclora", "mtl"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished comparison must not train again")

    monkeypatch.setattr(runner, "train_task", no_training)
    assert main(argv) == 0
    assert json.loads((tmp_path / "cmp/compare.json").read_text()) == rows


def test_an_unknown_method_fails_before_anything_runs(data_dir, tmp_path, capsys):
    code = main(["compare", "--methods", "nlora,nope", "--data", str(data_dir), "--tasks",
                 "CB", "--out", str(tmp_path / "c")])
    assert code == 2 and "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
