"""The methods after N-LoRA (ELLA, JumpLoRA, SLAO, SD-LoRA, ...): each one's defining property
against an independent computation, on tiny models. End-to-end runs and resume after an
interruption come from tests/test_methods.py, which runs every registered method."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASKS
from safetensors.torch import load_file

from nlora.config import RunConfig


def _run_tasks(method, model_dir, data_dir, out: Path, n=2, epochs=1, lr=1e-2, before=None):
    """The runner's loop by hand for ``n`` tasks; the model's state_dict after each task."""
    from accelerate import Accelerator

    from nlora.batching import Encoder
    from nlora.families import load_task
    from nlora.model import load_backbone
    from nlora.train import train_task

    backbone = load_backbone(str(model_dir))
    encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, 64)
    method.encoder = encoder
    tasks = [load_task(data_dir, name, 8, 4, seed=0) for name in TINY_TASKS[:n]]
    model, states = backbone.model, []
    for j in range(n):
        torch.manual_seed(j)
        if before is not None:
            before(method, j)
        model = method.begin_task(model, j, tasks[j])
        model, _ = train_task(model, method, j, tasks[j].train, encoder, Accelerator(cpu=True),
                              lr, epochs, 4, 0.0, seed=j)
        model = method.end_task(model, j, tasks[j], out / f"t{j}")
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, states, tasks


def _plain_peft_merged(model_dir, adapters: list[Path]) -> dict[str, torch.Tensor]:
    """The base model with ``adapters`` merged in order by plain PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.state_dict()


# --- ELLA -------------------------------------------------------------------------------------

def test_ella_penalty_is_the_hand_computed_sum_of_squared_entrywise_products():
    from nlora.methods.ella import ella_penalty

    deltas = {"m1": torch.tensor([[1.0, -2.0], [0.5, 3.0]]),
              "m2": torch.tensor([[1.0, 1.0, 1.0]]),
              "m3": torch.tensor([[7.0]])}  # no past: not counted
    past = {"m1": torch.tensor([[2.0, 0.0], [-1.0, 1.0]]), "m2": torch.tensor([[1.0, 2.0, 3.0]])}
    # m1: (1·2)² + (−2·0)² + (0.5·−1)² + (3·1)² = 4 + 0 + 0.25 + 9; m2: 1 + 4 + 9
    assert float(ella_penalty(deltas, past, "sum")) == pytest.approx(13.25 + 14.0)
    assert float(ella_penalty(deltas, past, "mean")) == pytest.approx((13.25 + 14.0) / 2)
    assert ella_penalty(deltas, {}, "sum") is None


@pytest.mark.slow  # four two-task runs
def test_ella_with_a_zero_past_or_zero_lambda_is_plain_lora(tiny_llama_dir, data_dir, tmp_path):
    """λ = 0, or W_past = 0 (penalty and its gradient exactly zero): the very same adapters as
    IncLoRA, bit for bit; and the first task (no past) is IncLoRA's whatever λ."""
    from nlora.methods.ella import ELLA
    from nlora.methods.inclora import IncLoRA

    def zero_past(method, index):
        method.past = {k: torch.zeros_like(v) for k, v in method.past.items()}

    config = {"lora_r": 4, "tasks": TINY_TASKS}
    _run_tasks(IncLoRA(RunConfig(**config), False), tiny_llama_dir, data_dir, tmp_path / "inc")
    _run_tasks(ELLA(RunConfig(ella_lambda=0.0, **config), False), tiny_llama_dir, data_dir,
               tmp_path / "zero-lambda")
    zero = ELLA(RunConfig(ella_lambda=1e4, ella_reduce="sum", **config), False)
    _run_tasks(zero, tiny_llama_dir, data_dir, tmp_path / "zero-past", before=zero_past)
    assert zero.penalty is not None and zero.past  # the penalty ran, on a past of zeros
    strong = ELLA(RunConfig(ella_lambda=1e4, **config), False)
    _run_tasks(strong, tiny_llama_dir, data_dir, tmp_path / "strong")
    for j in range(2):
        want = load_file(tmp_path / f"inc/t{j}/adapter/adapter_model.safetensors")
        runs = ["zero-lambda", "zero-past"] + (["strong"] if j == 0 else [])
        for run in runs:
            got = load_file(tmp_path / f"{run}/t{j}/adapter/adapter_model.safetensors")
            assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want), run
    got = load_file(tmp_path / "strong/t1/adapter/adapter_model.safetensors")
    assert any(not got[k].equal(want[k]) for k in want)  # with a past, the penalty acts


