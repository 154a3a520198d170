"""The demo table, SeqLoRA's per-task updates, and the README's Python example."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO

from nlora.data import resolve_task
from nlora.demo import DEMO_METHODS, DEMO_OPTIONS, format_demo, run_demo

TINY = {"train_per_task": 8, "test_per_task": 4, "batch_size": 4, "max_source_length": 64,
        "learning_rate": 5e-3}


def test_demo_table_shows_chance_own_and_final_accuracy_and_collisions(
    tiny_llama_dir, data_dir, tmp_path
):
    result = run_demo(tmp_path / "demo", data_dir=data_dir, model=str(tiny_llama_dir), **TINY)
    assert [m.method for m in result.methods] == list(DEMO_METHODS)
    text = format_demo(result)
    lines = text.splitlines()
    tasks = [resolve_task(data_dir, t)[1] for t in DEMO_OPTIONS["tasks"]]
    assert result.tasks == tasks
    for i, task in enumerate(tasks):
        cells = next(x for x in lines if x.startswith(task + " ")).split()
        labels = int(cells[1])
        assert float(cells[2]) == pytest.approx(100 / labels, abs=0.05)  # chance
        own_end = [float(c) for c in cells[3:]]
        expected = [v for m in result.methods for v in (m.accuracy[i][i], m.accuracy[i][-1])]
        assert own_end == pytest.approx(expected, abs=0.05)
    for name, m in zip(("N-LoRA", "SeqLoRA"), result.methods, strict=True):
        row = next(x for x in lines if x.startswith(name + " ")).split()
        assert float(row[1]) == pytest.approx(m.summary["AA"], abs=0.05)
        assert 0 <= m.acr <= m.density <= 100  # a collision needs both entries non-zero
        assert float(row[4]) == pytest.approx(m.acr, abs=0.05)
    assert "chance = 100 / labels" in text
    assert ("rank scoring" if DEMO_OPTIONS["eval_mode"] == "rank" else "greedy generation") in text


def test_seqlora_task_updates_are_differences_of_its_saved_adapter(
    tiny_llama_dir, data_dir, tmp_path
):
    from nlora.adapters import read_lora_updates
    from nlora.cli import main
    from nlora.param_metrics import LoraUpdate, update_difference
    from nlora.rundir import finished_task_dirs, load_task_updates

    run = tmp_path / "run"
    assert main(["run", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--tasks",
                 "yelp,agnews", "--method", "seqlora", "--train-per-task", "8",
                 "--test-per-task", "2", "--epochs", "1", "--batch-size", "4", "--lr", "5e-2",
                 "--max-source-length", "64", "--out", str(run)]) == 0
    saved = [read_lora_updates(f / "adapter") for f in finished_task_dirs(run)]
    updates = load_task_updates(run, cumulative=True)
    assert len(updates) == 2
    for module, first in saved[0].items():
        assert updates[0][module].delta().equal(first.delta())
        expected = saved[1][module].delta(torch.float64) - first.delta(torch.float64)
        assert torch.allclose(updates[1][module].delta(torch.float64), expected, atol=1e-12)
        assert expected.abs().max() > 0  # the second task did change the adapter
    with pytest.raises(ValueError, match="scalings differ"):
        a = torch.ones(2, 3)
        update_difference(LoraUpdate(a, a.T, 1.0), LoraUpdate(a, a.T, 2.0))


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


def test_the_readme_python_example_runs(tiny_llama_dir, data_dir, tmp_path, monkeypatch,
                                        capsys):
    code = _readme_example()
    assert "nlora.make_config(" in code
    # the same calls on the tiny model and small sizes
    code = code.replace(
        "nlora.make_config(",
        f"nlora.make_config(model={str(tiny_llama_dir)!r}, data_dir={str(data_dir)!r}, "
        "max_source_length=64, ",
    )
    code = re.sub(r"batch_size=\d+", "batch_size=4", code)
    code = re.sub(r"train_per_task=\d+", "train_per_task=8", code)
    code = re.sub(r"test_per_task=\d+", "test_per_task=4", code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "Accuracy (%)" in out and "AA" in out
    assert list(tmp_path.glob("report*/**/report.md"))
    assert list(tmp_path.glob("export*/**/model.safetensors"))


def test_import_nlora_is_light_and_lists_the_api():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import sys, nlora; print('torch' in sys.modules); "
         "print(' '.join(dir(nlora)))"], capture_output=True, text=True, timeout=60)
    heavy, names = done.stdout.splitlines()
    assert heavy == "False"
    for name in ("make_config", "run", "read_metrics", "write_report", "export_model",
                 "list_tasks", "format_results"):
        assert name in names.split()
