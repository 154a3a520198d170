"""The shared-prefix cache in evaluation: found on token ids, and predictions unchanged."""

from __future__ import annotations

import torch
from conftest import tiny_llama, tiny_t5
from test_nlora_method import _randomise_lora
from test_perf import _varied

from nlora.adapters import add_adapter
from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.evaluate import (
    _causal_scores,
    _prompt_batches,
    generate_answers,
    plan_prompt_batches,
    rank_answers,
)
from nlora.families import load_task
from nlora.kvcache import cache_argument, returned_cache, with_cache
from nlora.prefix import (
    MIN_PREFIX_TOKENS,
    build_prefix_cache,
    common_prefix_length,
    shared_prefix,
    supports_prefix_cache,
)

# Long enough for most agnews/yelp prompts of the tiny tokenizer; a few yelp ones are cut
# (losing their beginning), so both the cached and the plain path run in one call.
MAX_SOURCE = 300


def test_common_prefix_length_by_hand():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    # each prompt keeps at least its last token: [1, 2, 3] can share only 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[5, 6], [7, 6]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 2
    assert common_prefix_length([]) == 0


def test_shared_prefix_ignores_truncated_prompts():
    prompts = [[1, 2, 3, 4, 8], [1, 2, 3, 7, 8, 9], [9, 3, 4, 7, 8, 9, 5]]  # the last one was cut
    assert shared_prefix(prompts, max_length=7) == [1, 2, 3]
    assert shared_prefix(prompts, max_length=None) == []
    assert shared_prefix([[4, 5, 6], [4, 5, 7]], max_length=3) == [4, 5]  # all cut: all count


def _setup(tokenizer, data_dir, name="SC/yelp", n=11, dtype=torch.float64, seed=1,
           truncation="tail"):
    # "tail" cuts a long prompt's beginning (header included): both batch paths run
    model = _varied(tiny_llama(tokenizer, seed), seed).to(dtype).eval()
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=MAX_SOURCE,
                      truncation=truncation)
    task = load_task(data_dir, name, test_per_task=n, seed=seed, splits=("test",))
    return model, encoder, task


def test_prefix_is_found_on_token_ids_and_covers_untruncated_prompts(tokenizer, data_dir):
    model, encoder, task = _setup(tokenizer, data_dir)
    prompts = [encoder.example_ids(ex) for ex in task.test]
    prefix = build_prefix_cache(model, prompts, MAX_SOURCE)
    assert prefix is not None and len(prefix) >= MIN_PREFIX_TOKENS
    # the shared header, instruction and options, as the tokenizer encodes them
    header = tokenizer(task.test[0].prompt.split("\n", 4)[0] + "\n")["input_ids"]
    assert prefix.ids[: len(header) - 1] == header[:-1]
    cut = [len(p) == MAX_SOURCE for p in prompts]
    assert [prefix.covers(p) for p in prompts] == [not c for c in cut]
    assert 0 < sum(cut) < len(prompts)  # both paths are exercised below
    plan = plan_prompt_batches(prompts, 4, prefix)
    assert sorted(i for chunk, _ in plan for i in chunk) == list(range(len(prompts)))
    assert all(cached == prefix.covers(prompts[chunk[0]]) for chunk, cached in plan)
    # the default truncation cuts the example's text, so every prompt keeps the header
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=MAX_SOURCE)
    kept = [encoder.example_ids(ex) for ex in task.test]
    assert any(len(p) == MAX_SOURCE for p in kept)
    assert all(prefix.covers(p) for p in kept)
    # the cache holds the prefix's states: one layer entry per decoder layer, batch 1
    keys = prefix.cache.layers[0].keys
    assert keys.shape[0] == 1 and keys.shape[-2] == len(prefix)
    assert prefix.for_rows(3).layers[0].keys.shape[0] == 3


