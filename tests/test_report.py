"""``nlora report`` end to end on run directories holding real PEFT adapters of a tiny model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from nlora.analysis import analyse_run
from nlora.cli import main
from nlora.rundir import load_task_updates

# PEFT calls a transformers method deprecated in v5
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TASKS = ["SC/amazon", "TC/dbpedia", "TC/agnews"]
TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def tiny_peft(r: int, alpha: float, rslora: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def fill_lora(model, seed: int, keep: float) -> dict[str, torch.Tensor]:
    """Seeded random factors; ``keep`` < 1 zeroes most of B's rows and A's columns so that ΔW
    is sparse. Returns PEFT's own ΔW per module, to check the loader against."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g) * (torch.rand(1, a.shape[1],
                                                                        generator=g) < keep))
                b.copy_(torch.randn(b.shape, generator=g) * (torch.rand(b.shape[0], 1,
                                                                        generator=g) < keep))
                key = name.removeprefix("base_model.model.")
                deltas[key] = module.get_delta_weight("default").clone()
    return deltas


def make_run(root: Path, name: str, method: str, keep: list[float] | None,
             rslora: bool = False, extra: dict | None = None) -> tuple[Path, list[dict]]:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": "tiny-llama", "method": method, "tasks": TASKS, "lora_r": 4, "lora_alpha": 8,
        "l1_lambda": 0.4 if method == "nlora" else 0.0, "seed": 0}))
    acc = [[70.0, 60.0, 55.0], [None, 80.0, 72.0], [None, None, 90.0]]
    metrics = {"tasks": TASKS, "accuracy": acc,
               "summary": {"AA": (55 + 72 + 90) / 3, "F.Ra": 11.5, "BWT": -11.5}}
    metrics.update(extra or {})
    (run / "metrics.json").write_text(json.dumps(metrics))
    deltas = []
    for k, task in enumerate(TASKS):
        folder = run / "tasks" / f"{k + 1:02d}-{task.split('/')[1]}"
        folder.mkdir(parents=True)
        (folder / "done.json").write_text("{}")
        (folder / "predictions.jsonl").write_text("")
        if keep is not None:
            model = tiny_peft(r=4, alpha=8, rslora=rslora)
            deltas.append(fill_lora(model, seed=100 * k + len(name), keep=keep[k]))
            model.save_pretrained(folder / "adapter")
    return run, deltas


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    olora, olora_deltas = make_run(root, "olora", "olora", keep=[1.0, 1.0, 1.0],
                                   extra={"zero_shot": [20.0, 10.0, 30.0]})
    nlora, nlora_deltas = make_run(
        root, "nlora", "nlora", keep=[0.5, 0.3, 0.3], rslora=True,
        extra={"unseen": {"NLI/CB": [30.0, 35.0, 41.0]},
               "zero_shot": [20.0, 10.0, 30.0]})
    full, _ = make_run(root, "seqft", "seqft", keep=None)
    return {"olora": olora, "nlora": nlora, "seqft": full,
            "deltas": {"olora": olora_deltas, "nlora": nlora_deltas}}


def test_loader_matches_peft_delta_weight(runs: dict) -> None:
    # orientation and scaling (alpha/r, and alpha/√r under rsLoRA) as PEFT itself computes ΔW
    for name in ("olora", "nlora"):
        updates = load_task_updates(runs[name])
        assert len(updates) == 3
        for task, expected in zip(updates, runs["deltas"][name], strict=True):
            assert sorted(task) == sorted(expected)
            assert "model.layers.0.self_attn.q_proj" in task
            for module, delta in expected.items():
                assert torch.allclose(task[module].delta(), delta, atol=1e-6)
    assert load_task_updates(runs["nlora"])[0]["model.layers.0.self_attn.q_proj"].scaling == 4.0
    assert load_task_updates(runs["olora"])[0]["model.layers.0.self_attn.q_proj"].scaling == 2.0
    assert load_task_updates(runs["seqft"]) == []


