"""Every method end to end, and each method's defining property checked independently."""

from __future__ import annotations

import json
import string

import pytest
import torch
from conftest import TINY_TASKS, tiny_llama, tiny_t5
from safetensors.torch import load_file

from nlora.cli import main
from nlora.methods import METHODS

TINY = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size", "4",
        "--lr", "5e-3", "--max-source-length", "64", "--seed", "3"]


def _run(model_dir, data_dir, out, *extra):
    return main(["run", "--model", str(model_dir), "--data", str(data_dir),
                 "--tasks", ",".join(TINY_TASKS), "--out", str(out), *TINY, *extra])


def _release_normalise(text: str) -> str:
    """The released code's answer normaliser (src/compute_metrics.py, SQuAD's without article
    removal), written here from that code: lower-case, drop punctuation, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(text.split())


def _released_verdict(generated: str, label: str, causal: bool) -> bool:
    if causal and "Answer:" in generated:  # skip_instructions: the text after the last one
        generated = generated.split("Answer:")[-1]
    return _release_normalise(generated) == _release_normalise(label)


def _by_hand(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """AA (eq. 5), F.Ra (Chaudhry et al.) and BWT of an accuracy matrix, written out here."""
    t = len(matrix)
    last = [matrix[i][-1] for i in range(t)]
    if len(matrix[0]) == 1:  # one joint step
        return {"AA": sum(last) / t, "F.Ra": None, "BWT": None}
    fra = sum(max(matrix[i][k] for k in range(i, t - 1)) - matrix[i][t - 1]
              for i in range(t - 1)) / (t - 1)
    bwt = sum(matrix[i][t - 1] - matrix[i][i] for i in range(t - 1)) / (t - 1)
    return {"AA": sum(last) / t, "F.Ra": fra, "BWT": bwt}


def _check_recorded_scores(run, method: str, causal: bool) -> None:
    """Every recorded accuracy is the share of its recorded answers that the released code's
    scorer calls right, and the summary is that matrix's AA / F.Ra / BWT computed by hand."""
    from nlora.config import RunConfig
    from nlora.runner import load_tasks

    metrics = json.loads((run / "metrics.json").read_text())
    tests = {t.name: t.test for t in load_tasks(RunConfig.from_yaml(run / "config.yaml"))}
    steps = sorted((run / "tasks").iterdir())
    assert len(steps) == (1 if method == "mtl" else 3)
    matrix = [[None] * len(steps) for _ in TINY_TASKS]
    for j, step in enumerate(steps):
        done = json.loads((step / "done.json").read_text())
        rows = [json.loads(line) for line in (step / "predictions.jsonl").read_text().splitlines()]
        for r in rows:  # each row's label is that test row's, as the data has it
            assert r["label"] == tests[r["task"]][r["index"]].label
        seen = TINY_TASKS if method == "mtl" else TINY_TASKS[: j + 1]
        for i, task in enumerate(TINY_TASKS):
            verdicts = [_released_verdict(r["prediction"], r["label"], causal)
                        for r in rows if r["task"] == task]
            if task not in seen:
                assert not verdicts
                continue
            assert [r["correct"] for r in rows if r["task"] == task] == verdicts
            assert len(verdicts) == 4  # --test-per-task 4
            matrix[i][j] = 100.0 * sum(verdicts) / 4
            assert done["accuracy"][task] == pytest.approx(matrix[i][j])
    for got, want in zip(metrics["accuracy"], matrix, strict=True):
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want
                                                                   if w is not None])
    for key, value in _by_hand(matrix).items():
        assert metrics["summary"][key] == (None if value is None else pytest.approx(value))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_records_what_its_answers_score_llama(method, tiny_llama_dir, data_dir,
                                                           tmp_path):
    extra = ["--olora-lambda2", "0.1"] if method.startswith("olora") else []
    assert _run(tiny_llama_dir, data_dir, tmp_path / "run", "--method", method, *extra) == 0
    _check_recorded_scores(tmp_path / "run", method, causal=True)
    if method in ("seqft", "replay", "ewc", "lwf"):  # only the latest task keeps full weights
        kept = sorted(p.parent.name for p in (tmp_path / "run/tasks").glob("*/model.safetensors"))
        assert kept == ["03-CB"]


