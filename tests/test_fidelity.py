"""Reproduction fidelity: O-LoRA's released penalty forms, the field's scorer, the release
protocol's presets, any category's prompt, and the zero-shot row / unseen curves of a real run.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASKS

from nlora.cli import main
from nlora.config import RunConfig
from nlora.errors import ConfigError
from nlora.presets import describe_presets, make_config
from nlora.scoring import accuracy, answer_text, is_correct, normalise_answer

FAST = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size", "4",
        "--lr", "5e-3", "--max-source-length", "96", "--seed", "3"]


# --- O-LoRA's penalty on small matrices, by hand ------------------------------------------


def _one_module_peft(A: list[list[float]], B: list[list[float]]):
    from peft import LoraConfig, get_peft_model

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 3, bias=False)

        def forward(self, x):
            return self.proj(x)

    model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))
    with torch.no_grad():
        model.base_model.model.proj.lora_A["default"].weight.copy_(torch.tensor(A))
        model.base_model.model.proj.lora_B["default"].weight.copy_(torch.tensor(B))
    return model


def test_olora_terms_equal_hand_computed_values():
    from nlora.methods.olora import l2_penalty, orthogonality_penalty

    # PEFT's lora_A is (r, in): rows a1 = (1, 2, 0), a2 = (0, -1, 1); B is (out, r)
    model = _one_module_peft([[1, 2, 0], [0, -1, 1]], [[3, 0], [0, 4], [0, 0]])
    earlier = {"proj": [torch.tensor([[1.0, 0, 1], [2, 1, -1]]),   # A_1 rows p1, p2
                        torch.tensor([[0.0, 0, 1], [1, 1, 1]])]}   # A_2 rows q1, q2
    # A_1 A_tᵀ = [[p1·a1, p1·a2], [p2·a1, p2·a2]] = [[1, 1], [4, -2]]
    # A_2 A_tᵀ = [[0, 1], [3, 0]]
    assert orthogonality_penalty(model, earlier, "abs").item() == 1 + 1 + 4 + 2 + 1 + 3
    assert orthogonality_penalty(model, earlier, "fro").item() == 1 + 1 + 16 + 4 + 1 + 9
    # ‖A‖_F = √7, ‖B‖_F = 5
    assert l2_penalty(model, "norm").item() == pytest.approx(math.sqrt(7) + 5)
    assert l2_penalty(model, "squared").item() == pytest.approx(7 + 25)
    assert orthogonality_penalty(model, {}, "abs").item() == 0  # the first task: no term
    with pytest.raises(ConfigError, match="--olora-orth"):
        orthogonality_penalty(model, earlier, "l1")


# --- the scorer against a reference written from the description ----------------------------


def _reference_normalise(text: str) -> str:
    """From the issue's description: lower-case, punctuation removed, whitespace collapsed."""
    kept = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\s+", " ", kept).strip()


def _reference_correct(generated: str, label: str, causal: bool) -> bool:
    if causal and "Answer:" in generated:
        generated = generated.split("Answer:")[-1]
    return _reference_normalise(generated) == _reference_normalise(label)


CASES = [  # (generated, label, causal, normalised verdict, strict verdict)
    ("World.", "World", False, True, False),
    ("world", "World", False, True, False),
    ("Society Culture", "Society & Culture", False, True, False),
    ("  Sports \n", "Sports", False, True, True),
    ("Business", "World", False, False, False),
    ("Science/Tech", "Science or Technology", False, False, False),
    ("World\nAnswer: Sports", "Sports", True, True, False),  # causal: after the last Answer:
    ("World\nAnswer: Sports", "Sports", False, False, False),  # seq2seq: the text as it is
    ("entailment.", "entailment", True, True, False),
    ("not_entailment", "not entailment", False, False, False),  # "_" is punctuation: removed
    ("notentailment", "not_entailment", False, True, False),
]


@pytest.mark.parametrize(("generated", "label", "causal", "normalised", "strict"), CASES)
def test_scorer_cases(generated, label, causal, normalised, strict):
    assert is_correct(generated, label, "normalised", causal) is normalised
    assert is_correct(generated, label, "strict", causal) is strict
    assert _reference_correct(generated, label, causal) is normalised


