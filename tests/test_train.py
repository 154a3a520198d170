"""Training mechanics: global batches split over processes and micro-batches, the loss of a
global batch, gradient clipping, mixed precision, row-keyed dropout, divergence, truncation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.data import Example, build_prompt
from nlora.dropout import RowKeyedDropout, RowKeys
from nlora.errors import ConfigError
from nlora.families import load_task
from nlora.train import answer_tokens, global_batches, micro_batch_size, process_share


def test_every_process_count_sees_the_same_global_batches():
    lengths = [5 + (7 * i) % 40 for i in range(37)]
    for group in (True, False):
        batches = global_batches(lengths, 8, seed=4, epoch=1, group_by_length=group)
        assert sorted(i for b in batches for i in b) == list(range(37))
        assert all(len(b) == 8 for b in batches[:-1] if group is False)
        for world, accum in ((1, 1), (1, 4), (2, 1), (2, 2), (4, 2)):
            micro = micro_batch_size(8, accum, world)
            for batch in batches:
                parts = [process_share(batch, r, world, micro) for r in range(world)]
                assert all(len(p) <= accum and all(len(m) <= micro for m in p) for p in parts)
                # together the processes cover the global batch exactly once
                assert sorted(i for p in parts for m in p for i in m) == sorted(batch)


def test_a_global_batch_that_does_not_split_is_one_line():
    with pytest.raises(ConfigError, match=r"--batch-size 6 .* --grad-accum 2 x 2 processes"):
        micro_batch_size(6, 2, 2)


def _features(tokenizer, data_dir, n=8):
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    task = load_task(data_dir, "SC/yelp", train_per_task=n, test_per_task=4, seed=1)
    return encoder, [encoder.train_features(ex) for ex in task.train]


def test_token_weighted_micro_batches_give_the_loss_of_the_whole_batch(tokenizer, data_dir):
    """The weighting train_task uses: Σ_micro (tokens_micro / tokens_batch) · mean loss_micro
    equals the model's own mean loss over the whole batch (Hugging Face's loss, unsplit)."""
    encoder, features = _features(tokenizer, data_dir)
    model = tiny_llama(tokenizer).double()
    whole = model(**encoder.collate_train(features)).loss
    total = sum(answer_tokens(f, False) for f in features)
    for micro in ([0, 1, 2], [3], [4, 5, 6, 7]), ([0], [1, 2, 3, 4, 5, 6, 7]):
        split = sum(
            model(**encoder.collate_train([features[i] for i in rows])).loss
            * sum(answer_tokens(features[i], False) for i in rows) / total
            for rows in micro
        )
        torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)  # HF computes in fp32
    # answer tokens: label + EOS of each row, as the labels say
    assert total == sum(sum(1 for t in f["labels"] if t != -100) for f in features)


def _train(tokenizer, data_dir, monkeypatch=None, **kwargs):
    from accelerate import Accelerator

    from nlora.methods.nlora import NLoRA
    from nlora.train import train_task

    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    task = load_task(data_dir, "SC/yelp", train_per_task=16, test_per_task=4, seed=1)
    config = RunConfig(lora_r=4, lora_dropout=0.1, l1_lambda=1e-3)
    method = NLoRA(config, is_seq2seq=False)
    torch.manual_seed(0)
    model = method.begin_task(tiny_llama(tokenizer), 0, task)
    options = {"grad_accum": 1, "max_grad_norm": None, **kwargs}
    model, result = train_task(model, method, 0, task.train, encoder, Accelerator(cpu=True),
                               5e-3, 1, 8, 0.0, seed=3, **options)
    lora = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    return lora, result


def test_grad_accum_changes_nothing_but_memory(tokenizer, data_dir):
    """Same global batch of 8 as one forward or four micro-batches of 2: same losses and
    adapter (LoRA dropout on: its masks follow the rows, not the micro-batches)."""
    one, r1 = _train(tokenizer, data_dir, grad_accum=1)
    four, r4 = _train(tokenizer, data_dir, grad_accum=4)
    assert r1.steps == r4.steps == 2  # 16 rows, global batch 8
    assert r4.first_loss == pytest.approx(r1.first_loss, rel=1e-6)
    assert r4.last_loss == pytest.approx(r1.last_loss, rel=1e-6)
    for k in one:
        torch.testing.assert_close(four[k], one[k], rtol=1e-5, atol=1e-6)


def test_gradients_are_clipped_before_each_step(tokenizer, data_dir, monkeypatch):
    norms = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    _train(tokenizer, data_dir, max_grad_norm=None)
    free = list(norms)
    norms.clear()
    _train(tokenizer, data_dir, max_grad_norm=1e-3)
    assert max(free) > 1e-2  # unclipped gradients are larger than the bound...
    assert all(n <= 1e-3 * (1 + 1e-4) for n in norms)  # ...and clipped ones are within it


def test_bf16_trains_under_autocast_on_cpu(tokenizer, data_dir):
    from accelerate import Accelerator

    from nlora.methods.nlora import NLoRA
    from nlora.train import train_task

    accelerator = Accelerator(cpu=True)
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    task = load_task(data_dir, "SC/yelp", train_per_task=8, test_per_task=4, seed=1)
    method = NLoRA(RunConfig(lora_r=4), is_seq2seq=False)
    model = method.begin_task(tiny_llama(tokenizer), 0, task)
    dtypes = set()
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    hook = layer.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    try:
        model, result = train_task(model, method, 0, task.train, encoder, accelerator, 5e-3, 1,
                                   4, 0.0, seed=0, precision="bf16")
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16}  # matmuls ran in bf16...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ...weights stay fp32
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.last_loss))


def test_row_keyed_dropout_follows_the_row_not_the_batch():
    rows = RowKeys(length=12)
    drop = RowKeyedDropout(0.25, ordinal=3, rows=rows).train()
    x = torch.ones(3, 12, 64)
    rows.keys = [11, 22, 33]
    full = drop(x)
    rows.keys = [22]
    alone = drop(torch.ones(1, 7, 64))  # shorter padding, other neighbours
    torch.testing.assert_close(alone[0], full[1, :7])
    kept = (full != 0).float().mean()
    assert abs(float(kept) - 0.75) < 0.03  # keep probability 1 - p
    scaled = float(torch.tensor(1 / 0.75))  # inverted dropout: kept values scaled by 1/(1-p)
    assert set(full.unique().tolist()) <= {0.0, scaled}
    rows.keys = [11, 22, 33]
    assert not torch.equal(drop(x)[0], drop(x)[1])  # rows differ
    assert torch.equal(drop.eval()(x), x)


def test_row_keyed_dropout_refuses_rows_it_was_not_told_about():
    """No silent plain dropout (whose masks would depend on the process count): a training
    forward without announced rows, or with another number of rows, is an error."""
    rows = RowKeys(length=12)
    drop = RowKeyedDropout(0.25, ordinal=3, rows=rows).train()
    with pytest.raises(RuntimeError, match=r"dropout #3 got a batch of shape \(2, 5, 8\) but "
                       r"the training loop announced no rows"):
        drop(torch.ones(2, 5, 8))
    rows.keys = [1, 2, 3]
    with pytest.raises(RuntimeError, match="announced 3 rows"):
        drop(torch.ones(2, 5, 8))


def test_lambda_that_explodes_stops_the_task_naming_lambda_and_lr(
    tiny_llama_dir, data_dir, tmp_path, capsys
):
    from nlora.cli import main

    out = tmp_path / "run"
    code = main(["run", "--model", str(tiny_llama_dir), "--data", str(data_dir),
                 "--tasks", "SC/yelp,TC/agnews", "--train-per-task", "8", "--test-per-task",
                 "4", "--epochs", "2", "--batch-size", "4", "--lr", "5e-3",
                 "--l1-lambda", "1e-4,1e6", "--max-source-length", "64", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("nlora: error: task 2/2 agnews diverged")
    assert "--l1-lambda 1e+06" in err[-1] and "--lr 0.005" in err[-1]
    # task 1 stays finished; nothing written holds a NaN
    assert (out / "tasks/01-yelp/done.json").is_file()
    assert not (out / "tasks/02-agnews/done.json").exists()
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    for path in out.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)
    assert "diverged" in (out / "run.log").read_text()


MULTIRC_LABELS = ["False", "True"]


def _long_row(words: int) -> str:
    passage = " ".join(f"passage{i % 50} word" for i in range(words))
    return f"question: who wrote the letter? answer: the captain. paragraph: {passage} END"


@pytest.mark.parametrize("mode", ["text", "head", "tail"])
def test_truncation_of_a_multirc_length_row(tokenizer, mode):
    sentence = _long_row(1500)  # thousands of tokens, as a long MultiRC passage
    prompt = build_prompt("MultiRC", "multirc", MULTIRC_LABELS, sentence)
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=256, truncation=mode)
    ids = encoder.example_ids(Example(sentence, "True", prompt))
    assert len(ids) == 256
    text = tokenizer.decode(ids)
    header = prompt[: prompt.index(sentence)]
    if mode == "text":  # the header, instruction, options, the question and Answer: survive
        assert text.startswith(header + "question: who wrote the letter? answer: the captain.")
        assert text.endswith("END\nAnswer:")
    elif mode == "head":  # the released code's cut: the end (and Answer:) is lost
        assert text.startswith(header) and not text.endswith("Answer:")
    else:  # tail: the header and instruction are lost
        assert text.endswith("END\nAnswer:") and "Task:MultiRC" not in text
    # a prompt that fits is the plain tokenization in every mode
    short = build_prompt("MultiRC", "multirc", MULTIRC_LABELS, _long_row(5))
    assert encoder.prompt_ids(short, _long_row(5)) == tokenizer(short)["input_ids"]


# --- the loss of a step: label-token weighting, the releases' part means, the fast path -------

def _uneven(n: int = 8) -> list[Example]:
    """Rows whose answers differ in length (1 to n words), so micro-batches differ in tokens."""
    labels = [" ".join(["word"] * (i + 1)) for i in range(n)]
    return [Example(f"text {i}", labels[i], build_prompt("SC", "toy", labels, f"text {i}"))
            for i in range(n)]


def _train_rows(tokenizer, examples, config, model=None, **options):
    from accelerate import Accelerator

    from nlora.methods.nlora import NLoRA
    from nlora.train import train_task

    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    method = NLoRA(config, is_seq2seq=False)
    torch.manual_seed(0)
    model = method.begin_task(model if model is not None else tiny_llama(tokenizer), 0, None)
    options = {"grad_accum": 1, "max_grad_norm": None, "group_by_length": False, **options}
    epochs = options.pop("epochs", 1)
    model, result = train_task(model, method, 0, examples, encoder, Accelerator(cpu=True),
                               1e-2, epochs, len(examples), 0.0, seed=3, **options)
    return method, model, result, encoder


def test_auto_lambda_does_not_depend_on_the_micro_batches(tokenizer):
    """λ auto is calibrated on the training loss itself (label-token weighted over the global
    batch): one forward of 8 rows or two of 4 choose the same λ, though the two halves carry
    different numbers of answer tokens."""
    config = RunConfig(lora_r=4, lora_dropout=0.1, l1_lambda="auto", l1_auto_steps=2,
                       tasks=["a"])
    chosen = []
    for accum in (1, 2):
        method, _, _, _ = _train_rows(tokenizer, _uneven(), config, grad_accum=accum, epochs=3)
        chosen.append(method.task_info(0)["l1_lambda"])
    assert chosen[0] > 0
    assert chosen[1] == pytest.approx(chosen[0], rel=1e-5)


def test_loss_parts_is_the_mean_of_the_parts_mean_losses(tokenizer):
    """--loss-parts 2: the first step's loss is the mean of the model's own mean loss on each
    half (rows 0, 2, 4, ... and 1, 3, 5, ... of the global batch), on any micro-batching; the
    default weighs every answer token alike (the model's loss on the whole batch)."""
    from nlora.train import global_batches

    examples = _uneven()
    config = RunConfig(lora_r=4, lora_dropout=0.0, tasks=["a"], l1_lambda=0.0)
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    features = [encoder.train_features(ex) for ex in examples]
    order = global_batches([len(f["input_ids"]) for f in features], 8, 3, 0, False)[0]
    model = tiny_llama(tokenizer).eval()
    with torch.no_grad():  # B = 0 at the start: the adapter changes nothing yet
        halves = [float(model(**encoder.collate_train([features[i] for i in order[k::2]])).loss)
                  for k in (0, 1)]
        whole = float(model(**encoder.collate_train(features)).loss)
    assert abs(halves[0] - halves[1]) > 1e-3  # the two means differ: the weighting matters
    for accum in (1, 2, 4):
        _, _, parted, _ = _train_rows(tokenizer, examples, config, tiny_llama(tokenizer),
                                      grad_accum=accum, loss_parts=2)
        assert parted.first_loss == pytest.approx(sum(halves) / 2, rel=1e-5)
    _, _, plain, _ = _train_rows(tokenizer, examples, config, tiny_llama(tokenizer))
    assert plain.first_loss == pytest.approx(whole, rel=1e-5)
    assert abs(plain.first_loss - parted.first_loss) > 1e-4


def test_zero_lr_steps_leave_the_weights_but_feed_adams_moments(tokenizer, monkeypatch):
    """--zero-lr-steps 2 (the releases' DeepSpeed WarmupLR): steps 1-2 at lr 0 move nothing,
    yet AdamW's moments take their gradients, so step 3 differs from a fresh first step."""
    snapshots = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        params = [p for g in self.param_groups for p in g["params"]]
        snapshots.append(([p.detach().clone() for p in params],
                          [self.state[p]["exp_avg"].clone() for p in params],
                          self.param_groups[0]["lr"]))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    config = RunConfig(lora_r=4, lora_dropout=0.0, tasks=["a"], l1_lambda=0.0)
    logged = []
    _, model, _, _ = _train_rows(tokenizer, _uneven(), config, epochs=3, zero_lr_steps=2,
                                 on_step=lambda r: logged.append(r.learning_rate))
    assert logged == [0.0, 0.0, 1e-2] and [s[2] for s in snapshots] == logged
    initial = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for params, moments, _ in snapshots[:2]:
        assert all(p.equal(q) for p, q in zip(params, snapshots[0][0], strict=True))
        assert any(float(m.abs().sum()) > 0 for m in moments)  # gradients were taken
    assert any(not p.equal(q) for p, q in zip(snapshots[2][0], snapshots[0][0], strict=True))
    assert all(p.equal(q) for p, q in zip(initial, snapshots[2][0], strict=True))
    # the same third batch without the two lr-0 steps before it moves the weights otherwise
    snapshots.clear()
    _train_rows(tokenizer, _uneven(), config, epochs=1)
    first_fresh = snapshots[0][0]
    assert any(not p.equal(q) for p, q in zip(first_fresh, initial, strict=True))


def _tiny_granite(tokenizer, logits_scaling: float):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, logits_scaling=logits_scaling,
    )
    return GraniteForCausalLM(config)


