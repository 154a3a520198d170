"""GainLoRA (Liang et al., NeurIPS 2025): the gate formula, the gated layer, the frozen past,
the projected gate steps and the prompt-only gates, each against an independent computation
on tiny models. End-to-end runs and resume after an interruption come from
tests/test_methods.py, which runs every registered method."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASKS
from safetensors.torch import load_file

from nlora.config import RunConfig


def _run_tasks(method, model_dir, data_dir, out: Path, n=2, epochs=1, lr=1e-2, spy=None):
    """The runner's loop by hand for ``n`` tasks; ``spy(stage, method, model, index)`` looks
    in after begin_task ("begin") and before end_task ("end")."""
    from accelerate import Accelerator

    from nlora.batching import Encoder
    from nlora.families import load_task
    from nlora.model import load_backbone
    from nlora.train import train_task

    backbone = load_backbone(str(model_dir))
    encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, 64)
    method.encoder = encoder
    tasks = [load_task(data_dir, name, 8, 4, seed=0) for name in TINY_TASKS[:n]]
    model = backbone.model
    for j in range(n):
        torch.manual_seed(j)
        model = method.begin_task(model, j, tasks[j])
        if spy is not None:
            spy("begin", method, model, j)
        model, _ = train_task(model, method, j, tasks[j].train, encoder, Accelerator(cpu=True),
                              lr, epochs, 4, 0.0, seed=j)
        if spy is not None:
            spy("end", method, model, j)
        model = method.end_task(model, j, tasks[j], out / f"t{j}")
    return model, encoder, tasks


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "gainlora" in n}


# --- the gate and the gated layer -------------------------------------------------------------

def test_gate_is_the_hand_computed_abs_of_twice_the_sigmoid_of_four_cosines_minus_one():
    from nlora.methods.gainlora import gate_value

    key = torch.tensor([1.0, 0.0, 0.0])
    features = torch.tensor([[2.0, 0.0, 0.0],     # cos 1
                             [0.0, 3.0, 0.0],     # cos 0
                             [-1.0, 1.0, 0.0],    # cos −1/√2
                             [1.0, 1.0, 1.0]])    # cos 1/√3
    def by_hand(c):
        return abs(2 / (1 + math.exp(-4 * c)) - 1)

    want = [by_hand(1.0), 0.0, by_hand(-1 / math.sqrt(2)), by_hand(1 / math.sqrt(3))]
    torch.testing.assert_close(gate_value(features, key), torch.tensor(want))
    assert want[0] == pytest.approx(0.9640275800758169)  # |2σ(4) − 1| = tanh(2)


def test_a_gated_layer_answers_wx_plus_the_gated_sum_of_its_branches():
    from nlora.methods.gainlora import GainBranches, GateState, _add_branches

    torch.manual_seed(0)
    base = torch.nn.Linear(5, 3, bias=True)
    branches = GainBranches(base, scaling=2.5, dropout=0.0)
    state = GateState()
    branches.state = [state]
    base.gainlora = branches
    base.register_forward_hook(_add_branches)
    for _ in range(3):
        branches.add_branch(2, torch.device("cpu"))
    with torch.no_grad():
        for a, b in zip(branches.lora_A, branches.lora_B, strict=True):
            a.copy_(torch.randn_like(a))
            b.copy_(torch.randn_like(b))
    x = torch.randn(4, 6, 5)  # (batch, tokens, in)
    state.values = torch.rand(4, 3)
    got = base(x)
    w, bias = base.weight.detach(), base.bias.detach()
    for row in range(4):
        for tok in range(6):
            want = w @ x[row, tok] + bias
            for i in range(3):
                a, b = branches.lora_A[i].detach(), branches.lora_B[i].detach()
                want = want + state.values[row, i] * 2.5 * (b @ (a @ x[row, tok]))
            torch.testing.assert_close(got[row, tok], want, atol=1e-5, rtol=1e-5)
    state.values = torch.zeros(4, 3)  # every gate closed: the base layer alone
    torch.testing.assert_close(base(x), torch.nn.functional.linear(x, w, bias))


def test_a_projected_gate_step_leaves_the_memory_subspace_untouched():
    from nlora.methods.gainlora import project_step

    gen = torch.Generator().manual_seed(0)
    memory, _ = torch.linalg.qr(torch.randn(6, 2, generator=gen))
    before = torch.randn(4, 6, generator=gen)
    after = before + torch.randn(4, 6, generator=gen)
    plain = project_step(after, before, memory, renorm=False)
    # the step lost exactly its component in span(M): (W − W_old) M = 0, the rest kept
    torch.testing.assert_close((plain - before) @ memory, torch.zeros(4, 2), atol=1e-6,
                               rtol=0)
    outside = torch.eye(6) - memory @ memory.T
    torch.testing.assert_close(plain - before, (after - before) @ outside)
    scaled = project_step(after, before, memory, renorm=True)
    torch.testing.assert_close(scaled.norm(dim=1), after.norm(dim=1))  # code's row norms
    torch.testing.assert_close(scaled / scaled.norm(dim=1, keepdim=True),
                               plain / plain.norm(dim=1, keepdim=True))


# --- the continual loop -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "t5"])
def test_old_branches_and_gates_stay_frozen_and_the_new_gate_moves_outside_old_inputs(
    family, tiny_llama_dir, tiny_t5_dir, data_dir, tmp_path
):
    """Task 2 changes no bit of task 1's branch or gate; its own gate's steps (renormalisation
    off: the plain projection) lie outside the memories of task 1's gate inputs; its key starts
    outside the memory of task 1's gate outputs; only B_t and gate t train; so its gate stays
    near 0 on task 1's prompts."""
    from nlora.methods.gainlora import GainLoRA, gate_weights

    model_dir = tiny_llama_dir if family == "llama" else tiny_t5_dir
    config = RunConfig(lora_r=2, tasks=TINY_TASKS, gainlora_renorm=False,
                       gainlora_gate_hidden=8)
    method = GainLoRA(config, family == "t5")
    seen = {}

    def spy(stage, method, model, index):
        seen[stage, index] = _snapshot(model)
        if index == 1:  # task 2's gate on task 1's and on task 2's own training prompts
            with torch.no_grad():
                seen["old", stage], seen["new", stage] = (
                    method.model_gates.values(method.pooled_inputs(model, t.train).float())[:, 1]
                    for t in tasks)
        if stage == "begin":
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            want = {f"gainlora_gates.gates.{index}.{p}" for p in ("down.weight", "up.weight",
                                                                 "key")}
            want |= {n for n in seen[stage, index] if n.endswith(f"lora_B.{index}")}
            assert trainable == want
            seen["start", index] = {k: v.detach().clone() for k, v in
                                    gate_weights(method.model_gates.gates[index]).items()}
            if index == 1:
                key = method.model_gates.gates[1].key.detach()
                assert float((key @ method.gate_memory["key"]).norm()) < 1e-4 * float(key.norm())

    from nlora.families import load_task

    tasks = [load_task(data_dir, name, 8, 4, seed=0) for name in TINY_TASKS[:2]]
    model, _, _ = _run_tasks(method, model_dir, data_dir, tmp_path, spy=spy)
    # the point of it all: the new branch is gated off on the earlier task's inputs, before
    # and after training, and open on its own task's
    assert float(seen["old", "begin"].max()) < 1e-3 and float(seen["old", "end"].max()) < 1e-2
    assert float(seen["new", "end"].mean()) > 0.3
    after_first = seen["end", 0]
    now = _snapshot(model)
    first = [n for n in after_first  # task 1's own tensors: its branches and its gate
             if n.endswith((".lora_A.0", ".lora_B.0")) or n.startswith("gainlora_gates.gates.0.")]
    assert first and all(now[n].equal(after_first[n]) for n in first)
    changed = [n for n in now if n.endswith("lora_B.1") and not now[n].equal(seen["begin", 1][n])]
    assert changed  # the new branch learned
    gate = method.model_gates.gates[1]
    assert not any(p.requires_grad for p in model.parameters())
    # memories as they were during task 2: task 1's (saved with task 1)
    memory = load_file(tmp_path / "t0/gainlora_memory.safetensors")
    for part, weight in gate_weights(gate).items():
        step = weight.detach() - seen["start", 1][part]
        assert float(step.norm()) > 0
        leak = float((step @ memory[f"gate.{part}"]).norm())
        assert leak < 1e-5 * float(step.norm()) + 1e-7, part