def test_normalised_scorer_agrees_with_the_reference_on_real_labels(data_dir):
    labels = {lab for path in data_dir.glob("*/*/labels.json")
              for lab in json.loads(path.read_text())}
    variants = []
    for lab in sorted(labels):
        variants += [lab, lab.upper(), f"{lab}.", f" {lab}!\n", lab.replace(" ", "  "),
                     lab.replace("&", "and"), f"Answer: {lab}", f"{lab}, maybe"]
    for generated in variants:
        for lab in labels:
            for causal in (False, True):
                assert is_correct(generated, lab, "normalised", causal) == \
                    _reference_correct(generated, lab, causal), (generated, lab)
    assert normalise_answer("Society & Culture") == "society culture"
    assert answer_text("a Answer: b Answer: c", causal=True) == " c"


def test_unlabelled_rows_are_always_wrong_when_counted():
    class P:
        def __init__(self, prediction: str, label: str) -> None:
            self.prediction, self.label = prediction, label

    rows = [P("neutral", "neutral"), P("", "-"), P("-", "-")]
    labels = {"neutral", "entailment", "contradiction"}
    # without the label set the release's normaliser would call "" and "-" right for "-"
    assert accuracy(rows, "normalised") == 100.0
    assert accuracy(rows, "normalised", labels=labels) == pytest.approx(100 / 3)


# --- presets: the release protocol and each method's own source -----------------------------


def _config(data_dir, **options) -> RunConfig:
    return make_config(data_dir=str(data_dir), **options)


# The released scripts' own flags, one line per task, copied from the scripts (N-LoRA release
# github.com/PKU-YuanGroup/N-LoRA, O-LoRA release github.com/cmnfriend/O-LoRA), not from
# nlora's tables: the expected settings below are computed from them.
N_LORA_ORDER_1 = 4 * [  # scripts/order_1.sh
    "CUDA_VISIBLE_DEVICES=6 --per_device_train_batch_size 48 --gradient_accumulation_steps 1 "
    "--learning_rate 1e-03 --num_train_epochs 10 --lamda_1 0.4"]
N_LORA_LLAMA_ORDER_1 = [  # scripts_llama/order_1.sh
    f"CUDA_VISIBLE_DEVICES=2 --per_device_train_batch_size 6 --gradient_accumulation_steps 8 "
    f"--learning_rate {lr} --num_train_epochs {epochs} --lamda_1 0.46"
    for lr, epochs in (("1e-03", 1), ("1e-04", 10), ("1e-04", 1), ("1e-04", 1))]
O_LORA_ORDER_1 = 4 * [  # scripts/order_1.sh
    "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 --per_device_train_batch_size 8 "
    "--gradient_accumulation_steps 1 --learning_rate 1e-03 --num_train_epochs 1 --lamda_1 0.5 "
    "--lamda_2 0"]
N_LORA_ORDER_4 = [  # scripts/order_4.sh: task and λ (1 GPU x 32 rows, lr 5e-4, 10 epochs)
    f"CUDA_VISIBLE_DEVICES=3 --task_config_dir configs/order4_configs/{task} "
    f"--per_device_train_batch_size 32 --gradient_accumulation_steps 1 --learning_rate 5e-04 "
    f"--num_train_epochs 10 --lamda_1 {l1}"
    for task, l1 in (("MNLI", 0.4), ("CB", 0.4), ("WiC", 1.2), ("COPA", 0.4), ("QQP", 0.4),
                     ("BoolQA", 0.4), ("RTE", 1.2), ("IMDB", 1.2), ("yelp", 1.2),
                     ("amazon", 0.4), ("SST-2", 1.2), ("dbpedia", 1.2), ("agnews", 0.4),
                     ("MultiRC", 0.4), ("yahoo", 1.2))]
SEQFT_ORDER_1 = [  # logs_and_outputs/order1_seqft/hyparam.sh
    f"CUDA_VISIBLE_DEVICES=2,3 --per_device_train_batch_size 8 --gradient_accumulation_steps 4 "
    f"--learning_rate {lr} --num_train_epochs 1" for lr in ("1e-03", "1e-04", "1e-04", "1e-04")]
O_LORA_LONG = [  # scripts/long.sh: task, epochs, λ1, λ2 (8 GPUs x 8 rows, lr 1e-3 each)
    f"CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 --task_config_dir configs/long_configs/{task} "
    f"--per_device_train_batch_size 8 --gradient_accumulation_steps 1 --learning_rate 1e-03 "
    f"--num_train_epochs {epochs} --lamda_1 {l1} --lamda_2 {l2}"
    for task, epochs, l1, l2 in (
        ("yelp", 1, 0, 0), ("amazon", 1, 0.5, 0), ("MNLI", 2, 0.5, 0), ("CB", 1, 0.5, 0),
        ("COPA", 1, 0.5, 0.1), ("QQP", 1, 0.5, 0.1), ("RTE", 1, 0.5, 0.3), ("IMDB", 1, 0.5, 0),
        ("SST-2", 1, 0.5, 0.1), ("dbpedia", 1, 5, 0), ("agnews", 1, 5, 0), ("yahoo", 1, 5, 0.1),
        ("MultiRC", 1, 5, 0), ("BoolQA", 1, 5, 0.1), ("WiC", 1, 5, 0.3))]