@pytest.mark.slow  # three epochs of two tasks, twice
def test_ella_updates_less_where_earlier_tasks_wrote_than_lora(tiny_llama_dir, data_dir,
                                                               tmp_path):
    """A past that marks a fifth of each module's positions: ELLA's second-task update is
    much smaller there than IncLoRA's on the same data, and not much smaller elsewhere."""
    from nlora.methods.ella import ELLA
    from nlora.methods.inclora import IncLoRA
    from nlora.sparse import lora_deltas

    marked = {}

    def mark(method, index):
        if index == 1 and hasattr(method, "past"):  # 1.0 on random positions, 0 elsewhere
            gen = torch.Generator().manual_seed(5)
            for key, past in method.past.items():
                marked[key] = torch.rand(past.shape, generator=gen) < 0.2
                method.past[key] = marked[key].float()

    updates = {}
    for name, method in (("inc", IncLoRA(RunConfig(lora_r=4, tasks=TINY_TASKS), False)),
                         ("ella", ELLA(RunConfig(lora_r=4, ella_lambda=1.0, ella_reduce="sum",
                                                 tasks=TINY_TASKS), False))):
        real_end = method.end_task

        def spy(model, index, task, folder, real_end=real_end, name=name):
            updates[name, index] = lora_deltas(model)
            return real_end(model, index, task, folder)

        method.end_task = spy
        _run_tasks(method, tiny_llama_dir, data_dir, tmp_path / name, epochs=3, before=mark)
    for key, m in marked.items():
        ella, inc = updates["ella", 1][key].abs(), updates["inc", 1][key].abs()
        ratio_ella = float(ella[m].mean() / ella[~m].mean())
        ratio_inc = float(inc[m].mean() / inc[~m].mean())
        assert float(ella[m].mean()) < 0.5 * float(inc[m].mean()), key
        assert ratio_ella < ratio_inc, key  # and more there than elsewhere, relative to LoRA


def test_ella_saved_adapters_load_with_plain_peft(tiny_llama_dir, data_dir, tmp_path):
    from nlora.methods.ella import ELLA

    method = ELLA(RunConfig(lora_r=4, tasks=TINY_TASKS), False)
    _, states, _ = _run_tasks(method, tiny_llama_dir, data_dir, tmp_path)
    plain = _plain_peft_merged(tiny_llama_dir, [tmp_path / "t0/adapter", tmp_path / "t1/adapter"])
    for key, value in plain.items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=1e-6)


# --- JumpLoRA ---------------------------------------------------------------------------------

