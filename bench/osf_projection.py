"""How far OSF's update leaves the preserved singular directions, per optimizer and projection.

PEFT's OSF tuner projects gradients out of the top-k singular directions of each weight.
AdamW rescales every gradient entry on its own, so its steps need not stay outside them;
nlora's default (``--osf-projection parameter``) also projects the parameters after each step.
A tiny random LLaMA, ``q_proj`` of every layer, effective rank 8, random tokens:

    .venv/bin/python bench/osf_projection.py [--steps 20] [--lr 1e-2]

prints ‖U_highᵀ ΔW‖ / ‖ΔW‖ and ‖ΔW V_highᵀ‖ / ‖ΔW‖ (layer 0) and writes
bench/results/osf_projection.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import OSFConfig, get_peft_model
from peft.tuners.osf import OSFLayer
from transformers import LlamaConfig, LlamaForCausalLM

from nlora.methods.osf import project_out


def leakage(optimizer: str, projection: str, steps: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config),
                           OSFConfig(target_modules=["q_proj"], effective_rank=8))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr * 10))
    for _ in range(steps):
        ids = torch.randint(4, 500, (4, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if projection == "parameter":
            for module in model.modules():
                if isinstance(module, OSFLayer):
                    project_out(module)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default").detach().double()
    u, _, vh = torch.linalg.svd(layer.base_layer.weight.detach())
    u, vh = u[:, :8].double(), vh[:8].double()
    return {"optimizer": optimizer, "projection": projection,
            "left": float((u.T @ delta).norm() / delta.norm()),
            "right": float((delta @ vh.T).norm() / delta.norm()),
            "delta_norm": float(delta.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW lr (SGD: 10x)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [leakage(o, p, args.steps, args.lr, args.seed)
            for o, p in (("adamw", "gradient"), ("sgd", "gradient"), ("adamw", "parameter"))]
    print(f"{'optimizer':<10}{'projection':<12}{'|UhT dW|/|dW|':>15}{'|dW VhT|/|dW|':>15}"
          f"{'|dW|':>10}")
    for r in rows:
        print(f"{r['optimizer']:<10}{r['projection']:<12}{r['left']:>15.2e}{r['right']:>15.2e}"
              f"{r['delta_norm']:>10.3g}")
    out = Path(__file__).parent / "results" / "osf_projection.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
