"""Data loading, prompts and input validation, on the real CL_Benchmark rows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from nlora.data import (
    INSTRUCTIONS,
    SAMPLE_DATA,
    build_prompt,
    merged_instructions,
    read_instructions,
    read_split,
    resolve_task,
    stratified_sample,
)
from nlora.errors import ConfigError, DataError
from nlora.families import load_task


def test_prompt_matches_the_reference_format_on_a_real_row(data_dir):
    row = json.loads((data_dir / "TC/agnews/test.json").read_text())[0]
    task = load_task(data_dir, "agnews", test_per_task=None, splits=("test",))
    expected = (
        "Task:TC\nDataset:agnews\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Science or Technology \n"
        + row["sentence"]
        + "\nAnswer:"
    )
    assert task.test[0].prompt == expected
    assert task.test[0].label == row["label"]


def test_nli_prompt_uses_the_table6_instruction(data_dir):
    task = load_task(data_dir, "NLI/CB", train_per_task=3, splits=("train",))
    first = task.train[0].prompt.splitlines()
    assert first[:2] == ["Task:NLI", "Dataset:CB"]
    assert first[2].startswith('What is the logical relationship between the "sentence 1"')
    assert first[3] == "Option: entailment, contradiction, neutral "
    assert first[-1] == "Answer:"


def test_names_resolve_case_insensitively_and_by_alias(data_dir):
    assert resolve_task(data_dir, "ag") == ("TC", "agnews")
    assert resolve_task(data_dir, "sst-2") == ("SC", "SST-2")
    assert resolve_task(data_dir, "nli/mnli") == ("NLI", "MNLI")
    with pytest.raises(DataError, match="not found"):
        resolve_task(data_dir, "nosuchtask")


def test_mnli_unlabelled_rows_are_counted_not_silently_dropped(data_dir):
    task = load_task(data_dir, "MNLI", splits=("test",))
    raw = json.loads((data_dir / "NLI/MNLI/test.json").read_text())
    dashes = sum(r["label"] == "-" for r in raw)
    assert dashes == (2 if data_dir == SAMPLE_DATA else 131)  # the data READMEs' counts
    assert task.skipped["test"] == dashes
    assert len(task.test) == len(raw) - dashes


def test_stratified_sample_keeps_label_proportions_and_is_seeded():
    rows = [{"sentence": str(i), "label": "a" if i < 75 else "b"} for i in range(100)]
    sample = stratified_sample(rows, 20, seed=1)
    assert Counter(r["label"] for r in sample) == {"a": 15, "b": 5}
    assert sample == stratified_sample(rows, 20, seed=1)
    assert sample != stratified_sample(rows, 20, seed=2)
    assert stratified_sample(rows, None, seed=1) == rows


def _task_dir(tmp_path: Path, train: object, labels: object = ("x", "y")) -> Path:
    folder = tmp_path / "SC" / "toy"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    text = train if isinstance(train, str) else json.dumps(train)
    (folder / "train.json").write_text(text)
    (folder / "test.json").write_text(json.dumps([{"sentence": "s", "label": "x"}]))
    return folder


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ('[{"sentence": "a", "label": "x"}', r"train\.json: malformed JSON at line 1"),
        ([], r"train\.json: the split is empty"),
        (
            [{"sentence": "a", "label": "x"}, {"label": "y"}],
            r"train\.json: row 1 has no string 'sentence'",
        ),
        ([{"sentence": "a"}], r"train\.json: row 0 has no string 'label'"),
        ([{"sentence": "a", "label": "z"}], r"train\.json: no row has a label listed"),
        ({"sentence": "a"}, r"train\.json: expected a JSON list"),
    ],
)
def test_bad_input_names_the_file_and_row(tmp_path, train, message):
    _task_dir(tmp_path, train)
    with pytest.raises(DataError, match=message):
        load_task(tmp_path, "toy")


def test_missing_file_is_named(tmp_path):
    folder = _task_dir(tmp_path, [{"sentence": "a", "label": "x"}])
    (folder / "test.json").unlink()
    with pytest.raises(DataError, match=r"toy/test\.json: file not found"):
        load_task(tmp_path, "toy")


def test_labels_outside_labels_json_are_left_out_with_a_count(tmp_path):
    folder = _task_dir(tmp_path, [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "?"}])
    rows, skipped = read_split(folder / "train.json", ["x", "y"])
    assert (len(rows), skipped) == (1, 1)


def test_a_category_without_instruction_gets_the_released_copa_prompt():
    # the release's load_COPA_dataset: header, sentence, Answer: (no instruction, no options)
    assert build_prompt("COPA", "COPA", ["1", "2"], "The man fell. Cause?") == (
        "Task:COPA\nDataset:COPA\nThe man fell. Cause?\nAnswer:"
    )
    assert build_prompt("Mine", "toy", ["x"], "s") == "Task:Mine\nDataset:toy\ns\nAnswer:"


def test_instructions_add_and_replace_per_category(tmp_path):
    plain = tmp_path / "mine.yaml"
    plain.write_text("COPA: Which alternative is more plausible?\nSC: Rate it.\n")
    extra = read_instructions(plain)
    assert extra == {"COPA": "Which alternative is more plausible?", "SC": "Rate it."}
    merged = merged_instructions(extra)
    assert build_prompt("COPA", "COPA", ["1", "2"], "s", merged) == (
        "Task:COPA\nDataset:COPA\nWhich alternative is more plausible?\n"
        "Option: 1, 2 \ns\nAnswer:"
    )
    assert build_prompt("SC", "yelp", ["a"], "s", merged).startswith("Task:SC\nDataset:yelp\n"
                                                                     "Rate it.\nOption: a \n")
    assert merged["NLI"] == INSTRUCTIONS["NLI"]  # the others stay the paper's
    # the released instruction_config.json format: first zero-shot instruction, "\n" dropped
    release = tmp_path / "instruction_config.json"
    release.write_text(json.dumps({"TC": [
        {"instruction_type": "zero-shot", "instruction": "Topic? Choose one.\n"}]}))
    assert read_instructions(release) == {"TC": "Topic? Choose one."}


@pytest.mark.parametrize(("text", "message"), [
    ("- a list\n", "expected a mapping"),
    ("COPA: ''\n", "'COPA' has no instruction text"),
    ("COPA: [unclosed\n", "not valid JSON or YAML"),
])
def test_bad_instructions_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_instructions(path)
    with pytest.raises(ConfigError, match="file not found"):
        read_instructions(tmp_path / "absent.json")


def test_unlabelled_test_rows_are_kept_when_counted(tmp_path):
    folder = _task_dir(tmp_path, [{"sentence": "a", "label": "x"}])
    (folder / "test.json").write_text(json.dumps(
        [{"sentence": "s", "label": "x"}, {"sentence": "t", "label": "-"}]))
    default = load_task(tmp_path, "toy")
    assert [e.label for e in default.test] == ["x"] and default.skipped["test"] == 1
    counted = load_task(tmp_path, "toy", count_unlabelled=True)
    assert [e.label for e in counted.test] == ["x", "-"]
    assert counted.skipped["test"] == 0 and counted.unlabelled["test"] == 1