def test_jumplora_threshold_gets_the_straight_through_gradient_written_out_by_hand():
    from nlora.methods.jumplora import JumpDelta

    tau, eps, scaling = 0.1, 0.01, 2.0
    log_tau = torch.nn.Parameter(torch.tensor(math.log(tau)))
    layer = JumpDelta(torch.zeros(2, 3), rank=2, scaling=scaling, log_threshold=log_tau,
                      bandwidth=eps)
    with torch.no_grad():  # B·A = [[0.102, 0.5, 0], [−0.098, 0, 0]]
        layer.A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.B.copy_(torch.tensor([[0.102, 0.5], [-0.098, 0.0]]))
    raw = (layer.B @ layer.A).tolist()  # 0.102 and −0.098 lie within ε/2 of ±τ
    layer.blend = 1.0
    c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    delta = layer.delta()
    values = delta.detach()
    # forward: scaling·x where |x| > τ, exactly 0 elsewhere
    for i in range(2):
        for j in range(3):
            want = scaling * raw[i][j] if abs(raw[i][j]) > tau else 0.0
            assert float(values[i, j]) == pytest.approx(want, abs=1e-7)
    (c * delta).sum().backward()
    # dL/dτ = −(τ/ε)·[mean K((x−τ)/ε)·g − mean K((−x−τ)/ε)·g], g = c·scaling; dτ/dlog τ = τ
    def k(u):
        return 1.0 if -0.5 < u < 0.5 else 0.0
    pos = sum(k((raw[i][j] - tau) / eps) * c[i, j].item() * scaling
              for i in range(2) for j in range(3)) / 6
    neg = sum(k((-raw[i][j] - tau) / eps) * c[i, j].item() * scaling
              for i in range(2) for j in range(3)) / 6
    want = tau * (-(tau / eps) * (pos - neg))
    assert pos != 0 and neg != 0 and log_tau.grad is not None
    assert float(log_tau.grad) == pytest.approx(want, rel=1e-4)


def test_jumplora_merges_an_update_exactly_zero_below_the_learned_threshold(
    tiny_llama_dir, data_dir, tmp_path
):
    from nlora.methods.jumplora import JumpLoRA, jump_layers
    from nlora.sparse import read_sparse_delta

    config = RunConfig(lora_r=4, batch_size=4, epochs=3, tasks=TINY_TASKS)
    method = JumpLoRA(config, False)
    seen = {}
    real_end, real_begin = method.end_task, method.begin_task

    def spy_begin(model, index, task):
        seen["before", index] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_begin(model, index, task)

    def spy_end(model, index, task, folder):
        layers = jump_layers(model)
        seen["raw", index] = {n: (x.B @ x.A).detach().clone() for n, x in layers.items()}
        seen["tau", index] = float(method.log_threshold.detach().exp())
        seen["blend", index] = {x.blend for x in layers.values()}
        return real_end(model, index, task, folder)

    method.begin_task, method.end_task = spy_begin, spy_end
    model, states, _ = _run_tasks(method, tiny_llama_dir, data_dir, tmp_path, epochs=3)
    scaling = config.lora_alpha / config.lora_r
    for j in range(2):
        assert seen["blend", j] == {1.0}  # fully sparse at the end of the schedule
        tau = seen["tau", j]
        info = method.task_info(j)
        assert info["threshold"] == pytest.approx(tau)
        assert info["initial_threshold"] != pytest.approx(tau)  # τ moved: it got gradient
        saved = read_sparse_delta(tmp_path / f"t{j}/sparse_delta.safetensors")
        assert set(saved) == set(seen["raw", j])
        for name, raw in seen["raw", j].items():
            delta = saved[name].delta()
            below = raw.abs() <= tau
            assert below.any() and (~below).any()
            assert bool((delta[below] == 0).all())  # exactly zero, not small
            torch.testing.assert_close(delta[~below], scaling * raw[~below])
            weight = f"{name}.weight"  # the merged weights moved by exactly that update
            torch.testing.assert_close(states[j][weight] - seen["before", j][weight], delta)
    assert method.task_info(1)["density"] < 1.0
    assert not any("parametrizations" in k for k in model.state_dict())  # plain model again


# --- SLAO -------------------------------------------------------------------------------------

