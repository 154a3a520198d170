"""Task families: SuperNI task files and a user's task folders, read, prompted and scored.

The SuperNI data used here is a hand-written NI-format fixture (tests/data/superni); the real
release (../shared/CL_Benchmark/SuperNI) is only checked where it lies beside the clone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from nlora.batching import Encoder
from nlora.catalog import list_tasks
from nlora.cli import main
from nlora.errors import DataError
from nlora.families import family_of, load_task
from nlora.orders import get_order
from nlora.scoring import rouge_l, row_score

FIXTURE = Path(__file__).parent / "data" / "superni"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "CL_Benchmark"
SUMMARY, ANSWER = "SuperNI/task9001_toy_summary", "SuperNI/task9002_toy_answer"


# ---------------------------------------------------------------------------- SuperNI prompts


def test_superni_prompt_is_the_release_prompt_byte_for_byte():
    task = load_task(FIXTURE, "task9001_toy_summary")
    assert (task.family, task.metric, task.max_new_tokens) == ("superni", "rougeL", 50)
    # written out by hand from tests/data/superni/SuperNI/task9001_toy_summary/test.json:
    # the definition's trailing space is stripped, the input's own spaces are kept
    assert task.test[0].prompt == (
        "Definition: In this task, you are given a short dialogue. Summarise it in one "
        "sentence.\n\nNow complete the following example -\nInput: Ava: Coffee later? Ben: At "
        "four.\nOutput: "
    )
    assert task.train[0].prompt.endswith(
        "Input:  Ann: Lunch at noon? Bob: Sure, see you there. \nOutput: ")
    assert task.test[0].references == ("Ava and Ben will have coffee at four.",
                                       "They meet at four for coffee.")
    assert task.test[0].label in task.test[0].references
    assert {e.max_target for e in task.train} == {50}


@pytest.mark.skipif(not (SHARED / "SuperNI").is_dir(),
                    reason=f"the SuperNI release is not beside the clone ({SHARED})")
def test_prompt_of_a_real_superni_row():
    task = load_task(SHARED, "task1572_samsum_summary", splits=("test",))
    assert task.test[0].prompt == (
        "Definition: In this task, you are given a conversation, and your task is to generate a "
        "summary from the information present in the given conversation. Generate a summary in "
        "such a way that the context should be present in the conversation. It should cover the "
        "complete context of the conversation.\n\nNow complete the following example -\nInput:  "
        "Ruth: Chris, don't forget about Nathan's appt, Chris: Today?, Ruth: Yes, I told you "
        "last night! 4:30, Chris: Oh boy,  I'm gonna have to leave work early., Ruth: Just tell "
        "them you'll work it off later at home., Chris: Fine, just tell him to be ready at 4 "
        "\nOutput: "
    )
    assert task.test[0].references == (" Chris is having an appointment with Nathan today at "
                                       "4:30. ",)


@pytest.mark.skipif(not (SHARED / "SuperNI").is_dir(),
                    reason=f"the SuperNI release is not beside the clone ({SHARED})")
@pytest.mark.parametrize("order", ["superni1", "superni2"])
def test_superni_orders_name_the_fifteen_released_tasks(order):
    tasks = get_order(order).tasks
    assert len(set(tasks)) == 15
    assert set(tasks) == {p.name for p in (SHARED / "SuperNI").iterdir() if p.is_dir()}
    from nlora.presets import make_config

    config = make_config(order=order, data_dir=str(SHARED))
    assert config.tasks == [f"SuperNI/{t}" for t in tasks]
    assert (config.learning_rate, config.batch_size) == (3e-4, 32)
    assert "SuperNI releases" in config.preset_sources["learning_rate"]


# The GainLoRA release's SuperNI scripts (gen_script_superni_order1_t5_inflora.sh and
# .._gainlora_inflora.sh), read by hand: --lora_r 4 --lora_alpha 32 --lora_dropout 0.0,
# --learning_rate 0.0003 constant, --warmup_steps 0, --num_train_epochs 100, 32 rows per step,
# --max_source_length 512, no --seed (42), cl_collator.py cuts the source's head, and
# cl_dataset.py keeps one drawn reference per row.
SUPERNI_RELEASE = {"lora_r": 4, "lora_alpha": 32.0, "lora_dropout": 0.0, "learning_rate": 3e-4,
                   "epochs": 100, "batch_size": 32, "max_source_length": 512, "seed": 42,
                   "truncation": "head", "references": "drawn", "zero_lr_steps": 0}


@pytest.mark.parametrize("method", ["inflora", "gainlora"])
def test_protocol_release_on_a_superni_order_takes_the_gainlora_release_scripts(method):
    from nlora.demo import DEMO_SUPERNI_OPTIONS, SUPERNI_SAMPLE
    from nlora.presets import make_config

    config = make_config(order="superni2", tasks=DEMO_SUPERNI_OPTIONS["tasks"], method=method,
                         data_dir=str(SUPERNI_SAMPLE), protocol="release")
    assert {k: getattr(config, k) for k in SUPERNI_RELEASE} == SUPERNI_RELEASE
    kind = "inflora" if method == "inflora" else "gainlora_inflora"
    script = f"gen_script_superni_order2_t5_{kind}"
    assert script in config.preset_sources["epochs"]
    assert any("test.json" in note for note in config.preset_notes)  # no choice on test
    if method == "inflora":  # the release's InfLoRA T5 code: random A, projected
        assert config.inflora_variant == "released"
    else:  # its gates' input: the masked sum over the padded width
        assert config.gainlora_pool == "padded"
    # the paper protocol keeps nlora's own schedule for the order
    paper = make_config(order="superni2", tasks=DEMO_SUPERNI_OPTIONS["tasks"], method=method,
                        data_dir=str(SUPERNI_SAMPLE))
    assert (paper.epochs, paper.lora_r, paper.references) == (10, 8, "all")


def test_protocol_release_on_superni_without_a_script_keeps_the_release_code_and_says_so():
    from nlora.demo import DEMO_SUPERNI_OPTIONS, SUPERNI_SAMPLE
    from nlora.presets import make_config

    config = make_config(order="superni1", tasks=DEMO_SUPERNI_OPTIONS["tasks"], method="nlora",
                         data_dir=str(SUPERNI_SAMPLE), protocol="release")
    shared = {k: v for k, v in SUPERNI_RELEASE.items()
              if k not in ("learning_rate", "epochs", "batch_size")}
    assert {k: getattr(config, k) for k in shared} == shared
    assert any("no released script for superni1" in note for note in config.preset_notes)
    # a classification order keeps the O-LoRA/N-LoRA releases' shared settings
    cl = make_config(order="order1", tasks=["dbpedia", "agnews"], method="nlora",
                     protocol="release")
    assert (cl.lora_r, cl.zero_lr_steps, cl.references) == (8, 2, "all")


def test_superni_orders_as_the_readme_lists_them():
    one, two = get_order("superni1").tasks, get_order("superni2").tasks
    assert (one[0], one[-1], two[0], two[-1]) == (
        "task1572_samsum_summary", "task875_emotion_classification",
        "task748_glucose_reverse_cause_event_detection", "task875_emotion_classification")
    assert sorted(one) == sorted(two)


def test_a_plain_string_output_is_one_reference():
    task = load_task(FIXTURE, "task9002_toy_answer")
    assert task.test[2].references == ("at night",)


def test_superni_targets_are_cut_to_fifty_tokens_eos_included(tokenizer):
    task = load_task(FIXTURE, "task9001_toy_summary")
    long = type(task.train[0])("x", "word " * 200, "p", max_target=50)
    features = Encoder(tokenizer, True, 64).train_features(long)
    assert len(features["labels"]) == 50 and features["labels"][-1] == tokenizer.eos_token_id


def test_the_drawn_reference_is_seeded_and_one_of_the_row_s():
    a = load_task(FIXTURE, "task9002_toy_answer", seed=1)
    b = load_task(FIXTURE, "task9002_toy_answer", seed=1)
    assert [e.label for e in a.train] == [e.label for e in b.train]
    assert all(e.label in e.references for e in a.train + a.test)
    draws = {load_task(FIXTURE, "task9002_toy_answer", seed=s).train[1].label
             for s in range(30)}
    assert draws == {"in France", "France"}  # both references of that row get drawn


@pytest.mark.parametrize("damage, message", [
    ({"Definition": []}, "Definition is not a list"),
    ({"Instances": []}, "Instances is missing or empty"),
    ({"Instances": [{"input": "a", "output": []}]}, "instance 0: 'output' is neither"),
    ({"Instances": [{"output": ["a"]}]}, "instance 0 has no string 'input'"),
])
def test_a_damaged_ni_file_is_one_line_naming_it(tmp_path, damage, message):
    folder = tmp_path / "SuperNI" / "task1"
    shutil.copytree(FIXTURE / SUMMARY, folder)
    data = json.loads((folder / "test.json").read_text())
    (folder / "test.json").write_text(json.dumps({**data, **damage}))
    with pytest.raises(DataError) as err:
        load_task(tmp_path, "task1")
    assert str(err.value).startswith(str(folder / "test.json")) and message in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize("prediction, reference, expected", [
    # LCS "the cat on the mat" = 5 tokens; P 5/6, R 5/5: F = 2PR/(P+R) = 10/11
    ("the cat sat on the mat", "the cat on the mat", 100 * 10 / 11),
    # LCS "a c" = 2; P 2/3, R 2/4: F = 2 (1/3) / (7/6) = 4/7
    ("a b c", "a x c y", 100 * 4 / 7),
    # Porter stemmer: cats -> cat, running -> run
    ("cats running", "cat run", 100.0),
    # rouge_score's tokenizer drops case and punctuation
    ("Hello, World!", "hello world", 100.0),
    ("blue", "red", 0.0),
])
def test_rouge_l_against_hand_computed_lcs(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


PAIRS = [("the quick brown fox", "a quick brown dog jumps"),
         ("Chris has an appointment at 4:30.", "Chris is having an appointment today at 4:30."),
         ("positive", "negative"), ("", "something"), ("walked home", "walking homes")]


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_is_the_reference_package_with_the_stemmer(prediction, reference):
    package = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = package.score(reference, prediction)["rougeL"].fmeasure * 100
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_rouge_l_takes_the_best_reference_and_reports_exact_match_beside():
    # "blue" against "blue sky": LCS 1, P 1, R 1/2 -> F 2/3
    assert row_score("rougeL", "blue", ["red", "blue sky"]) == (pytest.approx(200 / 3), False)
    assert row_score("rougeL", "Blue sky.", ["red", "blue sky"]) == (pytest.approx(100), True)
    assert row_score("exact_match", "France", ["in France", "France"]) == (100.0, True)
    assert row_score("accuracy", "yes", ["no"], labels={"yes", "no"}) == (0.0, False)


# ---------------------------------------------------------------------------- a user's tasks


def _user(root: Path, name: str, train: str | bytes, test: str | bytes,
          yaml_text: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for split, text in (("train", train), ("test", test)):
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        (folder / f"{split}.jsonl").write_bytes(data)
    if yaml_text is not None:
        (folder / "task.yaml").write_text(yaml_text)
    return folder


def _rows(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_user_task_folders_load_as_their_task_yaml_says(tmp_path):
    _user(tmp_path, "shout", _rows({"input": "hi", "output": "HI"}),
          _rows({"input": "yo", "output": ["YO", "YO!"]}),
          "instruction: Repeat the input in capitals.\nmetric: exact_match\n"
          "max_new_tokens: 8\n")
    _user(tmp_path, "mood", _rows({"input": "great", "output": "good"},
                                  {"input": "awful", "output": "bad"}),
          _rows({"input": "fine", "output": "good"}), "metric: accuracy\n")
    shout = load_task(tmp_path, "shout")
    assert (shout.name, shout.family, shout.metric, shout.max_new_tokens) == (
        "shout", "user", "exact_match", 8)
    assert shout.test[0].prompt == ("Definition: Repeat the input in capitals.\n\nNow complete "
                                    "the following example -\nInput: yo\nOutput: ")
    assert shout.test[0].references == ("YO", "YO!")
    mood = load_task(tmp_path, "mood")
    assert (mood.metric, mood.labels, mood.max_new_tokens) == ("accuracy", ["bad", "good"], None)
    assert mood.test[0].prompt == "Input: fine\nOutput: "
    assert family_of(tmp_path / "mood").name == "user"
    assert family_of(FIXTURE / SUMMARY).name == "superni"


def test_every_bad_user_file_or_row_is_one_line(tmp_path, capsys):
    _user(tmp_path, "a", _rows({"input": "x"}, {"input": "y", "output": []}),
          _rows({"input": "z", "output": "ok"}), "metric: bleu\n")
    _user(tmp_path, "b", "", b'{"input": "caf\xe9", "output": "x"}\n')
    assert main(["tasks", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    a, b = tmp_path / "a", tmp_path / "b"
    assert err == [
        f"nlora: error: {a / 'task.yaml'}: unknown metric 'bleu' (one of exact_match, rougeL, "
        "accuracy)",
        f"nlora: error: {a / 'train.jsonl'}: row 1: no 'output'",
        f"nlora: error: {a / 'train.jsonl'}: row 2: 'output' is an empty list (give at least "
        "one reference)",
        f"nlora: error: {b / 'train.jsonl'}: the file is empty (one JSON object per line "
        "expected)",
        f"nlora: error: {b / 'test.jsonl'}: not UTF-8 text (byte 0xe9 at offset 14); save it "
        "as UTF-8",
    ]
    with pytest.raises(DataError) as from_run:  # a run stops at the first, saying there is more
        load_task(tmp_path, "a")
    assert "\n" not in str(from_run.value) and "and 2 more" in str(from_run.value)


def test_tasks_lists_generation_tasks_with_family_metric_and_sizes(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    assert main(["tasks", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(SUMMARY))
    assert line.split() == [SUMMARY, "superni", "rougeL", "6", "3", "50", "yes"]
    assert [i.name for i in list_tasks(tmp_path)] == [SUMMARY, ANSWER]


# ---------------------------------------------------------------------------- end to end

FAST = ["--epochs", "1", "--batch-size", "2", "--lr", "5e-3", "--max-source-length", "96",
        "--seed", "3", "--eval-on", "all", "--no-zero-shot"]


def _finished_run(model_dir: Path, data: Path, out: Path, tasks: str, *extra: str) -> dict:
    assert main(["run", "--model", str(model_dir), "--data", str(data), "--tasks", tasks,
                 "--out", str(out), *FAST, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _check_against_predictions(run: Path, metrics: dict, folder: str,
                               column: int = -1) -> list[float]:
    """Column ``column`` of the matrix is the mean of the rows' own scores in that step's
    predictions.jsonl, each recomputed here with the reference package; returns them."""
    package = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = [json.loads(x) for x in (run / "tasks" / folder / "predictions.jsonl")
            .read_text().splitlines()]
    every = []
    for i, (name, metric) in enumerate(zip(metrics["tasks"], metrics["metrics"],
                                           strict=True)):
        mine = [r for r in rows if r["task"] == name]
        if not mine:  # not evaluated at that step
            continue
        if metric == "rougeL":
            values = [max(package.score(ref, r["prediction"])["rougeL"].fmeasure * 100
                          for ref in r["references"]) for r in mine]
        else:
            values = [100.0 * r["correct"] for r in mine]
        assert metrics["accuracy"][i][column] == pytest.approx(sum(values) / len(values))
        every += values
    return every


def test_two_superni_tasks_run_to_a_full_rouge_matrix_and_report(tiny_t5_dir, tmp_path,
                                                                  capsys):
    run = tmp_path / "run"
    metrics = _finished_run(tiny_t5_dir, FIXTURE, run, f"{SUMMARY},{ANSWER}")
    assert metrics["metrics"] == ["rougeL", "rougeL"]
    assert all(v is not None for row in metrics["accuracy"] for v in row)  # eval-on all
    assert all(v is not None for row in metrics["exact_match"] for v in row)
    assert set(metrics["summary"]) == {"AA", "F.Ra", "BWT", "EM"}
    final = [row[-1] for row in metrics["accuracy"]]
    assert metrics["summary"]["AA"] == pytest.approx(sum(final) / 2)
    _check_against_predictions(run, metrics, "02-task9002_toy_answer")
    rows = [json.loads(x) for x in (run / "tasks/02-task9002_toy_answer/predictions.jsonl")
            .read_text().splitlines()]
    assert {len(r["references"]) for r in rows if r["task"] == ANSWER} == {1, 2}
    out = capsys.readouterr().out
    assert "rougeL: ROUGE-L (F x 100)" in out and "EM " in out
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "ROUGE-L" in report and (tmp_path / "report" / "run_accuracy.png").is_file()


def test_the_judge_scores_rows_by_metric_and_reference_choice():
    """Non-zero scores (a tiny random model answers nothing right): the judge on chosen
    answers, against hand-computed values."""
    from nlora.evaluate import Prediction
    from nlora.presets import make_config
    from nlora.runner import Judge

    task = load_task(FIXTURE, "task9002_toy_answer", seed=5)
    # rows: grass -> "green"; fish -> "in water" | "water"; owls -> "at night"
    answers = ["green", "water", "at noon"]
    preds = [Prediction(i, a, e.label) for i, (a, e) in enumerate(zip(answers, task.test,
                                                                      strict=True))]
    config = make_config(tasks=[ANSWER], data_dir=str(FIXTURE))
    record, lines = Judge(config, causal=False).score([task], {0: preds})
    # "at noon" vs "at night": LCS 1, P 1/2, R 1/2 -> F 1/2
    assert record["accuracy"][ANSWER] == pytest.approx((100 + 100 + 50) / 3)
    assert record["exact_match"][ANSWER] == pytest.approx(200 / 3)
    assert record["metric"] == {ANSWER: "rougeL"} and ANSWER not in record["counts"]
    drawn = Judge(make_config(tasks=[ANSWER], data_dir=str(FIXTURE), references="drawn"),
                  causal=False)
    record, lines = drawn.score([task], {0: preds})
    # against the drawn reference only: "water" scores 100 if "water" was drawn, else
    # 2 (1 x 1/2) / (3/2) = 2/3 against "in water"
    fish = 100.0 if task.test[1].label == "water" else 200 / 3
    assert record["accuracy"][ANSWER] == pytest.approx((100 + fish + 50) / 3)
    assert [json.loads(x)["references"] for x in lines][1] == [task.test[1].label]


def test_a_user_folder_and_a_mixed_sequence_score_each_task_by_its_metric(
        tiny_llama_dir, data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    _user(data, "shout", _rows(*({"input": w, "output": w.upper()} for w in
                                 ("hi", "yo", "ok", "go"))),
          _rows({"input": "no", "output": ["NO", "NO!"]}, {"input": "up", "output": "UP"}),
          "metric: exact_match\nmax_new_tokens: 4\n")
    # one answer for every row, learnt in a few steps: ROUGE-L is then not 0 everywhere
    _user(data, "agree", _rows(*({"input": w, "output": "I agree"} for w in "abcd")),
          _rows({"input": "e", "output": ["I agree", "no"]},
                {"input": "f", "output": "I agree with you"}),
          "metric: rougeL\nmax_new_tokens: 4\n")
    rows = json.loads((data_dir / "SC/yelp/train.json").read_text())[:4]
    (data / "SC" / "yelp").mkdir(parents=True)
    for split in ("train", "test"):
        (data / "SC/yelp" / f"{split}.json").write_text(json.dumps(rows))
    shutil.copy(data_dir / "SC/yelp/labels.json", data / "SC/yelp/labels.json")
    metrics = _finished_run(tiny_llama_dir, data, tmp_path / "run", "shout,agree,SC/yelp",
                            "--epochs", "1,10,1", "--lr", "5e-3,3e-2,5e-3",
                            "--method", "seqlora")
    assert metrics["tasks"] == ["shout", "agree", "SC/yelp"]
    assert metrics["metrics"] == ["exact_match", "rougeL", "accuracy"]
    assert len(metrics["accuracy"]) == 3 and all(len(r) == 3 for r in metrics["accuracy"])
    run = tmp_path / "run"
    _check_against_predictions(run, metrics, "02-agree", column=1)
    assert metrics["accuracy"][1][1] > 0  # the package comparison is not of zeros only
    _check_against_predictions(run, metrics, "03-yelp")
    table = capsys.readouterr().out
    for name, metric in (("shout", "exact_match"), ("agree", "rougeL"), ("yelp", "accuracy")):
        assert next(x for x in table.splitlines() if x.startswith(name)).endswith(metric)
    with pytest.raises(Exception, match="has none: use --eval-mode generate"):
        from nlora.presets import make_config
        from nlora.runner import load_tasks
        load_tasks(make_config(tasks=["agree"], data_dir=str(data), eval_mode="rank"))
    with pytest.raises(Exception, match="learns classification tasks only; agree is a user"):
        load_tasks(make_config(tasks=["SC/yelp", "agree"], data_dir=str(data), method="lfpt5"))


def test_the_user_tasks_example_is_current_and_valid():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    check = subprocess.run([sys.executable, "scripts/make_user_tasks_example.py", "--check"],
                           cwd=repo, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    infos = {i.name: i for i in list_tasks(repo / "docs" / "examples" / "user_tasks")}
    assert {n: (i.metric, i.rows["train"], i.rows["test"]) for n, i in infos.items()} == {
        "headline": ("rougeL", 40, 10), "sentiment": ("accuracy", 40, 10)}


def test_a_validation_split_never_opens_the_test_file(tmp_path):
    folder = tmp_path / "SuperNI" / "task1"
    shutil.copytree(FIXTURE / ANSWER, folder)
    (folder / "test.json").write_text("not json")  # a run that opened it would fail
    task = load_task(tmp_path, "task1", eval_split="validation", validation_per_task=2)
    full = load_task(FIXTURE, ANSWER, splits=("train",))
    assert (len(task.test), len(task.train)) == (2, 4)
    assert sorted(e.sentence for e in task.test + task.train) == sorted(
        e.sentence for e in full.train)
    _user(tmp_path / "mine", "t", _rows({"input": "a", "output": "A"}, {"input": "b",
                                                                        "output": "B"}),
          _rows({"input": "z", "output": "Z"}))
    (tmp_path / "mine/t/validation.jsonl").write_text(_rows({"input": "c", "output": "C"}))
    own = load_task(tmp_path / "mine", "t", eval_split="validation")
    assert [e.sentence for e in own.test] == ["c"] and len(own.train) == 2
    assert own.validation == {"source": "validation.jsonl", "rows": 1}


@pytest.mark.slow  # a study: one cell run by the local backend in a subprocess
def test_a_study_on_superni_tasks_reports_rouge_aa_and_exact_match(tiny_t5_dir, tmp_path):
    import csv

    import yaml

    from nlora.study.driver import run_study

    spec = {"name": "toy", "options": {
        "model": str(tiny_t5_dir), "data_dir": str(FIXTURE), "epochs": 1, "batch_size": 2,
        "max_source_length": 96, "zero_shot": False},
        "methods": {"seqlora": {}}, "orders": [{"toy": [SUMMARY, ANSWER]}], "seeds": [1],
        "report": {"metrics": ["AA", "EM", "BWT"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_study(path, tmp_path / "study")
    metrics = json.loads((tmp_path / "study/final/seqlora/toy/seed1/metrics.json").read_text())
    assert metrics["metrics"] == ["rougeL", "rougeL"]
    with open(tmp_path / "study/report/table.csv", encoding="utf-8") as handle:
        rows = {r["metric"]: r for r in csv.DictReader(handle) if r["column"] == "toy"}
    for name in ("AA", "EM"):  # the study reads the run's ROUGE-L AA and exact match
        assert float(rows[name]["mean"]) == pytest.approx(metrics["summary"][name])


@pytest.mark.skipif(not (SHARED / "SuperNI").is_dir(),
                    reason=f"the SuperNI release is not beside the clone ({SHARED})")
def test_the_superni_sample_is_what_its_script_builds():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "scripts/make_superni_sample.py", "--source",
                           str(SHARED), "--check"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "identical", done.stdout


def test_the_superni_sample_is_small_package_data_of_three_tasks():
    import fnmatch
    import tomllib

    from nlora.demo import DEMO_SUPERNI_OPTIONS, SUPERNI_SAMPLE

    repo = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["nlora"]
    files = [p.relative_to(SUPERNI_SAMPLE.parents[1]).as_posix()
             for p in SUPERNI_SAMPLE.rglob("*") if p.is_file()]
    assert len(files) == 7  # 3 tasks x 2 splits + MANIFEST.json
    for f in files:  # setuptools' "*" does not cross "/": compare segment counts
        assert any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                   for pat in patterns), f
    assert sum(p.stat().st_size for p in SUPERNI_SAMPLE.rglob("*") if p.is_file()) < 2e5
    infos = {i.dataset: i for i in list_tasks(SUPERNI_SAMPLE)}
    assert sorted(infos) == sorted(DEMO_SUPERNI_OPTIONS["tasks"])
    assert {(i.rows["train"], i.rows["test"]) for i in infos.values()} == {(96, 40)}


@pytest.mark.slow  # two methods on three generation tasks
def test_the_superni_demo_table_shows_rouge_own_and_end(tiny_llama_dir, tmp_path):
    from nlora.demo import DEMO_SUPERNI_OPTIONS, format_demo, run_demo

    result = run_demo(tmp_path / "demo", benchmark="superni", model=str(tiny_llama_dir),
                      train_per_task=4, test_per_task=3, batch_size=4, max_source_length=64,
                      learning_rate=5e-3)
    assert result.metrics == ["rougeL"] * 3
    lines = format_demo(result).splitlines()
    assert "rougeL: ROUGE-L (F x 100)" in lines[0]
    for i, task in enumerate(DEMO_SUPERNI_OPTIONS["tasks"]):
        cells = next(x for x in lines if x.startswith(task + " ")).split()
        assert cells[1] == "rougeL"
        expected = [v for m in result.methods for v in (m.accuracy[i][i], m.accuracy[i][-1])]
        assert [float(c) for c in cells[2:]] == pytest.approx(expected, abs=0.05)