def test_generate_with_prefix_cache_gives_the_same_predictions(tokenizer, data_dir):
    for name, dtype in [("SC/yelp", torch.float64), ("TC/agnews", torch.float32)]:
        model, encoder, task = _setup(tokenizer, data_dir, name, dtype=dtype)
        plain = generate_answers(model, encoder, task.test, task.labels, 4, prefix_cache=False)
        cached = generate_answers(model, encoder, task.test, task.labels, 4, prefix_cache=True)
        assert [p.prediction for p in cached] == [p.prediction for p in plain]
        assert len({p.prediction for p in plain}) > 3  # the answers really differ by row


def test_rank_scores_with_prefix_cache_equal_the_plain_scores(tokenizer, data_dir):
    model, encoder, task = _setup(tokenizer, data_dir, n=9)
    targets = [encoder.label_ids(label) + [encoder.eos_id] for label in task.labels]
    prompts = [encoder.example_ids(ex) for ex in task.test]
    used = 0
    with torch.no_grad():
        for chunk, batch, cache in _prompt_batches(model, encoder, task.test, 4, "t"):
            ours = _causal_scores(model, batch, targets, cache)
            plain = _causal_scores(model, encoder.collate_prompts([prompts[i] for i in chunk]),
                                   targets)
            torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-10)
            used += cache is not None
    assert used >= 1
    plain = rank_answers(model, encoder, task.test, task.labels, 4, prefix_cache=False)
    cached = rank_answers(model, encoder, task.test, task.labels, 4, prefix_cache=True)
    assert [p.prediction for p in cached] == [p.prediction for p in plain]


def test_prefix_cache_through_a_lora_adapter(tokenizer, data_dir):
    model, encoder, task = _setup(tokenizer, data_dir, "TC/agnews", n=7)
    peft = add_adapter(model, RunConfig(lora_r=4, lora_dropout=0.0), is_seq2seq=False)
    _randomise_lora(peft)
    peft.double().eval()
    assert supports_prefix_cache(peft)
    plain = generate_answers(peft, encoder, task.test, task.labels, 3, prefix_cache=False)
    cached = generate_answers(peft, encoder, task.test, task.labels, 3, prefix_cache=True)
    assert [p.prediction for p in cached] == [p.prediction for p in plain]


def test_no_prefix_cache_where_it_would_not_be_exact(tokenizer, data_dir):
    from transformers import MistralConfig, MistralForCausalLM

    encoder = Encoder(tokenizer, is_seq2seq=True, max_source_length=MAX_SOURCE)
    task = load_task(data_dir, "TC/agnews", test_per_task=4, seed=1, splits=("test",))
    prompts = [encoder.example_ids(ex) for ex in task.test]
    t5 = tiny_t5(tokenizer)
    assert not supports_prefix_cache(t5)  # bidirectional encoder
    assert build_prefix_cache(t5, prompts, MAX_SOURCE) is None
    # a sliding window counts cache columns, which the padding after the prefix would shift
    sliding = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
    )).eval()
    assert build_prefix_cache(sliding, prompts, MAX_SOURCE) is None
    # a wrapper that may put something before the tokens (soft prompts): plain path
    class Wrapper(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone, self.config = backbone, backbone.config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                    cache=None, **kwargs):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, **with_cache(self.backbone, cache),
                                 **kwargs)

    assert not supports_prefix_cache(Wrapper(tiny_llama(tokenizer)))
    # too short a shared prefix is not worth a pass; one prompt has nothing to share
    llama = tiny_llama(tokenizer).eval()
    short = [[5, 6, 7, 20 + i, 30, 31, 32, 33, 34, 35, 36] for i in range(4)]
    assert common_prefix_length(short) == 3 < MIN_PREFIX_TOKENS
    assert build_prefix_cache(llama, short) is None
    assert build_prefix_cache(llama, prompts[:1]) is None


def test_batch_prefix_length_by_hand():
    from nlora.batching import IGNORE_INDEX as X
    from nlora.loss import batch_prefix_length

    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 0], [1, 2, 3, 9, 5, 6, 7], [1, 2, 3, 4, 8, 6, 7]])
    labels = torch.tensor([[X, X, X, X, X, 6, X], [X, X, X, X, X, 6, 7], [X, X, X, X, 8, 6, 7]])
    assert batch_prefix_length({"input_ids": ids, "labels": labels}) == 3
    # the shortest prompt (4 tokens) keeps its last one: at most 3 shared columns
    same = ids[[0, 0, 2]]
    assert batch_prefix_length({"input_ids": same, "labels": labels[[2, 2, 2]]}) == 3
    assert batch_prefix_length({"input_ids": ids[:1], "labels": labels[:1]}) == 0  # one row