@pytest.mark.parametrize("b_init", ["finetuned", "merged"])
def test_slao_merges_b_as_the_running_update_and_starts_from_orthonormal_a(
    b_init, tiny_llama_dir, data_dir, tmp_path
):
    from nlora.adapters import lora_factors, module_key
    from nlora.methods.slao import SLAO

    method = SLAO(RunConfig(lora_r=4, slao_b_init=b_init, tasks=TINY_TASKS), False)
    starts, trained = {}, {}
    real_begin, real_end = method.begin_task, method.end_task

    def spy_begin(model, index, task):
        model = real_begin(model, index, task)
        starts[index] = {module_key(f.name): (f.A.detach().clone(), f.B.detach().clone())
                         for f in lora_factors(model)}
        return model

    def spy_end(model, index, task, folder):
        trained[index] = {module_key(f.name): (f.A.detach().clone(), f.B.detach().clone())
                          for f in lora_factors(model)}
        return real_end(model, index, task, folder)

    method.begin_task, method.end_task = spy_begin, spy_end
    _run_tasks(method, tiny_llama_dir, data_dir, tmp_path, n=3)
    saved = [load_file(tmp_path / f"t{j}/adapter/adapter_model.safetensors") for j in range(3)]
    for key in trained[0]:
        name = f"base_model.model.{key}"
        merged_b = torch.zeros_like(trained[0][key][1])
        for j in range(3):  # closed form: B_m,t = B_m,t-1 + (B_t − B_m,t-1)/√t
            a_t, b_t = trained[j][key]
            merged_b = merged_b + (b_t - merged_b) / math.sqrt(j + 1)
            torch.testing.assert_close(saved[j][f"{name}.lora_B.weight"], merged_b)
            assert saved[j][f"{name}.lora_A.weight"].equal(a_t)  # A ← A_t
            if j:
                a0, b0 = starts[j][key]
                torch.testing.assert_close(a0 @ a0.T, torch.eye(4), atol=1e-5, rtol=0)
                # the same row space as the previous A: projecting it on a0's rows keeps it
                prev = trained[j - 1][key][0]
                torch.testing.assert_close(prev @ a0.T @ a0, prev, atol=1e-5, rtol=0)
                want_b = (trained[j - 1][key][1] if b_init == "finetuned"
                          else saved[j - 1][f"{name}.lora_B.weight"])
                assert b0.equal(want_b)
    assert saved[1][f"{name}.lora_B.weight"].ne(trained[1][key][1]).any()  # really averaged


def test_slao_saved_adapter_answers_with_plain_peft(tiny_llama_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nlora.methods.slao import SLAO

    model, _, _ = _run_tasks(SLAO(RunConfig(lora_r=4, tasks=TINY_TASKS), False),
                             tiny_llama_dir, data_dir, tmp_path)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      tmp_path / "t1/adapter")
    ids = torch.randint(4, 100, (2, 7))
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


# --- SD-LoRA ----------------------------------------------------------------------------------

def test_sdlora_keeps_old_directions_and_learns_only_their_magnitudes_and_the_new_adapter(
    tiny_llama_dir, data_dir, tmp_path
):
    from nlora.methods.sdlora import SDLoRA, sd_layers

    config = RunConfig(lora_r=4, tasks=TINY_TASKS)
    method = SDLoRA(config, False)
    ended, started, trainable = {}, {}, {}
    real_begin, real_end = method.begin_task, method.end_task

    def spy_begin(model, index, task):
        model = real_begin(model, index, task)
        layers = sd_layers(model)
        started[index] = {n: x.delta().detach().clone() for n, x in layers.items()}
        trainable[index] = {id(p) for p in model.parameters() if p.requires_grad}
        expected = set()
        for x in layers.values():
            expected |= {id(x.A), id(x.B), id(x.alpha)} | {id(m) for m in x.magnitudes}
        assert trainable[index] == expected  # nothing else learns
        return model

    def spy_end(model, index, task, folder):
        ended[index] = {n: (x.A.detach().clone(), x.B.detach().clone(), float(x.alpha.detach()),
                            x.delta().detach().clone()) for n, x in sd_layers(model).items()}
        return real_end(model, index, task, folder)

    method.begin_task, method.end_task = spy_begin, spy_end
    model, _, _ = _run_tasks(method, tiny_llama_dir, data_dir, tmp_path, n=3)
    scaling = config.lora_alpha / config.lora_r
    layers = sd_layers(model)
    for name, layer in layers.items():
        for i in range(3):
            a, b, alpha, delta = ended[i][name]
            assert layer.old_A[i].equal(a) and layer.old_B[i].equal(b)  # frozen, bit for bit
            assert not layer.old_A[i].requires_grad and not layer.old_B[i].requires_grad
            if i < 2:  # the next task starts from the very function this task ended with
                torch.testing.assert_close(started[i + 1][name], delta, atol=1e-6, rtol=1e-5)
        # the first task's magnitude starts at α·s·‖B‖‖A‖ and was learned afterwards
        a, b, alpha, _ = ended[0][name]
        initial = alpha * scaling * float(b.norm() * a.norm())
        assert float(layer.magnitudes[0]) != pytest.approx(initial, rel=1e-6, abs=0)
        # the update is Σ m_i B_i A_i / (‖B_i‖‖A_i‖), written out here
        by_hand = sum(float(layer.magnitudes[i]) * (layer.old_B[i] @ layer.old_A[i])
                      / float(layer.old_B[i].norm() * layer.old_A[i].norm()) for i in range(3))
        torch.testing.assert_close(layer.delta().detach(), by_hand, atol=1e-6, rtol=1e-5)