def _flags(line: str) -> dict:
    words = line.split()
    values = {w.removeprefix("--"): words[i + 1] for i, w in enumerate(words)
              if w.startswith("--")}
    gpus = len(words[0].removeprefix("CUDA_VISIBLE_DEVICES=").split(","))
    per_device, accum = int(values["per_device_train_batch_size"]), \
        int(values["gradient_accumulation_steps"])
    return {"gpus": gpus, "accum": accum, "batch": per_device * accum * gpus,
            "lr": float(values["learning_rate"]), "epochs": int(values["num_train_epochs"]),
            "l1": float(values.get("lamda_1", "nan")), "l2": float(values.get("lamda_2", "nan")),
            "task": values.get("task_config_dir", "").rsplit("/", 1)[-1]}


def _script(lines: list[str]) -> dict:
    """Per-task flags, collapsed to one value where every task has the same."""
    rows = [_flags(line) for line in lines]
    return {k: rows[0][k] if len({str(r[k]) for r in rows}) == 1 else [r[k] for r in rows]
            for k in rows[0]}


def _deepspeed_zero_lr_steps(warmup_num_steps: int = 0, steps: int = 10) -> int:
    """Steps run at lr 0 by DeepSpeed's WarmupLR as the releases' stage2 configs set it
    (warmup_min_lr 0, log warm-up, warmup_num_steps "auto" = HF's 0 warm-up steps): DeepSpeed
    raises the warm-up to at least 2 steps, sets lr_min when it is created, and after step s
    sets min + (max - min) · log(s) / log(warm-up) (s counted from 1) until the warm-up ends."""
    warmup = max(2, warmup_num_steps)
    rates = [0.0]  # at creation: the first step's rate
    for s in range(1, steps):
        rates.append(math.log(s) / math.log(warmup) if s < warmup else 1.0)
    return sum(rate == 0.0 for rate in rates)


def test_release_protocol_sets_each_methods_script(data_dir):
    order1 = dict(order="order1", substitute="yahoo=yelp", protocol="release")
    script = _script(N_LORA_ORDER_1)
    n = _config(data_dir, method="nlora", **order1)
    assert (n.batch_size, n.epochs, n.learning_rate, n.l1_lambda) == \
        (script["batch"], script["epochs"], script["lr"], script["l1"])
    assert n.l1_on == "reference"  # src/uie_trainer_lora.py penalises loranew_A @ loranew_B
    assert (n.grad_accum, n.loss_parts) == (script["accum"], script["accum"] * script["gpus"])
    script = _script(O_LORA_ORDER_1)
    o = _config(data_dir, method="olora", **order1)
    assert (o.batch_size, o.epochs, o.learning_rate, o.olora_lambda1, o.olora_lambda2) == \
        (script["batch"], script["epochs"], script["lr"], script["l1"], script["l2"])
    assert o.olora_orth == "abs" and o.loss_parts == script["gpus"] * script["accum"] == 8
    inc = _config(data_dir, method="inclora", **order1)  # O-LoRA's script at λ = 0
    assert (inc.batch_size, inc.epochs, inc.learning_rate, inc.loss_parts) == \
        (script["batch"], 1, script["lr"], 8)
    for c in (n, o, inc):
        assert (c.truncation, c.max_grad_norm, c.scorer, c.count_unlabelled, c.task_seed,
                c.group_by_length) == ("head", 1.0, "normalised", True, "same", False)
        assert c.seed_for_task(3) == c.seed == 42  # no --seed: HF's default for every task
        assert c.zero_lr_steps == _deepspeed_zero_lr_steps() == 2
    assert "scripts/order_1.sh" in n.preset_sources["batch_size"]
    text = "\n".join(describe_presets(o))
    assert "protocol release" in text and "olora_lambda1 = 0.5" in text
    script = _script(N_LORA_LLAMA_ORDER_1)  # LLaMA: 1 GPU, 6 rows x 8 steps, bf16 config
    llama = _config(data_dir, method="nlora", order="order1-llama", substitute="yahoo=yelp",
                    protocol="release")
    assert (llama.batch_size, llama.grad_accum, llama.epochs, llama.learning_rate,
            llama.l1_lambda, llama.loss_parts) == \
        (script["batch"], script["accum"], script["epochs"], script["lr"], script["l1"], 8)
    assert llama.precision == "bf16"  # configs/ds_configs/stage2_llama.config: bfloat16 on
    script = _script(SEQFT_ORDER_1)
    seqft = _config(data_dir, method="seqft", **order1)
    assert (seqft.batch_size, seqft.grad_accum, seqft.learning_rate, seqft.epochs,
            seqft.loss_parts) == (script["batch"], script["accum"], script["lr"],
                                  script["epochs"], 2 * 4)
    # the paper protocol keeps the paper's mechanics: no lr-0 steps, token-weighted loss
    paper = _config(data_dir, method="olora", order="order1", substitute="yahoo=yelp")
    assert (paper.zero_lr_steps, paper.loss_parts) == (0, 1)


