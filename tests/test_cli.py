"""The `nlora` command end to end on tiny random T5 and LLaMA models and real data."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TASKS
from safetensors.torch import load_file

from nlora.cli import main

FAST = ["--train-per-task", "12", "--test-per-task", "6", "--epochs", "1",
        "--batch-size", "4", "--lr", "5e-3", "--max-source-length", "96", "--seed", "3"]


def _run(model_dir, data_dir, out, *extra):
    return main(["run", "--model", str(model_dir), "--data", str(data_dir),
                 "--tasks", ",".join(TINY_TASKS), "--out", str(out), *FAST, *extra])


def test_three_task_run_writes_the_accuracy_matrix(tiny_model_dir, data_dir, tmp_path, capsys):
    assert _run(tiny_model_dir, data_dir, tmp_path / "run") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tasks"] == TINY_TASKS
    matrix = metrics["accuracy"]
    for i in range(3):
        for j in range(3):
            assert (matrix[i][j] is None) == (j < i)
    # each entry is the share of correct rows in that step's predictions file
    rows = [json.loads(line) for line in
            (tmp_path / "run/tasks/03-CB/predictions.jsonl").read_text().splitlines()]
    for i, name in enumerate(TINY_TASKS):
        mine = [r for r in rows if r["task"] == name]
        assert len(mine) == 6
        assert matrix[i][2] == pytest.approx(100 * sum(r["correct"] for r in mine) / 6)
        assert all({"prediction", "normalised", "label"} <= set(r) for r in mine)
    assert set(metrics["summary"]) == {"AA", "AA_pooled", "F.Ra", "BWT"}
    pooled = 100 * sum(r["correct"] for r in rows) / len(rows)
    assert metrics["summary"]["AA_pooled"] == pytest.approx(pooled)
    assert metrics["scorer"] == "normalised"
    assert len(metrics["zero_shot"]) == 3  # cheap here, so made by default
    for folder in ("01-yelp", "02-agnews", "03-CB"):
        adapter = tmp_path / "run/tasks" / folder / "adapter"
        assert (adapter / "adapter_config.json").is_file()
        assert any("lora_A" in k for k in load_file(adapter / "adapter_model.safetensors"))
    out = capsys.readouterr().out
    assert "Accuracy (%)" in out and "AA " in out and "pooled AA" in out and " base " in out
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "run.log").read_text().count("evaluated") == 3
    # the software stack that made each step, as the libraries report their own versions
    import accelerate
    import peft
    import torch
    import transformers
    stack = {"torch": torch.__version__, "transformers": transformers.__version__,
             "peft": peft.__version__, "accelerate": accelerate.__version__}
    assert list(metrics["versions"]) == ["zero_shot", "01-yelp", "02-agnews", "03-CB"]
    for versions in metrics["versions"].values():
        assert {k: versions[k] for k in stack} == stack and versions["nlora"]
    assert "transformers " + transformers.__version__ in (tmp_path / "run/run.log").read_text()

    # the report reads the run as written: every figure and the metric table
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    for name in ("report.md", "metrics.json", "run_accuracy.png", "run_collision.png",
                 "gsr_vs_acr.png", "acr_curves.png", "subspace_use.png"):
        assert (tmp_path / "report" / name).is_file(), name
    assert "| run | nlora | 3 |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow  # end to end: make test-fast skips it
def test_interrupted_run_resumes_to_the_same_result(tiny_llama_dir, data_dir, tmp_path,
                                                    interrupt_training):
    assert _run(tiny_llama_dir, data_dir, tmp_path / "whole") == 0

    interrupt_training(1)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "cut") == 130
    assert not (tmp_path / "cut/tasks/02-agnews/done.json").exists()
    interrupt_training(None)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "cut") == 0

    whole = json.loads((tmp_path / "whole/metrics.json").read_text())
    cut = json.loads((tmp_path / "cut/metrics.json").read_text())
    assert cut == whole
    for folder in ("02-agnews", "03-CB"):
        a = load_file(tmp_path / "whole/tasks" / folder / "adapter/adapter_model.safetensors")
        b = load_file(tmp_path / "cut/tasks" / folder / "adapter/adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), key
    assert "restored task 1/3" in (tmp_path / "cut/run.log").read_text()


def test_a_run_folder_of_another_config_is_refused(tiny_llama_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(_config_yaml(tiny_llama_dir, data_dir, tmp_path))
    before = (out / "config.yaml").read_text()
    assert _run(tiny_llama_dir, data_dir, out, "--lora-r", "2") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "lora_r" in err
    assert (out / "config.yaml").read_text() == before


def _config_yaml(model_dir, data_dir, tmp_path):
    from nlora.cli import build_parser
    from nlora.cli.learn import config_from_args

    args = build_parser().parse_args(
        ["run", "--model", str(model_dir), "--data", str(data_dir), "--tasks",
         ",".join(TINY_TASKS), "--out", str(tmp_path / "x"), *FAST])
    return config_from_args(args).to_yaml()


def test_an_order_with_missing_data_fails_up_front(data_dir, tmp_path, capsys):
    code = main(["run", "--data", str(data_dir), "--order", "order1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert "order1 needs TC/yahoo" in err and "--substitute yahoo=" in err
    assert not (tmp_path / "o").exists()


def test_order_substitution_resolves_the_paper_settings(data_dir, tmp_path):
    from nlora.cli import build_parser
    from nlora.cli.learn import config_from_args

    args = build_parser().parse_args(["run", "--data", str(data_dir), "--order", "order4",
                                      "--substitute", "wic=SST-2,copa=rte", "--out", "x"])
    with pytest.raises(Exception, match="MultiRC/multirc"):
        config_from_args(args)
    args = build_parser().parse_args(["run", "--data", str(data_dir), "--order", "order1",
                                      "--substitute", "yahoo=yelp", "--out", "x"])
    config = config_from_args(args)
    assert config.tasks == ["TC/dbpedia", "SC/amazon", "SC/yelp", "TC/agnews"]
    assert (config.learning_rate, config.epochs, config.batch_size) == (1e-3, 10, 32)


def test_a_missing_model_is_one_line(data_dir, tmp_path, capsys):
    code = main(["run", "--model", str(tmp_path / "nowhere"), "--data", str(data_dir),
                 "--tasks", "CB", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "not found" in err
