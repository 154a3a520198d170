"""Exact sparsity: metrics at exactly zero, proximal steps, pruning, sparse deltas,
collision-free masks, --l1-lambda auto; end to end on tiny models with real data."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TASKS, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from nlora.analysis import analyse_updates
from nlora.cli import main
from nlora.config import RunConfig
from nlora.errors import ConfigError, ModelError
from nlora.param_metrics import LoraUpdate, SparseUpdate
from nlora.rundir import load_task_updates
from nlora.sparse import (
    SPARSE_DELTA_FILE,
    keep_nonzero,
    mask_lora_layers,
    merge_sparse_delta,
    prune_to_density,
    read_sparse_delta,
    save_sparse_delta,
    shrink_factors_,
    support,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

FAST = ["--train-per-task", "8", "--test-per-task", "6", "--epochs", "2", "--batch-size", "4",
        "--lr", "2e-2", "--max-source-length", "64", "--seed", "5"]


def _run(model_dir, data_dir, out, *extra):
    return main(["run", "--model", str(model_dir), "--data", str(data_dir),
                 "--tasks", ",".join(TINY_TASKS), "--out", str(out), *FAST, *extra])


def _sparse(rows: list[list[float]]) -> SparseUpdate:
    return keep_nonzero(torch.tensor(rows))


# --------------------------------------------------------------------------------------------
# metrics at exactly zero, on hand-made matrices
# --------------------------------------------------------------------------------------------


def test_exact_zero_metrics_beside_the_relative_threshold():
    # relative τ = 0.01: 1e-6 entries read as zero; at exactly zero they count
    t1 = {"m": _sparse([[1.0, 0.0, 1e-6], [0.0, 0.0, 2.0]])}
    t2 = {"m": _sparse([[0.0, 3.0, 1e-6], [0.0, 0.0, 5.0]])}
    # a LoRA update with an exactly zero row: B's second row is 0
    a = torch.tensor([[1.0, 0.0, 2.0]])
    b = torch.tensor([[1.0], [0.0]])
    t3 = {"m": LoraUpdate(A=a, B=b, scaling=0.5)}  # ΔW = [[0.5, 0, 1], [0, 0, 0]]
    r = analyse_updates([t1, t2, t3], progress=False)
    pt, pairs, s = r["per_task"], r["pairs"], r["summary"]
    assert pt["density"] == pytest.approx([2 / 6, 2 / 6, 2 / 6])
    assert pt["density_exact"] == pytest.approx([3 / 6, 3 / 6, 2 / 6])
    # both non-zero: (1,2) at τ; (0,2) and (1,2) exactly
    assert pairs["cr"][0][1] == pytest.approx(1 / 6)
    assert pairs["cr_exact"][0][1] == pytest.approx(2 / 6)
    # task 3 writes (0,0) and (0,2): with task 1 at (0,0) [and (0,2) exactly]; with task 2
    # only at (0,2) exactly
    assert pairs["cr"][0][2] == pytest.approx(1 / 6)
    assert pairs["cr_exact"][0][2] == pytest.approx(2 / 6)
    assert pairs["cr"][1][2] == pytest.approx(0.0)
    assert pairs["cr_exact"][1][2] == pytest.approx(1 / 6)
    assert s["ACR"] == pytest.approx((1 / 6 + 1 / 6 + 0) / 3)
    assert s["ACR_exact"] == pytest.approx((2 / 6 + 2 / 6 + 1 / 6) / 3)
    assert s["density_exact"] == pytest.approx((3 / 6 + 3 / 6 + 2 / 6) / 3)
    # GSR has no threshold: ℓ1 / (√(mn) ℓ2) of the exact values
    dw1 = torch.tensor([1.0, 1e-6, 2.0], dtype=torch.float64)
    assert pt["gsr"][0] == pytest.approx(float(dw1.sum() / (math.sqrt(6) * dw1.norm())))
    # OO needs LoRA factors on both sides; AWOM = ‖ΔW_3 ΔW_1ᵀ‖_F computed densely
    assert pt["oo"][1] is None and pairs["oo"][0][2] is None and s["OO"] is None
    dw3 = torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]])
    dw1_full = torch.tensor([[1.0, 0.0, 1e-6], [0.0, 0.0, 2.0]])
    assert pairs["awom"][0][2] == pytest.approx(float(torch.linalg.norm(dw3 @ dw1_full.T)))
    assert r["per_module"]["m"]["rank"] == [None, None, 1]


def test_dense_lora_updates_have_no_exact_zero():
    g = torch.Generator().manual_seed(0)
    ups = [{"m": LoraUpdate(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), 2.0)}
           for _ in range(2)]
    r = analyse_updates(ups, progress=False)
    assert r["per_task"]["density_exact"] == [1.0, 1.0]
    assert r["summary"]["ACR_exact"] == 1.0


# --------------------------------------------------------------------------------------------
# proximal step, pruning, sparse-delta files
# --------------------------------------------------------------------------------------------


def _tiny_peft(tokenizer, r: int = 4):
    model = tiny_llama(tokenizer)
    config = LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def test_proximal_step_is_soft_thresholding(tokenizer):
    model = _tiny_peft(tokenizer)
    g = torch.Generator().manual_seed(1)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    shrink_factors_(model, 0.05)
    for name, p in params.items():
        x = before[name]
        expected = torch.where(x.abs() <= 0.05, torch.zeros_like(x), x - 0.05 * x.sign())
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
        assert int((p == 0).sum()) == int((x.abs() <= 0.05).sum()) > 0
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)


def test_pruning_keeps_the_largest_entries_exactly():
    dw = torch.tensor([[0.1, -5.0, 0.0, 2.0], [0.3, 0.0, -4.0, 1e-9]])
    kept = prune_to_density(dw, 0.25)  # 2 of 8
    assert kept.indices.tolist() == [1, 6] and kept.values.tolist() == [-5.0, -4.0]
    dense = kept.delta()
    assert int(torch.count_nonzero(dense)) == 2
    assert dense[0, 1] == -5.0 and dense[1, 2] == -4.0
    # asking for more than the non-zeros keeps just the non-zeros
    assert prune_to_density(dw, 1.0).indices.tolist() == [0, 1, 3, 4, 6, 7]
    assert prune_to_density(torch.zeros(3, 3), 0.5).indices.numel() == 0
    with pytest.raises(ValueError):
        prune_to_density(dw, 0.0)


def test_sparse_delta_file_round_trip_and_merge(tmp_path):
    updates = {
        "layers.0.q_proj": _sparse([[0.0, 1.5, 0.0], [-2.0, 0.0, 0.25]]),
        "layers.0.c_attn": _sparse([[0.0, 3.0], [0.0, 0.0], [7.0, 0.0]]),  # (out 3, in 2)
    }
    path = tmp_path / SPARSE_DELTA_FILE
    save_sparse_delta(updates, path)
    back = read_sparse_delta(path)
    assert set(back) == set(updates)
    for key, u in updates.items():
        assert back[key].shape == u.shape
        assert torch.equal(back[key].delta(), u.delta())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].q_proj = torch.nn.Linear(3, 2, bias=False)  # weight (out, in)
            self.layers[0].c_attn = Conv1D(3, 2)  # GPT-2 style: weight (in 2, out 3)

    net = Net()
    q0 = net.layers[0].q_proj.weight.detach().clone()
    c0 = net.layers[0].c_attn.weight.detach().clone()
    merge_sparse_delta(net, back)
    torch.testing.assert_close(net.layers[0].q_proj.weight.detach(),
                               q0 + updates["layers.0.q_proj"].delta(), rtol=0, atol=0)
    torch.testing.assert_close(net.layers[0].c_attn.weight.detach(),
                               c0 + updates["layers.0.c_attn"].delta().T, rtol=0, atol=0)

    with pytest.raises(ModelError, match="no module layers.9"):
        merge_sparse_delta(net, {"layers.9.q_proj": updates["layers.0.q_proj"]})
    wrong = {"layers.0.q_proj": _sparse([[1.0, 0.0], [0.0, 1.0]])}
    with pytest.raises(ModelError, match="layers.0.q_proj"):
        merge_sparse_delta(net, wrong)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match="not an nlora sparse delta"):
        read_sparse_delta(tmp_path / "other.safetensors")


def test_masked_forward_writes_only_allowed_positions(tokenizer):
    model = _tiny_peft(tokenizer)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    model.eval()
    ids = torch.randint(4, 200, (2, 7), generator=g)
    plain = model(input_ids=ids).logits
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    everything = {k: torch.ones_like(m.base_layer.weight, dtype=torch.bool)
                  for k, m in layers.items()}
    assert mask_lora_layers(model, everything) == len(layers) == 4
    torch.testing.assert_close(model(input_ids=ids).logits, plain)  # all allowed: same model

    allowed = {k: torch.rand(m.base_layer.weight.shape, generator=g) < 0.3
               for k, m in layers.items()}
    mask_lora_layers(model, allowed)
    x = torch.randn(3, 32, generator=g)
    for key, layer in layers.items():
        dw = layer.scaling["default"] * (layer.lora_B["default"].weight
                                         @ layer.lora_A["default"].weight)
        expected = layer.base_layer(x) + x @ (dw * allowed[key]).T
        torch.testing.assert_close(layer(x), expected)


# --------------------------------------------------------------------------------------------
# end to end: exact zeros, reload, collision-free, resume
# --------------------------------------------------------------------------------------------


def _done(run, folder):
    return json.loads((run / "tasks" / folder / "done.json").read_text())


FOLDERS = ("01-yelp", "02-agnews", "03-CB")


def test_pruned_run_has_exact_zeros_and_reloads_its_predictions(tiny_llama_dir, data_dir,
                                                                 tmp_path):
    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run, "--prune-density", "0.05") == 0
    updates = load_task_updates(run)
    assert len(updates) == 3
    for task, folder in zip(updates, FOLDERS, strict=True):
        assert (run / "tasks" / folder / SPARSE_DELTA_FILE).is_file()
        assert not (run / "tasks" / folder / "adapter").exists()
        for u in task.values():
            dense = u.delta()
            nonzero = int(torch.count_nonzero(dense))
            assert 0 < nonzero <= round(0.05 * dense.numel())
        total = sum(u.shape[0] * u.shape[1] for u in task.values())
        kept = sum(int(torch.count_nonzero(u.delta())) for u in task.values())
        assert _done(run, folder)["method"]["density"] == pytest.approx(kept / total)
    _check_reload(tiny_llama_dir, data_dir, run)


def test_proximal_run_has_exact_zeros_in_a_plain_peft_adapter(tiny_llama_dir, data_dir,
                                                              tmp_path):
    from nlora.adapters import read_lora_updates

    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run, "--prox-lambda", "0.5") == 0
    for folder in FOLDERS:
        adapter = run / "tasks" / folder / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file()
        task = read_lora_updates(adapter)
        zeros = sum(int((u.A == 0).sum() + (u.B == 0).sum()) for u in task.values())
        assert zeros > 0
        dws = [u.delta() for u in task.values()]
        density = sum(int(torch.count_nonzero(d)) for d in dws) / sum(d.numel() for d in dws)
        assert density < 1.0
        assert _done(run, folder)["method"]["density"] == pytest.approx(density)
    _check_reload(tiny_llama_dir, data_dir, run)


def _check_reload(model_dir, data_dir, run):
    """A fresh base model with tasks 1..3 merged from their files answers as the run did."""
    from nlora.batching import Encoder
    from nlora.config import RunConfig
    from nlora.evaluate import predict
    from nlora.families import load_task
    from nlora.methods.nlora import NLoRA
    from nlora.model import load_backbone

    config = RunConfig.from_yaml(run / "config.yaml")
    backbone = load_backbone(str(model_dir))
    method = NLoRA(config, is_seq2seq=False)
    model = backbone.model
    for j, folder in enumerate(FOLDERS):
        model = method.restore_task(model, j, None, run / "tasks" / folder)
    encoder = Encoder(backbone.tokenizer, False, config.max_source_length)
    recorded = [json.loads(line) for line in
                (run / "tasks/03-CB/predictions.jsonl").read_text().splitlines()]
    for name in TINY_TASKS:
        task = load_task(data_dir, name, config.train_per_task, config.test_per_task,
                         config.seed)
        preds = predict(model, encoder, task.test, task.labels, 8, config.eval_mode)
        assert [p.prediction for p in preds] == [
            r["prediction"] for r in recorded if r["task"] == name]


def test_collision_free_tasks_never_share_a_position(tiny_llama_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run, "--prune-density", "0.3",
                "--collision-free") == 0
    updates = load_task_updates(run)
    modules = list(updates[0])
    used_after = []
    union = {m: torch.zeros(updates[0][m].shape, dtype=torch.bool) for m in modules}
    for task in updates:
        for m in modules:
            mine = support(task[m])
            assert not (mine & union[m]).any(), f"{m}: a position written twice"
            union[m] |= mine
        used_after.append(sum(int(u.sum()) for u in union.values())
                          / sum(u.numel() for u in union.values()))
    recorded = [_done(run, f)["method"]["capacity_used"] for f in FOLDERS]
    assert recorded == pytest.approx(used_after)
    assert used_after[0] < used_after[1] < used_after[2] <= 0.91  # 3 × 0.3, rounded per module
    r = analyse_updates(updates, progress=False)
    assert r["summary"]["ACR_exact"] == 0.0
    _check_reload(tiny_llama_dir, data_dir, run)


@pytest.mark.slow  # end to end: make test (the fast tier) skips it
@pytest.mark.parametrize("extra", [
    ("--prune-density", "0.2", "--collision-free", "--l1-lambda", "auto", "--l1-auto-steps",
     "2"),
    ("--prox-lambda", "0.3", "--l1-lambda", "auto", "--l1-auto-steps", "2"),
])
def test_sparse_runs_resume_byte_identical(extra, tiny_llama_dir, data_dir, tmp_path,
                                           interrupt_training):
    assert _run(tiny_llama_dir, data_dir, tmp_path / "whole", *extra) == 0
    interrupt_training(1)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "cut", *extra) == 130
    interrupt_training(None)
    assert _run(tiny_llama_dir, data_dir, tmp_path / "cut", *extra) == 0
    for name in ("metrics.json",):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()
    for folder in FOLDERS:
        whole, cut = tmp_path / "whole/tasks" / folder, tmp_path / "cut/tasks" / folder
        files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(cut) for p in cut.rglob("*") if p.is_file())
        for f in files:
            if f.name == "done.json":  # holds wall-clock seconds
                a, b = json.loads((whole / f).read_text()), json.loads((cut / f).read_text())
                assert a["accuracy"] == b["accuracy"] and a["method"] == b["method"]
                assert a["train"]["last_loss"] == b["train"]["last_loss"]
            else:
                assert (whole / f).read_bytes() == (cut / f).read_bytes(), f
    lam = [_done(tmp_path / "whole", f)["method"]["l1_lambda"] for f in FOLDERS]
    assert all(x > 0 for x in lam)
    assert (tmp_path / "whole/run.log").read_text().count("--l1-lambda auto chose") == 3


# --------------------------------------------------------------------------------------------
# --l1-lambda auto, options
# --------------------------------------------------------------------------------------------


def test_auto_lambda_sets_the_penalty_to_ratio_times_task_loss(tokenizer):
    from nlora.methods.nlora import NLoRA

    config = RunConfig(lora_r=4, lora_alpha=8.0, l1_lambda="auto", l1_auto_ratio=0.5,
                       l1_auto_steps=3, target_modules=["q_proj", "v_proj"], tasks=["a"])
    method = NLoRA(config, is_seq2seq=False)
    model = method.begin_task(tiny_llama(tokenizer), 0, None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    optimizer = SimpleNamespace(param_groups=[{"lr": 1e-3}])
    losses = [2.0, 1.0, 0.6]
    for loss in losses:  # the training loop reports each step's loss, then steps
        assert method.penalty(model, 0, None, SimpleNamespace(loss=torch.tensor(loss))) is None
        method.observe_step(0, loss)
        method.after_step(model, 0, optimizer)
    params = dict(model.named_parameters())
    l1 = sum(float((2.0 * params[n.replace("lora_A", "lora_B")] @ p).detach().abs().sum())
             for n, p in params.items() if n.endswith("lora_A.default.weight"))
    expected = 0.5 * (sum(losses) / 3) / l1
    assert method.l1_lambda == pytest.approx(expected, rel=1e-5)
    info = method.task_info(0)
    assert info["l1_lambda"] == method.l1_lambda and info["l1_auto"]["steps"] == 3
    value = method.penalty(model, 0, None, SimpleNamespace(loss=torch.tensor(0.5)))
    assert float(value) == pytest.approx(0.5 * sum(losses) / 3, rel=1e-5)  # ratio × loss


@pytest.mark.parametrize("options, message", [
    (dict(collision_free=True), "needs exact zeros"),
    (dict(prune_density=0.0), "--prune-density must be a finite number > 0 and <= 1, got 0.0"),
    (dict(prune_density=1.5), "--prune-density must be a finite number > 0 and <= 1, got 1.5"),
    (dict(prox_lambda=-1.0), "--prox-lambda must be"),
    (dict(prune_density=0.1, method="olora"), "apply to --method nlora or inclora"),
    (dict(l1_lambda="often"), "--l1-lambda must be a number or a list of them, one per task or "
     "'auto', got 'often'"),
    (dict(l1_lambda="auto", l1_auto_steps=0), "--l1-auto-steps"),
])
def test_bad_sparsity_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(tasks=["a"], **options).validate()


def test_bad_sparsity_flag_is_one_line(data_dir, tmp_path, capsys):
    code = main(["run", "--data", str(data_dir), "--tasks", "CB", "--method", "seqlora",
                 "--prune-density", "0.1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--prune-density" in err