def test_task_one_gate_is_learned_not_fixed_and_the_key_follows_its_outputs(
    tiny_llama_dir, data_dir, tmp_path
):
    """At the first task the gate is a real gate (a_1 < 1), its key the top direction of the
    gate's outputs on the task's prompts, at the norm of a U(−1, 1) draw."""
    from nlora.methods.gainlora import GainLoRA

    config = RunConfig(lora_r=2, tasks=TINY_TASKS, gainlora_gate_hidden=8)
    method = GainLoRA(config, False)
    seen = {}

    def spy(stage, method, model, index):
        if stage == "begin":
            gate = method.model_gates.gates[0]
            pooled = method.pooled_inputs(model, tasks[0].train).float()
            feats = gate.features(pooled).detach().double()
            top = torch.linalg.eigh(feats.T @ feats)[1][:, -1]
            key = gate.key.detach().double()
            seen["cos"] = float(abs(key @ top) / key.norm())
            seen["norm"] = float(key.norm())
            seen["gates"] = gate(pooled).detach()

    from nlora.families import load_task

    tasks = [load_task(data_dir, name, 8, 4, seed=0) for name in TINY_TASKS[:1]]
    _run_tasks(method, tiny_llama_dir, data_dir, tmp_path, n=1, spy=spy)
    assert seen["cos"] == pytest.approx(1.0, abs=1e-5)
    # the task's generator draws D and U (Kaiming, PyTorch's Linear init), then the key's U(−1, 1)
    gen = torch.Generator().manual_seed(config.seed * 1000)
    for shape in ((8, 32), (32, 8)):
        torch.nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=gen)
    draw = torch.empty(32).uniform_(-1, 1, generator=gen)
    assert seen["norm"] == pytest.approx(float(draw.norm()), rel=1e-5)
    assert bool((seen["gates"] < 1).all()) and bool((seen["gates"] > 0).all())


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_uses_the_prompts_gates_for_every_new_token(
    family, tiny_llama_dir, tiny_t5_dir, data_dir, tmp_path
):
    from nlora.methods.gainlora import GainLoRA

    model_dir = tiny_llama_dir if family == "llama" else tiny_t5_dir
    config = RunConfig(lora_r=2, tasks=TINY_TASKS, gainlora_gate_hidden=8)
    method = GainLoRA(config, family == "t5")
    model, encoder, tasks = _run_tasks(method, model_dir, data_dir, tmp_path)
    gates = method.model_gates
    seen = []
    # every call of an adapted layer that runs per new token (T5: the decoder's): its gates
    name = next(n for n in method.branches(model) if family == "llama" or "decoder" in n)
    model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: seen.append(gates.state.values.clone()))
    prompt = [encoder.example_ids(tasks[0].test[0])]
    batch = encoder.collate_prompts(prompt)
    model.eval()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=1,
                       pad_token_id=encoder.pad_id, eos_token_id=encoder.eos_id)
        embeds = model.get_input_embeddings()(batch["input_ids"])
        want = gates.values(gates.pooled(embeds, batch["attention_mask"]))
    assert len(seen) >= 3  # the prompt's pass and later tokens' passes
    for values in seen:
        torch.testing.assert_close(values, want)