def test_paper_protocol_keeps_the_paper_and_runs_baselines_from_their_source(data_dir):
    order1 = dict(order="order1", substitute="yahoo=yelp")
    n = _config(data_dir, method="nlora", **order1)
    assert (n.protocol, n.l1_on, n.batch_size, n.truncation, n.task_seed) == \
        ("paper", "deltaw", 32, "text", "offset")
    assert n.seed_for_task(2) == n.seed + 2
    o = _config(data_dir, method="olora", **order1)
    assert (o.olora_orth, o.batch_size, o.epochs) == ("abs", 64, 1)  # O-LoRA's own scripts


def test_given_options_win_and_per_task_lists_are_checked(data_dir):
    c = _config(data_dir, method="olora", order="order1", substitute="yahoo=yelp",
                protocol="release", batch_size=16, olora_orth="fro",
                olora_lambda1=[0.0, 0.1, 0.2, 0.3], scorer="strict")
    assert (c.batch_size, c.olora_orth, c.olora_lambda1, c.scorer) == \
        (16, "fro", [0.0, 0.1, 0.2, 0.3], "strict")
    assert "batch_size" not in c.preset_sources
    # the released λ belongs to the released ℓ1 form: another form gets nlora's default λ
    d = _config(data_dir, method="nlora", order="order1", substitute="yahoo=yelp",
                protocol="release", l1_on="deltaw")
    assert d.l1_lambda == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="--olora-lambda1 lists 2 values for 4 tasks"):
        _config(data_dir, method="olora", order="order1", substitute="yahoo=yelp",
                olora_lambda1=[0.5, 5.0])
    with pytest.raises(ConfigError, match="--protocol must be one of paper, release"):
        _config(data_dir, tasks="CB", protocol="authors")


def _fake_benchmark(root: Path) -> Path:
    """Every dataset of the paper's orders, two rows each (presets only need the files)."""
    from nlora.data import KNOWN_CATEGORIES

    names = {"sst-2": "SST-2", "imdb": "IMDB", "mnli": "MNLI", "cb": "CB", "rte": "RTE",
             "qqp": "QQP", "boolqa": "BoolQA", "multirc": "MultiRC", "wic": "WiC",
             "copa": "COPA"}
    for dataset, category in KNOWN_CATEGORIES.items():
        folder = root / category / names.get(dataset, dataset)
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text('["x", "y"]')
        for split in ("train", "test"):
            (folder / f"{split}.json").write_text(
                '[{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}]')
    return root


def test_olora_long_order_schedule_and_orders_without_a_script(tmp_path):
    data = _fake_benchmark(tmp_path / "data")
    script = _script(O_LORA_LONG)
    six = _config(data, method="olora", order="order6")  # O-LoRA scripts/long.sh
    assert [name.split("/")[1] for name in six.tasks] == script["task"]
    assert (six.olora_lambda1, six.olora_lambda2, six.epochs) == \
        (script["l1"], script["l2"], script["epochs"])
    assert six.batch_size == script["batch"] and six.learning_rate == script["lr"]
    assert not six.preset_notes
    four = _config(data, method="olora", order="order4")  # no script: long.sh's λ by position
    assert four.olora_lambda1 == script["l1"] and four.epochs == 1
    assert "no script for order4" in four.preset_notes[0]
    script = _script(N_LORA_ORDER_4)
    nl4 = _config(data, method="nlora", order="order4", protocol="release")
    assert [name.split("/")[1] for name in nl4.tasks] == script["task"]
    assert (nl4.l1_lambda, nl4.learning_rate, nl4.batch_size, nl4.epochs) == \
        (script["l1"], script["lr"], script["batch"], script["epochs"])
    seqlora = _config(data, method="seqlora", order="order6", protocol="release")
    assert seqlora.epochs == 1 and seqlora.batch_size == 64  # the released seqlora logs
    paper_seqft = _config(data, method="seqft", order="order1")
    assert (paper_seqft.learning_rate, paper_seqft.epochs) == (1e-5, 10)  # nlora's choice
    replay = _config(data, method="replay", order="order1", protocol="release")
    assert "replay has no released script" in replay.preset_notes[0]
    assert replay.learning_rate == 1e-5 and replay.truncation == "head"