def test_analyse_run(runs: dict) -> None:
    dense = analyse_run(runs["olora"], progress=False)
    sparse = analyse_run(runs["nlora"], progress=False)
    p, q = dense["parameter"], sparse["parameter"]
    assert len(p["modules"]) == 4  # q_proj and v_proj in 2 layers
    assert q["summary"]["GSR"] < p["summary"]["GSR"]
    assert q["summary"]["ACR"] < p["summary"]["ACR"]
    # summed OO of the last task is the sum over modules of its per-module pair terms
    per_module = sum(m["oo"][0][2] + m["oo"][1][2] for m in p["per_module"].values())
    assert p["summary"]["OO"] == pytest.approx(per_module)
    assert p["pairs"]["cr"][0][1] == p["pairs"]["cr"][1][0]
    assert all(1 <= u <= 4 for u in p["per_task"]["subspace_use"])
    curve = p["acr_curve"]["acr"]
    assert curve == sorted(curve, reverse=True) and curve[-1] == 0.0
    assert dense["scores"]["FWT"] is None and dense["notes"]  # only seen tasks evaluated
    assert sparse["unseen"]["NLI/CB"]["final"] == 41.0
    full = analyse_run(runs["seqft"], progress=False)
    assert full["parameter"] is None and "no LoRA adapters" in full["notes"][0]
    assert json.loads(json.dumps(dense, allow_nan=False))  # NaN-free, strict JSON


def test_report_writes_every_figure_and_table(runs: dict, tmp_path: Path) -> None:
    out = Path(os.environ.get("NLORA_REPORT_KEEP", tmp_path / "report"))  # to view the PNGs
    argv = [str(runs[k]) for k in ("olora", "nlora", "seqft")]
    argv += ["--out", str(out), "--module", "layers.1.self_attn.v_proj", "--pair", "1", "3"]
    assert main(["report", *argv]) == 0
    expected = ["report.md", "metrics.json", "gsr_vs_acr.png", "acr_curves.png",
                "subspace_use.png", "unseen.png"]
    expected += [f"{run}_accuracy.png" for run in ("olora", "nlora", "seqft")]
    expected += [f"{run}_collision.png" for run in ("olora", "nlora")]
    for name in expected:
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert matplotlib.image.imread(png).shape[0] > 100
    assert not (out / "seqft_collision.png").exists()
    md = (out / "report.md").read_text()
    for figure in expected[2:]:
        assert f"({figure})" in md
    assert ("| run | method | T | AA | pooled AA | F.Ra | BWT | FWT | OO | AWOM | GSR | "
            "density (τ 0.01 rel) | density (exact) | ACR (τ 0.01 rel) | ACR (exact) |") in md
    assert "no LoRA adapters" in md and "layers.1.self_attn.v_proj" in md
    data = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in data] == ["olora", "nlora", "seqft"]
    assert data[1]["parameter"]["threshold"] == {"value": 0.01, "mode": "relative"}