def test_sdlora_saved_adapter_answers_with_plain_peft(tiny_llama_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nlora.methods.sdlora import SDLoRA

    model, _, _ = _run_tasks(SDLoRA(RunConfig(lora_r=4, tasks=TINY_TASKS), False),
                             tiny_llama_dir, data_dir, tmp_path)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      tmp_path / "t1/adapter")
    ids = torch.randint(4, 100, (2, 7))
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


# --- Merging baselines ------------------------------------------------------------------------

@pytest.mark.parametrize("combination", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_merge_answers_as_pefts_own_merge_of_the_saved_adapters(combination, tiny_llama_dir,
                                                                data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nlora.methods.merging import COMBINATIONS, Merge

    config = RunConfig(lora_r=4, merge_combination=combination, merge_weight=0.7,
                       merge_density=0.5, tasks=TINY_TASKS)
    model, _, _ = _run_tasks(Merge(config, False), tiny_llama_dir, data_dir, tmp_path)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                      tmp_path / "t0/adapter/task0", adapter_name="a")
    plain.load_adapter(tmp_path / "t1/adapter/task1", adapter_name="b")
    kind = COMBINATIONS[combination]
    torch.manual_seed(config.seed * 1000 + 1)  # the seed nlora gives the merge after task 2
    plain.add_weighted_adapter(["a", "b"], [0.7, 0.7], "m", combination_type=kind,
                               **({} if kind == "cat" else {"density": 0.5}))
    plain.set_adapter("m")
    ids = torch.randint(4, 100, (2, 7))
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    if combination == "task_arithmetic":  # and that is λ·(ΔW_1 + ΔW_2), summed here by hand
        from nlora.adapters import read_lora_updates

        first = read_lora_updates(tmp_path / "t0/adapter/task0")
        second = read_lora_updates(tmp_path / "t1/adapter/task1")
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "merged" in module.lora_A:
                key = name.removeprefix("base_model.model.")
                merged = (module.lora_B["merged"].weight @ module.lora_A["merged"].weight
                          * module.scaling["merged"])
                want = 0.7 * (first[key].scaling * first[key].B @ first[key].A
                              + second[key].scaling * second[key].B @ second[key].A)
                torch.testing.assert_close(merged.detach(), want, atol=1e-6, rtol=1e-5)


def test_jumplora_refuses_a_blend_that_ends_before_it_starts():
    from nlora.errors import ConfigError

    config = RunConfig(method="jumplora", jumplora_blend_start=0.8, jumplora_blend_end=0.2,
                       tasks=TINY_TASKS)
    with pytest.raises(ConfigError, match="--jumplora-blend-end 0.2 is before "
                       "--jumplora-blend-start 0.8"):
        config.validate()