# --- any category, end to end -----------------------------------------------------------------


def _category_data(root: Path) -> Path:
    """A COPA-style task and a user's own category, neither with an instruction."""
    copa = root / "COPA" / "COPA"
    mine = root / "Mine" / "toy"
    for folder in (copa, mine):
        folder.mkdir(parents=True)
    (copa / "labels.json").write_text('["A", "B"]')
    rows = [{"sentence": f"Which is the cause of \"The cup {i} broke.\"? Choose one between "
                         f"A and B.\nA: It fell.\nB: It sang.", "label": "AB"[i % 2]}
            for i in range(10)]
    for split in ("train", "test"):
        (copa / f"{split}.json").write_text(json.dumps(rows))
    (mine / "labels.json").write_text('["red", "blue"]')
    rows = [{"sentence": f"The sky {i} looks", "label": ["red", "blue"][i % 2]}
            for i in range(10)]
    for split in ("train", "test"):
        (mine / f"{split}.json").write_text(json.dumps(rows))
    return root


def test_copa_and_an_unknown_category_run_end_to_end(tiny_llama_dir, tmp_path, caplog):
    data = _category_data(tmp_path / "data")
    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data), "--tasks",
            "COPA,Mine/toy", "--out", str(tmp_path / "run"), *FAST]
    with caplog.at_level("INFO", logger="nlora"):
        assert main(argv) == 0
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["tasks"] == ["COPA/COPA", "Mine/toy"]
    # AA: the mean over both tasks of the share of their final answers the reference scorer
    # calls right (the recorded raw answers, rescored here)
    rows = [json.loads(line) for line in
            (tmp_path / "run/tasks/02-toy/predictions.jsonl").read_text().splitlines()]
    right = {t: [_reference_correct(r["prediction"], r["label"], True) for r in rows
                 if r["task"] == t] for t in metrics["tasks"]}
    assert [len(v) for v in right.values()] == [4, 4]
    assert metrics["summary"]["AA"] == pytest.approx(
        sum(100 * sum(v) / len(v) for v in right.values()) / 2)
    assert "category COPA has no instruction" in caplog.text
    assert "category Mine has no instruction" in caplog.text

    # --instructions: a YAML file adds an instruction, which the prompt then carries
    from nlora.runner import load_tasks

    path = tmp_path / "instructions.yaml"
    path.write_text("Mine: What colour is it? Choose one from the option.\n")
    plain = load_tasks(make_config(data_dir=str(data), tasks="Mine/toy"))[0]
    told = make_config(data_dir=str(data), tasks="Mine/toy", instructions=str(path))
    assert told.instructions == {"Mine": "What colour is it? Choose one from the option."}
    prompt = load_tasks(told)[0].test[0].prompt
    assert plain.test[0].prompt == "Task:Mine\nDataset:toy\nThe sky 0 looks\nAnswer:"
    assert prompt == ("Task:Mine\nDataset:toy\nWhat colour is it? Choose one from the "
                      "option.\nOption: red, blue \nThe sky 0 looks\nAnswer:")
    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data), "--tasks", "Mine/toy",
            "--instructions", str(path), "--out", str(tmp_path / "told"), *FAST]
    assert main(argv) == 0
    assert "What colour is it?" in (tmp_path / "told/config.yaml").read_text()


# --- zero-shot row, unseen-task curves, FWT and Fig. 4 from a CLI run -------------------------