def test_report_options_and_errors(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "abs"
    argv = [str(runs["nlora"]), "--out", str(out), "--threshold", "1e-3",
            "--threshold-mode", "absolute", "--awom-norm", "spectral", "--module", "nomatch"]
    assert main(["report", *argv]) == 0
    data = json.loads((out / "metrics.json").read_text())[0]["parameter"]
    assert data["threshold"] == {"value": 1e-3, "mode": "absolute"}
    assert data["awom_norm"] == "spectral"
    assert not math.isnan(data["summary"]["AWOM"])
    assert "no module matches" in (out / "report.md").read_text()
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_accuracy_heatmap_draws_a_joint_runs_one_column_matrix(tmp_path: Path) -> None:
    # mtl trains once on every task: T rows, one column (it made `nlora report` fail)
    from nlora.figures import accuracy_heatmap

    run = {"name": "mtl", "tasks": ["SST-2", "agnews", "dbpedia"],
           "accuracy": [[50.0], [33.3], [None]], "scores": {"AA": 41.7}}
    path = accuracy_heatmap(run, tmp_path / "mtl_accuracy.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100


# --- SeqLoRA's per-task update, the method behind a label, no silent gaps (issue 25) ----------

def test_seqlora_update_is_a_difference_of_rank_2r_without_an_oo(tmp_path: Path) -> None:
    """SeqLoRA saves one adapter after every task: task t's update is adapter t − adapter t-1,
    factored with 2r columns (its rank can reach 2r), and it has no A of its own, so OO (on A)
    is n/a where AWOM (on ΔW) stays."""
    run, adapters = make_run(tmp_path, "seq", "seqlora", keep=[1.0, 1.0, 1.0])
    updates = load_task_updates(run, cumulative=True)
    module = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(updates[1][module].delta(),
                               adapters[1][module] - adapters[0][module], atol=1e-6, rtol=0)
    assert updates[1][module].A.shape[0] == 8  # r = 4 of adapter 2 and 4 of adapter 1
    assert torch.linalg.matrix_rank(updates[1][module].delta(torch.float64)) == 8
    result = analyse_run(run, progress=False)
    p = result["parameter"]
    assert p["summary"]["rank"] == 8 and p["per_module"][module]["rank"] == [4, 8, 8]
    assert p["summary"]["OO"] is None and p["per_task"]["oo"] == [None] * 3
    assert p["summary"]["AWOM"] is not None
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    row = next(line for line in (out / "report.md").read_text().splitlines()
               if line.startswith("| seq |"))
    assert row.split(" | ")[8] == "n/a"  # the OO column


def test_collision_map_reads_seqlora_differences_whatever_the_label(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The label of a SeqLoRA run with --l1-lambda auto is 'seqlora+λauto'; the collision map
    must still compare task updates (adapter differences), not the saved adapters."""
    from nlora import figures

    run, adapters = make_run(tmp_path, "seq", "seqlora", keep=[1.0, 1.0, 1.0])
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "l1_lambda": "auto"}))
    drawn = []
    monkeypatch.setattr(figures, "collision_map",
                        lambda dw_i, dw_j, *args, **kwargs: drawn.append((dw_i, dw_j)))
    module = "model.layers.0.self_attn.q_proj"
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--module", module]) == 0
    assert "seqlora+λauto" in (tmp_path / "r" / "report.md").read_text()
    (dw_1, dw_2), = drawn
    torch.testing.assert_close(dw_1, adapters[0][module], atol=1e-6, rtol=0)
    torch.testing.assert_close(dw_2, adapters[1][module] - adapters[0][module], atol=1e-6, rtol=0)


def test_a_finished_task_without_its_update_is_named_not_skipped(tmp_path: Path) -> None:
    from nlora.errors import ConfigError

    run, _ = make_run(tmp_path, "gap", "nlora", keep=[1.0, 1.0, 1.0])
    import shutil

    shutil.rmtree(run / "tasks" / "02-dbpedia" / "adapter")  # task 3's is still there
    with pytest.raises(ConfigError, match=r"02-dbpedia is finished \(done.json\) but holds no "
                       r"adapter"):
        load_task_updates(run)


def test_updates_of_different_modules_are_an_error_not_a_smaller_analysis() -> None:
    from nlora.analysis import analyse_updates
    from nlora.param_metrics import LoraUpdate

    def update(seed: int) -> LoraUpdate:
        g = torch.Generator().manual_seed(seed)
        return LoraUpdate(A=torch.randn(2, 4, generator=g), B=torch.randn(4, 2, generator=g),
                          scaling=1.0)

    tasks = [{"q": update(0), "v": update(1)}, {"q": update(2)}]
    with pytest.raises(ValueError, match=r"task 2's update and task 1's adapt different "
                       r"modules \(1 in one only, e.g. v\)"):
        analyse_updates(tasks, progress=False)


def test_an_unfinished_runs_forgetting_is_over_its_finished_tasks(tmp_path: Path) -> None:
    """Two of three tasks finished: F.Ra so far = max(a[0][0]) − a[0][1] = 70 − 60, by hand,
    with a note saying so (the full matrix's missing column is no error)."""
    run, _ = make_run(tmp_path, "half", "nlora", keep=[1.0, 1.0, 1.0])
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["accuracy"] = [[70.0, 60.0, None], [None, 80.0, None], [None, None, None]]
    metrics["finished"] = 2
    del metrics["summary"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    result = analyse_run(run, progress=False)
    assert result["scores"]["F.Ra"] == 10.0
    assert "unfinished run (2 of 3 tasks): F.Ra over the first 2" in result["notes"]