@pytest.mark.slow  # the same on T5 (seq2seq): end to end, make test-fast skips it
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_records_what_its_answers_score_t5(method, tiny_t5_dir, data_dir,
                                                        tmp_path):
    extra = ["--olora-lambda2", "0.1"] if method.startswith("olora") else []
    assert _run(tiny_t5_dir, data_dir, tmp_path / "run", "--method", method, *extra) == 0
    _check_recorded_scores(tmp_path / "run", method, causal=False)


@pytest.mark.slow  # end to end: make test-fast skips it
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_resumes_to_the_same_result(method, tiny_llama_dir, data_dir, tmp_path,
                                                 interrupt_training):
    assert _run(tiny_llama_dir, data_dir, tmp_path / "whole", "--method", method) == 0
    interrupt_training(0 if method == "mtl" else 2)  # mtl has a single step: cut it
    assert _run(tiny_llama_dir, data_dir, tmp_path / "cut", "--method", method) == 130
    interrupt_training(None)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "cut", "--method", method) == 0
    whole = json.loads((tmp_path / "whole/metrics.json").read_text())
    assert json.loads((tmp_path / "cut/metrics.json").read_text()) == whole
    for path in (tmp_path / "whole/tasks").rglob("*.safetensors"):
        a, b = load_file(path), load_file(tmp_path / "cut" / path.relative_to(tmp_path / "whole"))
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), path


# --- defining properties --------------------------------------------------------------------

def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _lora_params(model, part: str) -> dict[str, torch.Tensor]:
    """module name -> the active adapter's lora_A / lora_B weight, from named_parameters."""
    suffix = f".{part}.default.weight"
    return {n.removesuffix(suffix): p for n, p in model.named_parameters() if n.endswith(suffix)}


@pytest.mark.parametrize("forms", [("fro", "squared"), ("abs", "norm")])
def test_olora_penalty_is_the_brute_force_sum_over_task_pairs_and_modules(
    tokenizer, tmp_path, forms
):
    from nlora.config import RunConfig
    from nlora.methods.olora import OLoRA

    orth, l2_form = forms
    # per-task weights (the released long script varies them): task 3 uses 0.7 and 0.3
    config = RunConfig(lora_r=4, olora_lambda1=[0.0, 5.0, 0.7], olora_lambda2=[0.1, 0.0, 0.3],
                       olora_orth=orth, olora_l2=l2_form, tasks=["a", "b", "c"])
    method = OLoRA(config, is_seq2seq=False)
    model = tiny_llama(tokenizer)
    saved_A = []  # per earlier task: module -> its lora_A weight (PEFT's r x in)
    for t in range(3):
        model = method.begin_task(model, t, None)
        _randomise_lora(model, seed=t)
        if t < 2:
            saved_A.append({k: v.clone() for k, v in _lora_params(model, "lora_A").items()})
            model = method.end_task(model, t, None, tmp_path / f"t{t}")
    current_A, current_B = _lora_params(model, "lora_A"), _lora_params(model, "lora_B")
    assert len(current_A) == 4  # q and v in 2 layers
    ortho = 0
    for earlier in saved_A:
        for m in current_A:
            A_i, A_t = earlier[m].T, current_A[m].T  # the paper's d x r orientation
            product = A_i.T @ A_t
            ortho = ortho + (torch.linalg.matrix_norm(product, "fro") ** 2 if orth == "fro"
                             else product.abs().sum())
    factors = [*current_A.values(), *current_B.values()]
    l2 = sum((p**2).sum() if l2_form == "squared" else torch.linalg.matrix_norm(p, "fro")
             for p in factors)
    torch.testing.assert_close(method.penalty(model, 2, None, None), 0.7 * ortho + 0.3 * l2)
    # the earlier A factors come back from the saved adapters on resume
    resumed = OLoRA(config, is_seq2seq=False)
    base = tiny_llama(tokenizer)
    for t in range(2):
        base = resumed.restore_task(base, t, None, tmp_path / f"t{t}")
    for m in resumed.previous_A:
        for a, b in zip(resumed.previous_A[m], method.previous_A[m], strict=True):
            assert a.equal(b)