def test_zero_shot_plan_by_hand(data_dir):
    from nlora.families import load_task
    from nlora.runner import zero_shot_plan

    config = make_config(data_dir=str(data_dir), tasks=TINY_TASKS, train_per_task=10,
                         test_per_task=5, epochs=2)
    tasks = [load_task(data_dir, n, 10, 5) for n in TINY_TASKS]
    # zero-shot 15 test rows; run: 3 x 2 epochs x 10 rows x 3 = 180, evaluation 5+10+15 = 30
    wanted, why = zero_shot_plan(config, tasks)
    assert wanted and "~7%" in why  # 15 / 210
    big = [load_task(data_dir, n, 10, 40) for n in TINY_TASKS]
    # full data: 120 / (180 + 40 + 80 + 120), about 29% > 25% (the shipped sample has fewer
    # test rows of some tasks: the same formula on its sizes)
    n = [len(t.test) for t in big]
    zero = sum(n)
    share = zero / (180 + n[0] + (n[0] + n[1]) + zero)
    assert share > 0.25
    assert zero_shot_plan(config, big) == (False, f"adds ~{share:.0%} to the run's estimated "
                                                  "work (default: at most 25%)")
    forced = make_config(data_dir=str(data_dir), tasks=TINY_TASKS, zero_shot=True)
    assert zero_shot_plan(forced, big)[0] is True


def test_a_cli_run_gives_zero_shot_unseen_curves_fwt_and_fig4(
    tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--tasks",
            ",".join(TINY_TASKS), "--out", str(run), "--eval-on", "all", *FAST,
            "--test-per-task", "3"]
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    zero = json.loads((run / "zero_shot/done.json").read_text())
    assert metrics["zero_shot"] == [zero["accuracy"][t] for t in TINY_TASKS]
    a = metrics["accuracy"]
    assert all(v is not None for row in a for v in row)  # --eval-on all: the full matrix
    assert metrics["unseen"] == {TINY_TASKS[1]: [a[1][0], None, None],
                                 TINY_TASKS[2]: [a[2][0], a[2][1], None]}
    from nlora.analysis import analyse_run
    from nlora.metrics import forward_transfer

    scores = analyse_run(run, progress=False)["scores"]
    assert scores["FWT"] == pytest.approx(forward_transfer(a, metrics["zero_shot"]))
    assert scores["FWT"] == pytest.approx(((a[1][0] - zero["accuracy"][TINY_TASKS[1]])
                                           + (a[2][1] - zero["accuracy"][TINY_TASKS[2]])) / 2)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report/unseen.png").is_file()
    md = (tmp_path / "report/report.md").read_text()
    assert "Unseen-task generalisation (Fig. 4)" in md

    # rerunning a finished run evaluates nothing again, the zero-shot row included
    from nlora import runner

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished run must not evaluate again")

    monkeypatch.setattr(runner, "evaluate_tasks", no_evaluation)
    assert main(argv) == 0
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_release_protocol_on_the_command_line_records_what_it_set(
    tiny_llama_dir, data_dir, tmp_path, caplog
):
    import yaml

    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--tasks",
            "yelp,CB", "--method", "olora", "--protocol", "release", "--out",
            str(tmp_path / "run"), "--train-per-task", "8", "--test-per-task", "4",
            "--max-source-length", "96", "--no-zero-shot"]
    with caplog.at_level("INFO", logger="nlora"):
        assert main(argv) == 0
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["protocol"] == "release"
    assert saved["preset_sources"]["olora_orth"].startswith("O-LoRA release")
    assert saved["task_seed"] == "same" and saved["batch_size"] == 64
    assert "protocol release: options not given were set as follows" in caplog.text
    assert "truncation = 'head'" in caplog.text
    assert "zero_shot" not in json.loads((tmp_path / "run/metrics.json").read_text())


def test_the_released_nlora_term_on_non_square_modules_fails_before_any_work(
    tiny_llama_dir, data_dir, tmp_path, capsys
):
    # tiny LLaMA's v_proj is 16 x 32 (grouped key-value heads), like SmolLM2's 192 x 576
    argv = ["run", "--model", str(tiny_llama_dir), "--data", str(data_dir), "--tasks",
            "CB", "--protocol", "release", "--out", str(tmp_path / "run"), *FAST]
    assert main(argv) == 2
    lines = [x.split("\r")[-1] for x in capsys.readouterr().err.strip().split("\n") if x.strip()]
    err = lines[-1]  # the error line; above it only model-loading progress bars
    assert all("it/s]" in x for x in lines[:-1]) and "Traceback" not in "".join(lines)
    assert err.startswith("nlora: error: ") and "v_proj is 16x32" in err
    assert "--target-modules" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder exists
    assert main([*argv[:-len(FAST)], "--target-modules", "q_proj", *FAST,
                 "--out", str(tmp_path / "q")]) == 0