def test_a_model_with_an_unknown_output_transform_trains_on_its_own_loss(tokenizer, caplog):
    """Granite divides its logits by logits_scaling, which the LM-head-at-answers path does not
    know: the first batch shows the two losses differ, the task trains on the plain forward
    (its first loss is the model's own), and one line names the model and both losses."""
    examples = _uneven()
    config = RunConfig(lora_r=4, lora_dropout=0.0, tasks=["a"], l1_lambda=0.0,
                       target_modules=["q_proj", "v_proj"])
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    batch = encoder.collate_train([encoder.train_features(ex) for ex in examples])
    model = _tiny_granite(tokenizer, 0.05)
    with torch.no_grad():
        own = float(model.eval()(**batch).loss)
    with caplog.at_level("WARNING", logger="nlora"):
        _, _, result, _ = _train_rows(tokenizer, examples, config, model)
    assert result.first_loss == pytest.approx(own, rel=1e-5)
    lines = [r.getMessage() for r in caplog.records if "differs from the model's own" in
             r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("GraniteForCausalLM: ")
    # a model without a transform keeps the fast path, silently, with the same first loss
    caplog.clear()
    plain = _tiny_granite(tokenizer, 1.0)
    with torch.no_grad():
        own = float(plain.eval()(**batch).loss)
    with caplog.at_level("WARNING", logger="nlora"):
        _, _, result, _ = _train_rows(tokenizer, examples, config, plain)
    assert result.first_loss == pytest.approx(own, rel=1e-5)
    assert not [r for r in caplog.records if "differs" in r.getMessage()]