def test_training_with_the_shared_prefix_once_gives_the_same_loss_and_gradients(
    tokenizer, data_dir
):
    from nlora.loss import answer_head_forward, batch_prefix_length

    model = tiny_llama(tokenizer).double()
    peft = add_adapter(model, RunConfig(lora_r=4, lora_dropout=0.0), is_seq2seq=False)
    _randomise_lora(peft)
    peft.double().train()
    encoder = Encoder(tokenizer, is_seq2seq=False, max_source_length=MAX_SOURCE)
    task = load_task(data_dir, "TC/agnews", train_per_task=5, seed=1, splits=("train",))
    batch = encoder.collate_train([encoder.train_features(ex) for ex in task.train])
    assert batch_prefix_length(batch) >= MIN_PREFIX_TOKENS  # the once-per-batch path runs
    params = [p for p in peft.parameters() if p.requires_grad]
    ref = answer_head_forward(peft, batch)
    ours = answer_head_forward(peft, batch, shared_prefix=True)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-6, atol=1e-7)  # float32 CE
    torch.testing.assert_close(ours.answer_logits, ref.answer_logits, rtol=1e-10, atol=1e-12)
    assert torch.equal(ours.answer_mask, ref.answer_mask)
    # ``.loss`` is float32 cross-entropy (as transformers'), and LLaMA's attention takes its
    # softmax in float32 even for float64 inputs: two equivalent batchings of the plain path
    # (3 identical rows vs 1) already differ by ~1e-7 relative (measured). So: a float64
    # loss on the answer logits and a 1e-6 bound on the relative error of each gradient;
    # losing the prefix's share of the gradient would be off by far more.
    def loss64(out):
        return torch.nn.functional.cross_entropy(out.answer_logits, out.answer_labels)

    for g, r in zip(torch.autograd.grad(loss64(ours), params),
                    torch.autograd.grad(loss64(ref), params), strict=True):
        assert float((g - r).norm()) <= 1e-6 * float(r.norm())


def test_cache_argument_under_either_transformers_name():
    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None):
            return {"cache": cache}

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return {"past_key_values": past_key_values}

    class Neither(torch.nn.Module):
        def forward(self, input_ids=None):
            return {}

    assert cache_argument(New()) == "cache" and cache_argument(Old()) == "past_key_values"
    assert cache_argument(Neither()) is None
    token = object()
    assert with_cache(Old(), token) == {"past_key_values": token}
    assert with_cache(New(), None) == {}
    assert returned_cache(New()(cache=token)) is token
    assert returned_cache(Old()(past_key_values=token)) is token
    assert returned_cache({}) is None


def test_the_installed_transformers_causal_lm_takes_the_prefix_cache(tokenizer):
    # fails when a transformers release renames the cache or position argument again
    llama = tiny_llama(tokenizer).eval()
    assert supports_prefix_cache(llama)
    prompts = [list(range(10, 30)) + [40 + i, 50] for i in range(3)]
    assert build_prefix_cache(llama, prompts) is not None


def test_a_causal_lm_that_cannot_take_the_cache_is_named_once_in_the_log(tokenizer, caplog):
    from transformers import LlamaForCausalLM

    class NoCache(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, **kwargs)

    model = NoCache(tiny_llama(tokenizer).config).eval()
    prompts = [list(range(10, 30)) + [40 + i, 50] for i in range(3)]
    with caplog.at_level("WARNING", logger="nlora"):
        assert build_prefix_cache(model, prompts) is None
        assert build_prefix_cache(model, prompts) is None
    said = [r.getMessage() for r in caplog.records if "prefix cache off" in r.getMessage()]
    assert len(said) == 1 and "NoCache" in said[0] and "key/value cache" in said[0]