def test_causal_training_gates_read_the_prompt_not_the_answer(tiny_llama_dir, data_dir,
                                                               tmp_path):
    from nlora.methods.gainlora import GainLoRA

    config = RunConfig(lora_r=2, tasks=TINY_TASKS, gainlora_gate_hidden=8)
    method = GainLoRA(config, False)
    model, encoder, tasks = _run_tasks(method, tiny_llama_dir, data_dir, tmp_path, n=1)
    examples = tasks[0].train[:3]
    batch = method.collate_train([encoder.train_features(ex) for ex in examples])
    gates = method.model_gates
    with torch.no_grad():
        model(**batch)
        got = gates.state.values.clone()
        want = torch.cat([gates.values(gates.pooled(
            model.get_input_embeddings()(torch.tensor([encoder.example_ids(ex)])),
            torch.ones(1, len(encoder.example_ids(ex))))) for ex in examples])
    torch.testing.assert_close(got, want)


def test_saved_adapter_is_the_tasks_own_branch_in_peft_format(tiny_llama_dir, data_dir,
                                                             tmp_path):
    from nlora.adapters import read_lora_updates
    from nlora.methods.gainlora import STATE, GainLoRA

    config = RunConfig(lora_r=2, tasks=TINY_TASKS, gainlora_gate_hidden=8)
    _run_tasks(GainLoRA(config, False), tiny_llama_dir, data_dir, tmp_path)
    for j in range(2):
        state = load_file(tmp_path / f"t{j}" / STATE)
        updates = read_lora_updates(tmp_path / f"t{j}/adapter")
        assert updates
        for name, update in updates.items():
            assert update.A.equal(state[f"{name}.A"]) and update.B.equal(state[f"{name}.B"])
            assert update.scaling == config.lora_alpha / config.lora_r


def test_a_gated_causal_model_takes_no_shared_prefix_cache(tiny_llama_dir, data_dir, tmp_path):
    """A prefix run alone would get gates of its own: the model refuses the prefix cache, so
    evaluation asked for one answers exactly as without it."""
    from nlora.evaluate import predict
    from nlora.methods.gainlora import GainLoRA
    from nlora.prefix import supports_prefix_cache

    config = RunConfig(lora_r=2, tasks=TINY_TASKS, gainlora_gate_hidden=8)
    method = GainLoRA(config, False)
    model, encoder, tasks = _run_tasks(method, tiny_llama_dir, data_dir, tmp_path)
    assert not supports_prefix_cache(model)
    for mode in ("generate", "rank"):
        on = predict(model, encoder, tasks[1].test, tasks[1].labels, 4, mode, prefix_cache=True)
        off = predict(model, encoder, tasks[1].test, tasks[1].labels, 4, mode,
                      prefix_cache=False)
        assert [p.prediction for p in on] == [p.prediction for p in off]