def _train_three(method, model_dir, data_dir, tmp_path, steps=3):
    """The runner's loop by hand, returning the model after each task."""
    from accelerate import Accelerator

    from nlora.batching import Encoder
    from nlora.families import load_task
    from nlora.model import load_backbone
    from nlora.train import train_task

    backbone = load_backbone(str(model_dir))
    encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, 64)
    method.encoder = encoder
    tasks = [load_task(data_dir, n, 8, 4, seed=0) for n in TINY_TASKS]
    model, seen = backbone.model, []
    for j in range(steps):
        torch.manual_seed(j)
        model = method.begin_task(model, j, tasks[j])
        seen.append([p for p in model.parameters() if p.requires_grad])
        model, _ = train_task(model, method, j, method.train_examples(j, tasks), encoder,
                              Accelerator(cpu=True), 1e-2, 1, 4, 0.0, seed=j)
        model = method.end_task(model, j, tasks[j], tmp_path / f"t{j}")
    return model, seen, tasks, encoder


def test_seqlora_trains_one_and_the_same_adapter(tiny_llama_dir, data_dir, tmp_path):
    from nlora.config import RunConfig
    from nlora.methods.seqlora import SeqLoRA

    base = {k: v.clone() for k, v in
            load_file(tiny_llama_dir / "model.safetensors").items()}
    model, trained, _, _ = _train_three(SeqLoRA(RunConfig(lora_r=4), False), tiny_llama_dir,
                                        data_dir, tmp_path)
    # the very same parameter objects are trained at every task
    assert [id(p) for p in trained[0]] == [id(p) for p in trained[1]] == [id(p) for p in trained[2]]
    states = [load_file(tmp_path / f"t{j}/adapter/adapter_model.safetensors") for j in range(3)]
    assert states[0].keys() == states[2].keys()
    assert any(not states[0][k].equal(states[2][k]) for k in states[0])
    # the base weights never move
    for name, param in model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            if key in base:
                assert param.equal(base[key]), key


def test_inclora_merges_each_fresh_adapter_and_adds_no_penalty(tiny_llama_dir, data_dir,
                                                                tmp_path):
    """IncLoRA: no penalty term at all, and the model after task 3 is the base plus the three
    saved adapters' ΔW (each read from its safetensors file, summed here)."""
    from nlora.config import RunConfig
    from nlora.load import load_model
    from nlora.methods.inclora import IncLoRA
    from nlora.param_metrics import LoraUpdate

    method = IncLoRA(RunConfig(lora_r=4, l1_lambda=0.5, tasks=["a"]), is_seq2seq=False)
    model = method.begin_task(tiny_llama(tokenizer=load_backbone_tokenizer(tiny_llama_dir)), 0,
                              None)
    assert method.penalty(model, 0, None, None) is None  # even with --l1-lambda given
    out = tmp_path / "inc"
    assert _run(tiny_llama_dir, data_dir, out, "--method", "inclora") == 0
    base = load_file(tiny_llama_dir / "model.safetensors")
    expected = {k: v.clone() for k, v in base.items()}
    for folder in ("01-yelp", "02-agnews", "03-CB"):
        saved = load_file(out / "tasks" / folder / "adapter/adapter_model.safetensors")
        for key in saved:
            if ".lora_A." in key:
                module = key.split("base_model.model.")[1].split(".lora_A.")[0]
                delta = LoraUpdate(A=saved[key], B=saved[key.replace("lora_A", "lora_B")],
                                   scaling=32.0 / 8).delta()
                expected[f"{module}.weight"] += delta
    state = load_model(out, task=3).model.state_dict()
    changed = [k for k in expected if not expected[k].equal(base[k])]
    assert len(changed) == 4  # q_proj and v_proj of 2 layers
    for key in changed:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-6)


