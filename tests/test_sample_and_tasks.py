"""The embedded benchmark sample, the data-folder fallback, and ``nlora tasks``."""

from __future__ import annotations

import fnmatch
import json
import logging
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import DATA, REPO

from nlora import data
from nlora.catalog import format_tasks, list_tasks
from nlora.cli import main
from nlora.data import SAMPLE_DATA, data_dir_from
from nlora.errors import DataError
from nlora.families import load_task

SCRIPT = REPO / "scripts" / "make_sample_data.py"


def _sizes() -> dict[str, tuple[int, int]]:
    return runpy.run_path(str(SCRIPT))["SIZES"]


def test_sample_is_a_small_valid_benchmark_with_the_scripted_sizes():
    total = sum(p.stat().st_size for p in SAMPLE_DATA.parent.rglob("*") if p.is_file())
    assert total < 5e6 / 2  # "well under 5 MB"
    infos = {i.name: i for i in list_tasks(SAMPLE_DATA)}
    manifest = json.loads((SAMPLE_DATA / "MANIFEST.json").read_text())
    for name, (n_train, n_test) in _sizes().items():
        info = infos[name]
        left = {s: sum(c.values()) for s, c in info.left_out.items()}
        assert info.rows["train"] + left.get("train", 0) == n_train
        assert info.rows["test"] + left.get("test", 0) == n_test
        for split, n in (("train", n_train), ("test", n_test)):
            chosen = manifest["tasks"][name][split]["rows"]
            assert len(chosen) == len(set(chosen)) == n
            assert chosen == sorted(chosen)
    # labels only, as in the full benchmark folder: no split for nlora run
    yahoo = infos["TC/yahoo"].rows
    assert yahoo.get("train") is None and yahoo.get("test") is None


def test_every_sample_file_is_installed_as_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["nlora"]
    package = SAMPLE_DATA.parents[1]  # src/nlora
    files = [p.relative_to(package).as_posix() for p in SAMPLE_DATA.parent.rglob("*")
             if p.is_file()]
    assert files
    # setuptools globs: "*" does not cross "/", as fnmatch's does; compare segment counts
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                   for pat in patterns), f


@pytest.mark.shared_data  # the sample is cut from the full benchmark (NLORA_DATA)
def test_the_script_rebuilds_the_sample_byte_for_byte():
    done = subprocess.run([sys.executable, str(SCRIPT), "--source", str(DATA), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "identical"


def test_without_data_option_or_env_the_sample_is_used_and_said_once(monkeypatch, caplog):
    monkeypatch.delenv("NLORA_DATA", raising=False)
    monkeypatch.setattr(data, "_said_sample", False)
    with caplog.at_level(logging.INFO, logger="nlora"):
        assert data_dir_from(None) == SAMPLE_DATA
        assert data_dir_from("") == SAMPLE_DATA
    said = [r.getMessage() for r in caplog.records if "sample" in r.getMessage()]
    assert len(said) == 1 and str(SAMPLE_DATA) in said[0]
    monkeypatch.setenv("NLORA_DATA", str(SAMPLE_DATA.parent))
    assert data_dir_from(None) == SAMPLE_DATA.parent


def test_run_config_uses_the_sample_without_data(monkeypatch):
    from nlora.presets import make_config

    monkeypatch.delenv("NLORA_DATA", raising=False)
    config = make_config(tasks=["dbpedia", "sst2"])
    assert Path(config.data_dir) == SAMPLE_DATA
    assert config.tasks == ["TC/dbpedia", "SC/SST-2"]
    assert len(load_task(SAMPLE_DATA, "dbpedia").labels) == 14


# --- nlora tasks --------------------------------------------------------------------------------

def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _layout(root: Path) -> Path:
    rows = [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"},
            {"sentence": "c", "label": "?"}, {"sentence": "d", "label": "?"},
            {"sentence": "e", "label": "z"}]
    _write(root / "SC/mine/labels.json", ["x", "y"])
    _write(root / "SC/mine/train.json", rows[:2])
    _write(root / "SC/mine/test.json", rows)
    _write(root / "TC/nodata/labels.json", ["a", "b", "c"])
    _write(root / "COPA/copa/labels.json", ["1", "2"])
    _write(root / "COPA/copa/train.json", [{"sentence": "s", "label": "1"}])
    _write(root / "COPA/copa/test.json", [{"sentence": "s", "label": "2"}])
    return root


def test_tasks_lists_sizes_rows_left_out_and_why(tmp_path):
    infos = {i.name: i for i in list_tasks(_layout(tmp_path))}
    assert sorted(infos) == ["COPA/copa", "SC/mine", "TC/nodata"]
    mine = infos["SC/mine"]
    assert (mine.rows, mine.left_out) == ({"train": 2, "test": 2}, {"test": {"?": 2, "z": 1}})
    assert len(mine.labels) == 2 and mine.has_instruction
    assert mine.rows.get("train") is not None and mine.rows.get("test") is not None
    assert infos["TC/nodata"].rows == {"train": None, "test": None}
    assert not infos["COPA/copa"].has_instruction
    text = format_tasks(list(infos.values()), tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("SC/mine"))
    assert line.split() == ["SC/mine", "2", "2", "2", "3", "yes"]
    assert "SC/mine test: left out 2 labelled '?', 1 labelled 'z'" in text
    assert "TC/nodata: no train.json or test.json; cannot be run" in text
    assert next(x for x in text.splitlines() if x.startswith("COPA/copa")).endswith("no")


def test_tasks_command_on_the_real_data(data_dir, capsys):
    assert main(["tasks", "--data", str(data_dir)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("TC/dbpedia"))
    raw = json.loads((data_dir / "TC/dbpedia/train.json").read_text())
    assert line.split()[1:3] == ["14", str(len(raw))]
    assert "NLI/MNLI test: left out" in out and "labelled '-'" in out


@pytest.mark.parametrize("breakage, message", [
    ("malformed", "malformed JSON at line"),
    ("no-label", "row 1 has no string 'label'"),
])
def test_a_bad_layout_is_the_same_one_line_error_as_run(tmp_path, capsys, breakage, message):
    root = _layout(tmp_path / "data")
    rows = json.loads((root / "SC/mine/test.json").read_text())
    if breakage == "malformed":
        (root / "SC/mine/test.json").write_text('[{"sentence": "a",\n "label": }]')
    else:
        del rows[1]["label"]
        _write(root / "SC/mine/test.json", rows)
    with pytest.raises(DataError) as from_run:
        load_task(root, "SC/mine")
    assert main(["tasks", "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"nlora: error: {from_run.value}" and message in err


def test_tasks_on_an_empty_or_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["tasks", "--data", str(tmp_path)]) == 2
    assert "no tasks in" in capsys.readouterr().err
    assert main(["tasks", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
