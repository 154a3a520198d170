"""GORP: the projected Adam step written out by hand (numpy's SVD as the reference), the shared
space's growth, and the defining property on a tiny model: later tasks' full-rank updates
have no component along the input directions earlier tasks stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TASKS
from safetensors.torch import load_file
from test_methods_after_nlora import _run_tasks

from nlora.config import RunConfig
from nlora.errors import ConfigError
from nlora.methods.gorp import GORP, GORPAdamW, extend_space, full_rank_weights


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return torch.tensor(q, dtype=torch.float32)


def test_one_step_is_adam_on_the_gradient_projected_off_s_then_onto_its_top_directions():
    rng = np.random.default_rng(0)
    out, dim, rank = 6, 5, 2
    g = rng.standard_normal((out, dim))
    s = _orthonormal(dim, 1, 1)
    weight = torch.nn.Parameter(torch.zeros(out, dim))  # zero: the update is read exactly
    start = weight.detach().clone()
    lora = torch.nn.Parameter(torch.ones(3))
    opt = GORPAdamW([lora], {"w": weight}, {"w": s}, learning_rate=1e-3, full_lr=1e-5,
                    weight_decay=0.0, rank=rank, refresh=10)
    for group in opt.param_groups:  # as the training loop sets the step's rate
        group["lr"] = 1e-3 * group.get("lr_scale", 1.0)
    weight.grad = torch.tensor(g, dtype=torch.float32)
    lora.grad = torch.zeros(3)
    opt.step()
    # by hand: G' = G − G S Sᵀ, P = top-2 right singular vectors of G', R = G' Pᵀ; Adam's
    # first step moves R by −lr · R / (|R| + eps) (bias-corrected moments are R and R²)
    s_np = s.double().numpy()
    g_proj = g - g @ s_np @ s_np.T
    p = np.linalg.svd(g_proj)[2][:rank]
    r = g_proj @ p.T
    expected = -1e-5 * (r / (np.abs(r) + 1e-8)) @ p
    assert np.allclose((weight.detach() - start).double().numpy(), expected, rtol=1e-4, atol=1e-11)
    assert np.abs((weight.detach() - start).double().numpy() @ s_np).max() < 1e-11
    opt.zero_grad()
    assert weight.grad is None and lora.grad is None


def test_the_projection_is_recomputed_every_refresh_steps_only():
    weight = torch.nn.Parameter(torch.zeros(4, 4))
    opt = GORPAdamW([], {"w": weight}, {}, learning_rate=1.0, full_lr=1.0, weight_decay=0.0,
                    rank=1, refresh=2)
    bases = []
    for i in range(3):
        weight.grad = torch.zeros(4, 4)
        weight.grad[i, i] = 1.0  # the top direction moves to e_i at every step
        opt.step()
        bases.append(opt.bases["w"].abs().argmax().item())
    assert bases == [0, 0, 2]  # steps 0 and 2 recompute P; step 1 keeps step 0's


def test_extend_space_adds_the_fewest_directions_holding_the_threshold_outside_s():
    # singular values 3, 2, 1 along e0, e1, e2 of R^4: squared shares 9/14, 4/14, 1/14
    moment = torch.zeros(3, 4)
    moment[0, 0], moment[1, 1], moment[2, 2] = 3.0, 2.0, 1.0
    assert extend_space(None, moment, 0.6).shape == (4, 1)  # 9/14 ≥ 0.6
    two = extend_space(None, moment, 0.9)  # 13/14 ≥ 0.9 > 9/14
    assert two.shape == (4, 2)
    assert torch.allclose((two @ two.T)[:2, :2].abs(), torch.eye(2), atol=1e-6)
    old = torch.zeros(4, 1)
    old[3, 0] = 1.0
    grown = extend_space(old, moment, 0.6)
    assert grown.shape == (4, 2) and grown[:, 0].equal(old[:, 0])
    assert torch.allclose(grown.T @ grown, torch.eye(2), atol=1e-6)


def test_later_full_rank_updates_leave_the_stored_input_directions_alone(tiny_llama_dir,
                                                                         data_dir, tmp_path):
    method = GORP(RunConfig(lora_r=4, gorp_full_lr=1e-2, gorp_rank=4, gorp_threshold=0.9,
                            tasks=TINY_TASKS[:3]), is_seq2seq=False)
    _, states, _ = _run_tasks(method, tiny_llama_dir, data_dir, tmp_path, n=3, lr=1e-2)
    base = load_file(tiny_llama_dir / "model.safetensors")
    keys = [k for k in base if k.endswith("self_attn.o_proj.weight")]
    assert len(keys) == 2
    saved = load_file(tmp_path / "t1/gorp_state.safetensors")
    for key in keys:
        module = key.removesuffix(".weight")
        space = saved[f"space.{module}"]  # S after task 2 (tasks 1 and 2 added to it)
        first = states[0][key] - base[key]
        assert first.abs().max() > 0  # the full-rank weight did train
        assert space.shape[1] >= 2
        assert torch.allclose(space.T @ space, torch.eye(space.shape[1]), atol=1e-5)
        third = states[2][key] - states[1][key]  # task 3's update, trained off S
        assert third.abs().max() > 0
        assert (third @ space).abs().max() <= 1e-5 * third.abs().max()
        # o_proj carries no LoRA here: the saved full-rank weight is the model's
        assert saved[f"weight.{module}"].equal(states[1][key])


def test_gorp_refuses_a_model_without_the_named_modules_and_fp16(tiny_llama_dir):
    from nlora.model import load_backbone

    model = load_backbone(str(tiny_llama_dir)).model
    assert set(full_rank_weights(model, ["auto"])) == {
        f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    with pytest.raises(ConfigError, match="--gorp-modules cross_attn"):
        full_rank_weights(model, ["cross_attn"])
    with pytest.raises(ConfigError, match="fp16"):
        GORP(RunConfig(precision="fp16"), is_seq2seq=False).check(model)