def load_backbone_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_pertaskft_answers_task_i_with_adapter_i(tiny_llama_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nlora.batching import Encoder
    from nlora.evaluate import generate_answers
    from nlora.families import load_task
    from nlora.model import load_backbone

    out = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, out, "--method", "pertaskft", "--lr", "5e-2") == 0
    predictions = (out / "tasks/03-CB/predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in predictions]
    tokenizer = load_backbone(str(tiny_llama_dir)).tokenizer
    encoder = Encoder(tokenizer, False, 64)
    for i, name in enumerate(TINY_TASKS):
        task = load_task(data_dir, name, 8, 4, seed=3)
        # adapter i on a fresh base model, with plain PEFT
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "tasks" /
            f"{i + 1:02d}-{name.split('/')[1]}" / "adapter" / f"task{i}")
        expected = [p.prediction for p in generate_answers(plain, encoder, task.test, task.labels)]
        assert [r["prediction"] for r in rows if r["task"] == name] == expected
    # and on logits: the restored method's model for task i is base + adapter i, not another
    from nlora.config import RunConfig
    from nlora.methods.pertaskft import PerTaskFT

    method, model = PerTaskFT(RunConfig(), False), AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir)
    folders = sorted((out / "tasks").iterdir())
    for i, folder in enumerate(folders):
        model = method.restore_task(model, i, None, folder)
    ids = torch.randint(4, 100, (2, 7))
    with torch.no_grad():
        plain = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                           f / "adapter" / f"task{i}")(input_ids=ids).logits
                 for i, f in enumerate(folders)]
        for i in range(3):
            logits = method.eval_model(model, i)(input_ids=ids).logits
            assert [torch.allclose(logits, p) for p in plain] == [k == i for k in range(3)]
    # the report reads each task's own named adapter (adapter/taskN) as its update
    from nlora.adapters import read_lora_updates
    from nlora.rundir import load_task_updates

    updates = load_task_updates(out)
    assert len(updates) == 3
    key = sorted(updates[0])[0]
    A_read = [u[key].A for u in updates]
    assert not torch.equal(A_read[0], A_read[1])  # three different adapters
    A_saved = [read_lora_updates(f / "adapter" / f"task{i}")[key].A
               for i, f in enumerate(folders)]
    assert all(torch.equal(a, b) for a, b in zip(A_read, A_saved, strict=True))


def test_replay_buffer_holds_the_configured_share_of_each_earlier_task(data_dir):
    from nlora.config import RunConfig
    from nlora.families import load_task
    from nlora.methods.replay import Replay

    tasks = [load_task(data_dir, n, 40, 2, seed=0) for n in TINY_TASKS]
    method = Replay(RunConfig(replay_fraction=0.1, seed=5), False)
    at_1, at_2 = method.train_examples(1, tasks), method.train_examples(2, tasks)
    assert at_2[:40] == tasks[2].train
    buffer = at_2[40:]
    assert len(buffer) == 8  # 4 (= 0.1 · 40) per earlier task
    assert sum(ex in tasks[0].train for ex in buffer[:4]) == 4
    assert sum(ex in tasks[1].train for ex in buffer[4:]) == 4
    assert at_1[40:] == buffer[:4]  # a task's buffer is the same at every later task
    assert method.train_examples(0, tasks) == tasks[0].train


def test_ewc_penalty_is_zero_at_the_anchor_and_its_fisher_is_non_negative(
    tiny_llama_dir, data_dir, tmp_path
):
    from nlora.config import RunConfig
    from nlora.methods.ewc import EWC

    method = EWC(RunConfig(ewc_lambda=10.0, batch_size=4), False)
    model, _, tasks, _ = _train_three(method, tiny_llama_dir, data_dir, tmp_path, steps=1)
    assert method.fisher and all((f >= 0).all() for f in method.fisher.values())
    assert any((f > 0).any() for f in method.fisher.values())
    model.requires_grad_(True)
    assert float(method.penalty(model, 1, None, None).detach()) == 0.0
    # moved weights: (λ/2) Σ F (θ - θ*)², computed by hand
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.add_(0.5)
    expected = 10.0 / 2 * (method.fisher[name] * 0.25).sum()
    torch.testing.assert_close(method.penalty(model, 1, None, None), expected)


