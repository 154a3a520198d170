"""L2P, LFPT5, ProgPrompt, OSF and InfLoRA: each method's defining property, checked against
an independent computation, and resume on tiny T5 (tiny LLaMA is in test_methods.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_TASKS, tiny_llama, tiny_t5
from safetensors.torch import load_file
from test_methods import _run, _train_three

from nlora.config import RunConfig
from nlora.model import load_backbone

NEW = ["l2p", "lfpt5", "progprompt", "osf", "inflora"]


@pytest.mark.slow  # end to end: make test-fast skips it
@pytest.mark.parametrize("method", NEW)
def test_new_methods_resume_to_the_same_result_on_t5(method, tiny_t5_dir, data_dir, tmp_path,
                                                      interrupt_training):
    assert _run(tiny_t5_dir, data_dir, tmp_path / "whole", "--method", method) == 0
    interrupt_training(2)
    assert _run(tiny_t5_dir, data_dir, tmp_path / "cut", "--method", method) == 130
    interrupt_training(None)
    assert _run(tiny_t5_dir, data_dir, tmp_path / "cut", "--method", method) == 0
    whole = json.loads((tmp_path / "whole/metrics.json").read_text())
    assert json.loads((tmp_path / "cut/metrics.json").read_text()) == whole
    for path in (tmp_path / "whole/tasks").rglob("*.safetensors"):
        a, b = load_file(path), load_file(tmp_path / "cut" / path.relative_to(tmp_path / "whole"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), path


# --- ProgPrompt -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_progprompt_keeps_earlier_prompts_and_answers_task_i_with_its_prompts(
    kind, tiny_llama_dir, tiny_t5_dir, data_dir, tmp_path
):
    from nlora.methods.progprompt import ProgPrompt

    model_dir = tiny_llama_dir if kind == "llama" else tiny_t5_dir
    method = ProgPrompt(RunConfig(progprompt_length=4, tasks=TINY_TASKS, model=str(model_dir)),
                        is_seq2seq=kind == "t5")
    snapshots = []
    model, trained, _, _ = _train_three(method, model_dir, data_dir, tmp_path)
    for j in range(3):  # the saved progressive prompt after task j is [P_j; ...; P_1]
        saved = load_file(tmp_path / f"t{j}/prompt/adapter_model.safetensors")
        snapshots.append(saved["prompt_embeddings"])
        assert saved["prompt_embeddings"].shape == ((j + 1) * 4, 32)
    # P_1 as saved after task 1 equals P_1 inside the prompt saved after tasks 2 and 3 ...
    p1 = snapshots[0]
    assert snapshots[1][4:].equal(p1) and snapshots[2][8:].equal(p1)
    assert snapshots[2][4:8].equal(snapshots[1][:4])  # ... and P_2 after task 3
    # ... and equals the live parameter after all tasks, while each task did train its prompt
    assert model.prompts[0].embedding.weight.equal(p1)
    assert [len(params) for params in trained] == [1, 1, 1]  # only the new prompt trains
    # task i reads [P_i; ...; P_1]
    ids = torch.randint(4, 100, (2, 7))
    for i in range(3):
        method.eval_model(model, i)
        got = model.prompt_embeddings(ids, torch.ones_like(ids))
        assert got.shape[1] == 4 * (i + 1) and got[0].equal(snapshots[i])


def test_progprompt_saved_prompt_loads_with_plain_peft(tiny_llama_dir, tiny_t5_dir, data_dir,
                                                        tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from nlora.methods.progprompt import ProgPrompt

    for model_dir, auto, seq2seq in ((tiny_llama_dir, AutoModelForCausalLM, False),
                                     (tiny_t5_dir, AutoModelForSeq2SeqLM, True)):
        out = tmp_path / model_dir.name
        method = ProgPrompt(RunConfig(progprompt_length=4, tasks=TINY_TASKS), seq2seq)
        model, _, _, _ = _train_three(method, model_dir, data_dir, out, steps=2)
        plain = PeftModel.from_pretrained(auto.from_pretrained(model_dir), out / "t1/prompt")
        plain.eval()
        model.eval()
        method.eval_model(model, 1)
        ids = torch.randint(4, 100, (2, 7))
        extra = {"labels": torch.randint(4, 100, (2, 3))} if seq2seq else {}
        with torch.no_grad():
            mine = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
            theirs = plain(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
        torch.testing.assert_close(mine, theirs)


# --- L2P --------------------------------------------------------------------------------------

def test_l2p_chooses_the_prompts_whose_keys_match_the_query_best(tokenizer):
    from nlora.methods.l2p import PromptPool

    backbone = tiny_llama(tokenizer)
    pool = PromptPool(backbone, False, size=6, length=3, top_k=2)
    ids = torch.randint(4, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: padding must not enter the query
    with torch.no_grad():
        hidden = backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state
    queries = torch.stack([hidden[b][mask[b].bool()].mean(0) for b in range(4)])
    torch.testing.assert_close(pool.query(ids, mask), queries)
    # keys: key 2k+1 is close to query k, key 2k is its opposite; the rest random
    with torch.no_grad():
        for b in (0, 1):
            pool.keys[2 * b + 1] = queries[b] + 0.01 * torch.randn(32)
            pool.keys[2 * b] = -queries[b]
    prompts = pool.prompt_embeddings(ids, mask)
    for b in range(4):  # cosine similarities by hand, best two first
        cos = [float(queries[b] @ k / (queries[b].norm() * k.norm()))
               for k in pool.keys.detach()]
        expected = sorted(range(6), key=lambda i: -cos[i])[:2]
        assert pool.selected[b].tolist() == expected
        chosen = pool.pool.embedding.weight.view(6, 3, 32)[expected].reshape(6, 32)
        assert prompts[b].equal(chosen)
        if b < 2:
            assert expected[0] == 2 * b + 1 and 2 * b not in expected
    # the pull term: mean over the batch of Σ (1 − cos) over the chosen keys
    keys = pool.keys.detach()
    by_hand = sum(
        sum(1 - float(queries[b] @ keys[i] / (queries[b].norm() * keys[i].norm()))
            for i in pool.selected[b].tolist()) for b in range(4)) / 4
    assert float(pool.pull.detach()) == pytest.approx(by_hand, rel=1e-5)
    # and the backbone reads exactly the chosen prompts before the input
    with torch.no_grad():
        logits = pool(input_ids=ids, attention_mask=mask).logits
        embeds = torch.cat([prompts, backbone.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(4, 6, dtype=mask.dtype), mask], 1)
        direct = backbone(inputs_embeds=embeds, attention_mask=full_mask).logits
    torch.testing.assert_close(logits, direct)


def test_l2p_keys_learn_only_from_the_pull_term(tiny_llama_dir, data_dir, tmp_path):
    from nlora.methods.l2p import L2P

    method = L2P(RunConfig(l2p_pool_size=4, l2p_prompt_length=2, l2p_top_k=2,
                           l2p_key_weight=0.0, tasks=TINY_TASKS), False)
    model, _, _, _ = _train_three(method, tiny_llama_dir, data_dir, tmp_path, steps=1)
    saved = load_file(tmp_path / "t0/l2p_pool.safetensors")
    first = L2P(RunConfig(l2p_pool_size=4, l2p_prompt_length=2, l2p_top_k=2,
                          tasks=TINY_TASKS), False)
    backbone = load_backbone(str(tiny_llama_dir)).model
    torch.manual_seed(0)  # as the loop seeds task 0 before begin_task
    fresh = first.begin_task(backbone, 0, None)
    assert saved["keys"].equal(fresh.keys.detach())  # λ = 0: the keys never moved
    assert not saved["prompts"].equal(fresh.pool.embedding.weight.detach())  # prompts did


# --- LFPT5 ------------------------------------------------------------------------------------

def test_lfpt5_pseudo_samples_are_the_earlier_tasks_examples_with_its_prefix(data_dir):
    from nlora.data import build_prompt
    from nlora.families import load_task
    from nlora.methods.lfpt5 import ANSWER, parse_samples

    task = load_task(data_dir, "TC/agnews", 4, 2, seed=0)
    texts = [f"stocks rally {ANSWER} Business", f"a match {ANSWER} Sports",
             f"more stocks {ANSWER} Business", f"no separator {task.labels[0]}",
             f"bad label {ANSWER} Cooking", f"{ANSWER} World", f"third {ANSWER} Business"]
    samples = parse_samples(task, texts, per_label=2)
    assert [(s.sentence, s.label) for s in samples] == [
        ("stocks rally", "Business"), ("a match", "Sports"), ("more stocks", "Business")]
    for s in samples:
        assert s.replayed and s.prefix == "__agnews__"
        assert s.prompt == build_prompt("TC", "agnews", task.labels, s.sentence)
        assert s.prompt.startswith("Task:TC\nDataset:agnews\n")


def test_lfpt5_generates_from_each_earlier_tasks_prefix_and_replays_the_samples(
    tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    from nlora.methods.lfpt5 import ANSWER, LFPT5

    method = LFPT5(RunConfig(lfpt5_prompt_length=3, lfpt5_pseudo_per_label=1,
                             tasks=TINY_TASKS), False)
    asked = []

    def fake_sample(model, task, count):
        asked.append((task.dataset, count))
        return [f"made-up {task.dataset} text {ANSWER} {label}" for label in task.labels]

    monkeypatch.setattr(method, "sample_texts", fake_sample)
    _, _, tasks, encoder = _train_three(method, tiny_llama_dir, data_dir, tmp_path, steps=2)
    # after task 1: the yelp prefix; after task 2: yelp and agnews, 2·k·|labels| each
    assert asked == [("yelp", 2 * 5), ("yelp", 2 * 5), ("agnews", 2 * 4)]
    replayed = [ex for ex in method.train_examples(2, tasks) if ex.replayed]
    assert {ex.prefix for ex in replayed} == {"__yelp__", "__agnews__"}
    for ex in replayed:
        dataset = ex.prefix.strip("_")
        assert f"Dataset:{dataset}\n" in ex.prompt and f"made-up {dataset} text" in ex.sentence
        # its LM row asks the prompt to write "sentence __ans__ label" after the task prefix
        features = method.train_features(ex)
        lm_text = encoder.tokenizer.decode(features["lm_input_ids"], skip_special_tokens=True)
        assert lm_text.startswith(ex.prefix)
        assert lm_text.endswith(f"{ANSWER} {ex.label}")
    saved = (tmp_path / "t1/pseudo.jsonl").read_text().splitlines()
    assert len(saved) == len(replayed) == 5 + 4
    assert not (tmp_path / "t2/pseudo.jsonl").exists()  # nothing follows the last task


# --- OSF --------------------------------------------------------------------------------------

def _osf_update(projection, tiny_llama_dir, data_dir, tmp_path):
    """Weights of layer 0's q_proj before task 2, and task 2's saved ΔW."""
    from nlora.methods.osf import OSF

    config = RunConfig(target_modules=["q_proj"], osf_projection=projection, tasks=TINY_TASKS)
    method = OSF(config, False)
    before = {}
    real_begin = method.begin_task

    def spy(model, index, task):
        if index == 1:
            before["W"] = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        return real_begin(model, index, task)

    method.begin_task = spy
    model, _, _, _ = _train_three(method, tiny_llama_dir, data_dir, tmp_path, steps=2)
    state = load_file(tmp_path / "t1/adapter/adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
    after = model.model.layers[0].self_attn.q_proj.weight.detach()
    return before["W"], delta, after


def _leakage(weight, delta, share):
    from nlora.methods.osf import preserved_rank

    k = preserved_rank(weight.shape, share)
    u, _, vh = torch.linalg.svd(weight)  # float32, as PEFT's OSF decomposes it
    u, vh, d = u.double(), vh.double(), delta.double()
    return (float((u[:, :k].T @ d).norm() / d.norm()), float((d @ vh[:k].T).norm() / d.norm()))


def test_osf_update_stays_outside_the_preserved_singular_directions(tiny_llama_dir, data_dir,
                                                                     tmp_path):
    weight, delta, after = _osf_update("parameter", tiny_llama_dir, data_dir, tmp_path)
    assert float(delta.norm()) > 1e-3  # it did learn
    torch.testing.assert_close(after, weight + delta)  # the merge applied exactly that ΔW
    left, right = _leakage(weight, delta, share=1 / 3)  # task 2 of 3 preserves 1/3
    assert left < 1e-5 and right < 1e-5


def test_osf_gradient_projection_alone_leaks_under_adamw(tiny_llama_dir, data_dir, tmp_path):
    # PEFT's tuner projects gradients; AdamW's per-entry scaling moves the update off the
    # complement (why `parameter` is the default; docs/methods.md gives the measured size)
    weight, delta, _ = _osf_update("gradient", tiny_llama_dir, data_dir, tmp_path)
    left, right = _leakage(weight, delta, share=1 / 3)
    assert max(left, right) > 1e-3


def test_osf_preserved_ranks_follow_the_schedule():
    from nlora.methods.osf import preserved_rank, preserved_share

    config = RunConfig(tasks=["a", "b", "c"])
    assert [preserved_share(config, t) for t in range(3)] == [0, 1 / 3, 2 / 3]
    assert [preserved_rank(torch.Size([32, 16]), s) for s in (0, 1 / 3, 2 / 3, 0.999)] == [
        1, 5, 10, 15]
    config = RunConfig(tasks=["a", "b"], osf_preserve=[0.3, 0.5])
    assert preserved_share(config, 1) == 0.5


# --- InfLoRA ----------------------------------------------------------------------------------

def test_inflora_memory_keeps_the_energy_share_gpm_asks_for():
    from nlora.methods.inflora import update_memory

    c = torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.5]))  # total energy 16
    m = update_memory(c, None, threshold=0.7)  # 8/16 = .5 < .7, 12/16 = .75: stop -> e1, e2
    assert m.shape == (6, 2) and torch.allclose(m.abs(), torch.eye(6)[:, :2])
    m = update_memory(c, None, threshold=0.9)  # 14/16 = .875 < .9 -> e1, e2, e3, e4
    assert m.shape == (6, 4)
    # next task: energy on e2 (held), e5, e6 -> captured 4/8; adding e5 (2/8) gives .75
    c2 = torch.diag(torch.tensor([0.0, 4.0, 0.0, 0.0, 2.0, 2.0]))
    grown = update_memory(c2, m[:, :2], threshold=0.7)
    assert grown.shape == (6, 3)
    assert torch.allclose(grown[:, :2], m[:, :2])
    assert float(grown[:, 2].abs()[4:].sum()) == pytest.approx(1, abs=1e-5)  # in span(e5, e6)
    # the released code squares C's singular values (64, 16, 4, ... of 85.5: .75, .94, ...)
    # and keeps the directions whose cumulative share is still below ε: one fewer
    assert update_memory(c, None, threshold=0.9, variant="released").shape == (6, 1)
    assert update_memory(c, None, threshold=0.95, variant="released").shape == (6, 2)


def test_inflora_designs_A_from_new_inputs_outside_the_memory():
    from nlora.methods.inflora import design_A

    c = torch.diag(torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0]))
    memory = torch.eye(5)[:, :2]  # e1, e2 belong to earlier tasks
    a = design_A(c, memory, rank=2)
    assert torch.allclose(a.abs(), torch.eye(5)[2:4] / math.sqrt(3), atol=1e-6)  # e3, e4
    rand = design_A(c, memory, rank=3, variant="released",
                    generator=torch.Generator().manual_seed(0))
    assert float((rand @ memory).abs().max()) < 1e-6
    torch.testing.assert_close(rand.norm(dim=1), torch.full((3,), 1 / math.sqrt(3)))


def test_inflora_new_update_vanishes_on_earlier_tasks_input_subspace(tiny_llama_dir, data_dir,
                                                                     tmp_path):
    from nlora.methods.inflora import InfLoRA

    # ε = 0.6: on the 32-wide tiny model 0.995 of the energy would take every direction
    method = InfLoRA(RunConfig(lora_r=4, inflora_threshold=0.6, tasks=TINY_TASKS), False)
    memories, designed = [], []
    real_end, real_begin = method.end_task, method.begin_task

    def end(model, index, task, folder):
        model = real_end(model, index, task, folder)
        memories.append({k: v.clone() for k, v in method.memory.items()})
        return model

    def begin(model, index, task):
        model = real_begin(model, index, task)
        designed.append({n: p.detach().clone() for n, p in model.named_parameters()
                         if "lora_A" in n})
        return model

    method.end_task, method.begin_task = end, begin
    _train_three(method, tiny_llama_dir, data_dir, tmp_path, steps=2)
    state = load_file(tmp_path / "t1/adapter/adapter_model.safetensors")
    checked = 0
    for name, memory in memories[0].items():
        key = f"base_model.model.{name}"
        a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        assert a.equal(designed[1][f"{key}.lora_A.default.weight"])  # A never trained
        assert float(b.abs().max()) > 0  # B did
        assert float((a @ memory).abs().max()) < 1e-5  # A's rows are outside M
        delta = b @ a
        assert float((delta @ memory).norm() / delta.norm()) < 1e-5  # ΔW M = 0
        # M is orthonormal and its columns hold the bulk of task 1's input energy
        torch.testing.assert_close(memory.T @ memory, torch.eye(memory.shape[1]),
                                   atol=1e-5, rtol=0)
        checked += 1
    assert checked == 4  # q and v in two layers
    assert all(m2.shape[1] >= m1.shape[1] for m1, m2 in
               zip(memories[0].values(), memories[1].values(), strict=True))


# --- report -----------------------------------------------------------------------------------

@pytest.mark.slow  # end to end: make test (the fast tier) skips it
def test_report_marks_parameter_metrics_that_do_not_apply_as_na(tiny_llama_dir, data_dir,
                                                                tmp_path):
    from nlora.cli import main

    methods = ("l2p", "lfpt5", "progprompt", "osf", "inflora")
    for method in methods:
        extra = ["--lfpt5-prompt-length", "3"] if method == "lfpt5" else []
        assert _run(tiny_llama_dir, data_dir, tmp_path / method, "--method", method, *extra) == 0
    assert main(["report", *(str(tmp_path / m) for m in methods),
                 "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report/report.md").read_text()
    table = [[c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines()
             if line.startswith("| run |") or (line.startswith("| ") and "| 3 |" in line)]
    header = table[0]  # cells by column name, whatever the report's column order
    rows = {row[0]: row for row in table[1:]}
    oo, rest = header.index("OO"), slice(header.index("AWOM"), header.index("‖ΔW‖*") + 1)
    for prompts in ("l2p", "lfpt5", "progprompt"):  # no weight update: nothing to measure
        assert rows[prompts][oo] == "n/a" and set(rows[prompts][rest]) == {"n/a"}
    assert rows["osf"][oo] == "n/a" and "n/a" not in rows["osf"][rest]
    assert rows["inflora"][oo] != "n/a" and "n/a" not in rows["inflora"][rest]
    assert "(eq. 7 terms): n/a for osf" in md


# --- CLI and compare --------------------------------------------------------------------------

def test_bad_new_method_options_fail_with_one_line(data_dir, tmp_path, capsys):
    from nlora.cli import main

    base = ["run", "--data", str(data_dir), "--tasks", "CB,agnews", "--out", str(tmp_path / "r")]
    cases = [
        (["--method", "l2p", "--l2p-top-k", "6", "--l2p-pool-size", "5"], "--l2p-top-k (6)"),
        (["--method", "osf", "--osf-preserve", "0.2"], "--osf-preserve lists 1 values for 2"),
        (["--method", "osf", "--osf-preserve", "0.2,1.5"],
         "--osf-preserve must be a finite number >= 0 and < 1, got 1.5"),
        (["--method", "inflora", "--inflora-threshold", "0"], "--inflora-threshold"),
        (["--method", "lfpt5", "--lfpt5-prompt-length", "0"], "--lfpt5-prompt-length"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nlora: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_each_new_method_gets_its_own_default_learning_rate(data_dir, tmp_path):
    from nlora.cli import build_parser
    from nlora.cli.learn import config_from_args

    expected = {"progprompt": 0.3, "lfpt5": 0.5, "l2p": 0.03, "osf": 1e-5, "inflora": 3e-4}
    for method, lr in expected.items():
        args = build_parser().parse_args(["run", "--method", method, "--data", str(data_dir),
                                          "--tasks", "CB", "--out", str(tmp_path)])
        assert config_from_args(args).learning_rate == lr
    args = build_parser().parse_args(["run", "--method", "osf", "--lr", "0.1", "--data",
                                      str(data_dir), "--tasks", "CB", "--out", str(tmp_path)])
    assert config_from_args(args).learning_rate == 0.1


@pytest.mark.slow  # end to end: make test (the fast tier) skips it
def test_compare_runs_new_methods_with_their_options(tiny_llama_dir, data_dir, tmp_path, capsys):
    from nlora.cli import main

    names = ("progprompt", "l2p", "inflora", "lfpt5", "osf")
    argv = ["compare", "--methods", ",".join(names), "--model", str(tiny_llama_dir),
            "--data", str(data_dir), "--tasks", "SC/yelp,NLI/CB", "--out", str(tmp_path / "c"),
            "--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size",
            "4", "--lr", "5e-3", "--max-source-length", "64", "--progprompt-length", "3",
            "--l2p-pool-size", "4", "--l2p-top-k", "2", "--lfpt5-prompt-length", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(any(line.startswith(m + " ") for line in out.splitlines())
               for m in names)
    config = RunConfig.from_yaml(tmp_path / "c/l2p/config.yaml")
    assert (config.l2p_pool_size, config.l2p_top_k, config.method) == (4, 2, "l2p")
    pool = load_file(tmp_path / "c/l2p/tasks/02-CB/l2p_pool.safetensors")
    assert pool["keys"].shape[0] == 4


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_prompted_model_rank_scores_equal_scoring_each_label_from_scratch(kind, tokenizer):
    """Rank evaluation through the prompt glue (left padding, cached continuation, encoder
    reuse) gives the log-likelihood of prompt + label computed in one plain pass per row."""
    import torch.nn.functional as F

    from nlora.evaluate import _causal_scores, _seq2seq_scores
    from nlora.methods.progprompt import ProgPrompt

    seq2seq = kind == "t5"
    backbone = tiny_t5(tokenizer) if seq2seq else tiny_llama(tokenizer)
    method = ProgPrompt(RunConfig(progprompt_length=3, tasks=["a", "b"]), seq2seq)
    model = method.begin_task(backbone, 0, None)
    model = method.begin_task(model, 1, None)  # reads [P_2; P_1]: 6 prompt tokens
    model.eval()
    pad = tokenizer.pad_token_id
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    width = 5
    if seq2seq:  # the encoder's batches are right-padded, causal prompts left-padded
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = (torch.arange(width) < torch.tensor([[len(r)] for r in rows])).long()
    else:
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = (torch.arange(width) >= torch.tensor([[width - len(r)] for r in rows])).long()
    targets = [[20, 21, 1], [30, 1]]
    with torch.no_grad():
        batch = {"input_ids": ids, "attention_mask": mask}
        scores = (_seq2seq_scores if seq2seq else _causal_scores)(model, batch, targets)
        prompt = model.progressive_prompt(1)
        embed = backbone.get_input_embeddings()
        for b, row in enumerate(rows):
            for k, target in enumerate(targets):
                if seq2seq:
                    inputs = torch.cat([prompt, embed(torch.tensor(row))])[None]
                    out = backbone(inputs_embeds=inputs, labels=torch.tensor([target]))
                    logp = F.log_softmax(out.logits[0], -1)
                    expected = sum(float(logp[i, t]) for i, t in enumerate(target))
                else:
                    seq = torch.tensor(row + target[:-1])
                    out = backbone(inputs_embeds=torch.cat([prompt, embed(seq)])[None])
                    logp = F.log_softmax(out.logits[0], -1)
                    start = prompt.shape[0] + len(row) - 1  # predicts the first label token
                    expected = sum(float(logp[start + i, t]) for i, t in enumerate(target))
                assert float(scores[b, k]) == pytest.approx(expected, abs=1e-4)
