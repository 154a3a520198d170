"""Speed-ups that must not change results: LM head at answers, length-grouped batches,
sorted/batched generation, and the rank evaluation mode."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import REPO, TINY_TASKS, tiny_llama, tiny_t5
from test_nlora_method import _randomise_lora

from nlora.adapters import add_adapter
from nlora.batching import Encoder, LengthGroupedBatchSampler
from nlora.cli import main
from nlora.config import RunConfig
from nlora.evaluate import generate_answers, rank_answers
from nlora.families import load_task
from nlora.loss import answer_head_forward


def _examples(data_dir, n=10):
    return load_task(data_dir, "SC/yelp", train_per_task=n, test_per_task=n, seed=1)


def test_head_at_answers_gives_the_same_loss_and_gradients(tokenizer, data_dir):
    model = tiny_llama(tokenizer).double()
    peft = add_adapter(model, RunConfig(lora_r=4, lora_dropout=0.0), is_seq2seq=False)
    _randomise_lora(peft)
    peft.double()
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    task = _examples(data_dir, 6)
    batch = encoder.collate_train([encoder.train_features(ex) for ex in task.train])
    params = [p for p in peft.parameters() if p.requires_grad]
    ref = peft(**batch)
    ours = answer_head_forward(peft, batch)
    # transformers computes its loss from float32 logits even in a float64 model (its own
    # order of summation: equal to float32 rounding); the float64 cross-entropy of the
    # model's own logits at the answer positions is the exact value
    targets = batch["labels"][:, 1:]
    answers = targets != -100
    exact = F.cross_entropy(ref.logits[:, :-1][answers], targets[answers])
    assert ours.loss.dtype == torch.float64 and ref.loss.dtype == torch.float32
    torch.testing.assert_close(ours.loss, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.loss.float(), ref.loss, rtol=2e-7, atol=0.0)
    # the logits it returns are the full logits at the answer positions
    torch.testing.assert_close(ours.answer_logits, ref.logits[:, :-1][ours.answer_mask])
    for g, r in zip(torch.autograd.grad(ours.loss, params), torch.autograd.grad(exact, params),
                    strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 400, (1000,), generator=gen).tolist()
    sampler = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 125
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert first != second  # each epoch reshuffles
    assert LengthGroupedBatchSampler(lengths, 8, seed=3).batches(0) == first  # seeded

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    perm = torch.randperm(1000, generator=gen).tolist()
    random_batches = [perm[i : i + 8] for i in range(0, 1000, 8)]
    assert padded(first) < 0.7 * padded(random_batches)


def test_grouped_loader_works_through_accelerate(tokenizer, data_dir):
    import sys

    from accelerate import Accelerator

    sys.path.insert(0, str(REPO / "bench"))  # the benches' loader of train_task's batches
    from common import make_train_loader

    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=64)
    features = [encoder.train_features(ex) for ex in _examples(data_dir, 10).train]
    loader = Accelerator().prepare(make_train_loader(features, encoder, 4, seed=0))
    rows = [row for batch in loader for row in batch["input_ids"].tolist()]
    assert len(rows) == len(features)


def _varied(model, seed):
    """Larger random weights, so greedy decoding says more than one repeated token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _check_batched_equals_single(model, tokenizer, data_dir, is_seq2seq):
    model = _varied(model, 0)
    encoder = Encoder(tokenizer, is_seq2seq=is_seq2seq, max_source_length=96)
    task = _examples(data_dir, 9)
    batched = generate_answers(model, encoder, task.test, task.labels, batch_size=4)
    single = [
        generate_answers(model, encoder, [ex], task.labels, batch_size=1)[0]
        for ex in task.test
    ]
    assert [p.prediction for p in batched] == [p.prediction for p in single]
    assert len({p.prediction for p in batched}) > 2


def test_sorted_batched_generation_equals_one_at_a_time(tokenizer, data_dir):
    _check_batched_equals_single(tiny_llama(tokenizer, seed=1), tokenizer, data_dir, False)
    _check_batched_equals_single(tiny_t5(tokenizer, seed=1), tokenizer, data_dir, True)


def _full_loglik(model, encoder, prompt, target, is_seq2seq):
    """log p(target | prompt) from one plain forward over the whole sequence."""
    if is_seq2seq:
        ids = torch.tensor([prompt])
        out = model(input_ids=ids, labels=torch.tensor([target]))
        logp = F.log_softmax(out.logits[0], dim=-1)
        return sum(logp[t, tok] for t, tok in enumerate(target))
    ids = torch.tensor([prompt + target])
    logp = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    return sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(target))


def test_rank_picks_the_label_of_highest_likelihood(tokenizer, data_dir):
    task = _examples(data_dir, 7)
    for model, is_seq2seq in [(tiny_llama(tokenizer, 2), False), (tiny_t5(tokenizer, 2), True)]:
        _varied(model, 1).eval()
        encoder = Encoder(tokenizer, is_seq2seq=is_seq2seq, max_source_length=96)
        preds = rank_answers(model, encoder, task.test, task.labels, batch_size=3)
        with torch.no_grad():
            for ex, pred in zip(task.test, preds, strict=True):
                prompt = encoder.example_ids(ex)
                scores = [
                    float(_full_loglik(model, encoder, prompt,
                                       encoder.label_ids(label) + [encoder.eos_id], is_seq2seq))
                    for label in task.labels
                ]
                assert pred.prediction == task.labels[max(range(len(scores)),
                                                          key=scores.__getitem__)]


def test_rank_mode_run_answers_the_most_likely_label(tiny_llama_dir, data_dir, tmp_path):
    """A run with --eval-mode rank records, for every test row after task 2, the label that a
    plain forward of the model after task 2 finds most likely (computed here, row by row)."""
    from nlora.load import load_model
    from nlora.runner import load_tasks

    run = tmp_path / "r"
    code = main(["run", "--model", str(tiny_llama_dir), "--data", str(data_dir),
                 "--tasks", ",".join(TINY_TASKS[:2]), "--out", str(run),
                 "--train-per-task", "8", "--test-per-task", "5", "--epochs", "1",
                 "--batch-size", "4", "--lr", "5e-2", "--max-source-length", "64",
                 "--eval-mode", "rank"])
    assert code == 0
    loaded = load_model(run, task=2)
    encoder = Encoder(loaded.tokenizer, is_seq2seq=False, max_source_length=64)
    tasks = {t.name: t for t in load_tasks(loaded.config)}
    rows = [json.loads(line) for line in
            (run / "tasks/02-agnews/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    with torch.no_grad():
        for row in rows:
            task = tasks[row["task"]]
            prompt = encoder.example_ids(task.test[row["index"]])
            scores = [float(_full_loglik(loaded.model, encoder, prompt,
                                         encoder.label_ids(label) + [encoder.eos_id], False))
                      for label in task.labels]
            assert row["prediction"] == task.labels[max(range(len(scores)),
                                                        key=scores.__getitem__)]