def test_lwf_loss_is_zero_for_the_same_model_and_positive_otherwise(tokenizer):
    from nlora.config import RunConfig
    from nlora.loss import answer_head_forward
    from nlora.methods.lwf import LwF, distillation_loss

    for model, seq2seq in ((tiny_llama(tokenizer), False), (tiny_t5(tokenizer), True)):
        method = LwF(RunConfig(lwf_alpha=2.0, lwf_temperature=3.0), seq2seq)
        model = method.begin_task(model, 1, None)
        model.eval()
        ids = torch.randint(4, 100, (2, 9))
        labels = torch.full((2, 9 if not seq2seq else 3), -100)
        labels[:, -3:] = ids[:, -3:]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        outputs = model(**batch)
        # same logits: exactly zero; same model in a second forward pass: zero up to rounding
        assert float(distillation_loss(outputs.logits, outputs.logits, labels, 3.0, seq2seq)) == 0
        assert float(method.penalty(model, 1, batch, outputs)) == pytest.approx(0, abs=1e-5)
        if not seq2seq:  # the training loop's head-at-answers outputs take the same path
            fast = answer_head_forward(model, batch)
            assert float(method.penalty(model, 1, batch, fast)) == pytest.approx(0, abs=1e-5)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(2)
        assert float(method.penalty(model, 1, batch, model(**batch))) > 0
        if not seq2seq:
            assert float(method.penalty(model, 1, batch, answer_head_forward(model, batch))) > 0


def test_mtl_trains_once_on_every_tasks_data(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    from nlora import runner

    seen = []
    real_train = runner.train_task

    def spy(model, method, index, examples, *args, **kwargs):
        seen.append(list(examples))
        return real_train(model, method, index, examples, *args, **kwargs)

    monkeypatch.setattr(runner, "train_task", spy)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "run", "--method", "mtl") == 0
    tasks = runner.load_tasks(runner.RunConfig.from_yaml(tmp_path / "run/config.yaml"))
    assert len(seen) == 1
    assert sorted(map(repr, seen[0])) == sorted(repr(ex) for t in tasks for ex in t.train)


@pytest.mark.parametrize("l1_on", ["deltaw", "a", "b", "a+b", "reference"])
def test_each_l1_placement_equals_its_formula(l1_on, tokenizer):
    from nlora.config import RunConfig
    from nlora.methods.nlora import NLoRA

    config = RunConfig(lora_r=4, lora_alpha=8.0, l1_on=l1_on, l1_lambda=0.5)
    method = NLoRA(config, is_seq2seq=True)
    model = method.begin_task(tiny_t5(tokenizer), 0, None)  # T5 q and v: 32 x 32
    _randomise_lora(model, seed=1)
    A, B = _lora_params(model, "lora_A"), _lora_params(model, "lora_B")
    formula = {
        "deltaw": lambda a, b: (2.0 * b @ a).abs().sum(),  # scaling = 8 / 4
        "a": lambda a, b: a.abs().sum(),
        "b": lambda a, b: b.abs().sum(),
        "a+b": lambda a, b: a.abs().sum() + b.abs().sum(),
        "reference": lambda a, b: (a @ b).abs().sum(),  # r x r, no scaling
    }[l1_on]
    expected = 0.5 * sum(formula(A[m], B[m]) for m in A)
    torch.testing.assert_close(method.penalty(model, 0, None, None), expected)


def test_reference_placement_refuses_non_square_modules(tokenizer):
    from nlora.config import RunConfig
    from nlora.errors import ConfigError
    from nlora.methods.nlora import NLoRA

    method = NLoRA(RunConfig(lora_r=4, l1_on="reference"), is_seq2seq=False)
    with pytest.raises(ConfigError, match=r"v_proj is 16x32"):
        method.begin_task(tiny_llama(tokenizer), 0, None)  # v_proj: 2 kv heads of 8 = 16 x 32
