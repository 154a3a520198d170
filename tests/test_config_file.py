"""``nlora run --config FILE.yaml``: a run's own config.yaml reruns as it is; flags override."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_TASKS

from nlora.cli import build_parser, main
from nlora.cli.learn import config_from_args
from nlora.config import RunConfig

FAST = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size", "4",
        "--lr", "5e-3", "--max-source-length", "64", "--seed", "3"]


def _config(*argv):
    return config_from_args(build_parser().parse_args(["run", "--out", "x", *argv]))


def test_a_finished_runs_config_reruns_as_it_is(tiny_llama_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--tasks",
                 ",".join(TINY_TASKS), "--out", str(run), *FAST]) == 0
    saved = run / "config.yaml"
    before = saved.read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    # into the same folder: accepted as the same config, nothing trains again
    assert main(["run", "--config", str(saved), "--out", str(run)]) == 0
    assert "different config" not in capsys.readouterr().err
    assert saved.read_text() == before
    log = (run / "run.log").read_text()
    assert log.count("evaluated") == 3 and "(3 finished)" in log
    # into a new folder: the same run again, the same numbers
    assert main(["run", "--config", str(saved), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again/config.yaml").read_text() == before
    assert json.loads((tmp_path / "again/metrics.json").read_text()) == metrics


def test_the_file_equals_the_flags_and_flags_override_it(data_dir, tmp_path):
    by_flags = _config("--data", str(data_dir), "--order", "order1", "--substitute",
                       "yahoo=yelp", "--lora-r", "4")
    path = tmp_path / "c.yaml"
    path.write_text(by_flags.to_yaml())
    assert _config("--config", str(path)) == by_flags
    changed = _config("--config", str(path), "--lora-r", "2", "--lr", "1e-4")
    assert (changed.lora_r, changed.learning_rate, changed.tasks) == (2, 1e-4, by_flags.tasks)
    # a short hand-written file: defaults fill the rest as for flags
    path.write_text(yaml.safe_dump({"data_dir": str(data_dir), "order": "order1",
                                    "substitute": {"yahoo": "yelp"}, "lora_r": 4}))
    assert _config("--config", str(path)) == by_flags
    # a new task order on the command line replaces the file's resolved task list
    path.write_text(by_flags.to_yaml())
    other = _config("--config", str(path), "--tasks", "cb,rte")
    assert other.tasks == ["NLI/CB", "NLI/RTE"]


@pytest.mark.parametrize("text, message", [
    ("lr: 0.001\n", "unknown key 'lr' (did you mean 'learning_rate'?)"),
    ("learning_rate: [0.1\n", "malformed YAML at line"),
    ("- a\n- b\n", "not a mapping of option: value"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and message in err, err
    assert not (tmp_path / "r").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]) == 2
    assert "none.yaml not found" in capsys.readouterr().err


def test_compare_takes_a_config_file_and_ignores_its_method(data_dir, tmp_path, monkeypatch):
    import nlora.compare

    seen = {}

    def fake_compare(configs, out, report_to=None):
        seen.update(configs)
        return [{"method": m, "AA": 1.0, "F.Ra": 0.0, "BWT": 0.0, "seconds": 0.0}
                for m in configs]

    monkeypatch.setattr(nlora.compare, "compare", fake_compare)
    path = tmp_path / "c.yaml"
    path.write_text(RunConfig(data_dir=str(data_dir), tasks=["NLI/CB"], method="seqlora",
                              lora_r=3).to_yaml())
    assert main(["compare", "--methods", "nlora,inclora", "--config", str(path),
                 "--out", str(tmp_path / "cmp")]) == 0
    assert {m: (c.method, c.lora_r) for m, c in seen.items()} == {
        "nlora": ("nlora", 3), "inclora": ("inclora", 3)}
