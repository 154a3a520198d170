"""The N-LoRA penalty and the adapter life cycle: train, save, merge, reload with plain PEFT."""

from __future__ import annotations

import torch
from conftest import tiny_llama, tiny_t5
from peft import PeftModel
from transformers import AutoModelForCausalLM

from nlora.batching import Encoder
from nlora.config import RunConfig
from nlora.evaluate import generate_answers
from nlora.families import load_task
from nlora.methods.nlora import NLoRA, l1_penalty


def _randomise_lora(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _explicit_l1(model: torch.nn.Module, scaling: float) -> torch.Tensor:
    """Σ ‖scaling · B @ A‖₁ from the parameter list alone (independent of nlora's walk)."""
    params = dict(model.named_parameters())
    total = torch.zeros(())
    for name, A in params.items():
        if name.endswith("lora_A.default.weight"):
            B = params[name.replace("lora_A", "lora_B")]
            total = total + (scaling * (B @ A)).abs().sum()
    return total


def _check_penalty(model, config):
    method = NLoRA(config, is_seq2seq=model.config.is_encoder_decoder)
    peft_model = method.begin_task(model, 0, None)
    _randomise_lora(peft_model)
    shapes = {
        tuple(m.weight.shape) for n, m in peft_model.named_modules() if n.endswith("base_layer")
    }
    scaling = config.lora_alpha / config.lora_r
    ours = l1_penalty(peft_model)
    ref = _explicit_l1(peft_model, scaling)
    torch.testing.assert_close(ours, ref)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(ours, params)
    ref_grads = torch.autograd.grad(ref, params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    # λ scales the term added to the loss
    method.l1_lambda = 0.25
    torch.testing.assert_close(method.penalty(peft_model, 0, None, None), 0.25 * ref)
    return shapes


def test_l1_penalty_equals_explicit_norm_llama(tokenizer):
    # q_proj 32x32 (square), v_proj 16x32 (2 key-value heads of 8)
    shapes = _check_penalty(tiny_llama(tokenizer), RunConfig(lora_r=4, lora_alpha=8.0))
    assert shapes == {(32, 32), (16, 32)}


def test_l1_penalty_equals_explicit_norm_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=4,
        decoder_start_token_id=0,
    )
    shapes = _check_penalty(
        T5ForConditionalGeneration(config),
        RunConfig(lora_r=4, lora_alpha=16.0, target_modules=["q", "v", "o"]),
    )
    assert shapes == {(64, 32), (32, 64)}
    shapes = _check_penalty(tiny_t5(tokenizer), RunConfig(lora_r=4, target_modules=["q", "wi"]))
    assert shapes == {(32, 32), (64, 32)}


def test_task1_weights_stay_frozen_and_its_adapter_reloads_with_plain_peft(
    tokenizer, tiny_llama_dir, data_dir
):
    from accelerate import Accelerator

    from nlora.adapters import lora_factors
    from nlora.model import load_backbone
    from nlora.train import train_task

    config = RunConfig(lora_r=4, l1_lambda=1e-3, learning_rate=1e-2, epochs=1, batch_size=4)
    backbone = load_backbone(str(tiny_llama_dir))
    encoder = Encoder(backbone.tokenizer, False, 128)
    tasks = [load_task(data_dir, n, 8, 6, seed=0) for n in ("yelp", "agnews")]
    method = NLoRA(config, is_seq2seq=False)
    accelerator = Accelerator(cpu=True)

    def learn(model, index, folder):
        torch.manual_seed(index)
        model = method.begin_task(model, index, tasks[index])
        model, _ = train_task(model, method, index, tasks[index].train, encoder, accelerator,
                              1e-2, 1, 4, 0.0, seed=index)
        return model

    tmp = tiny_llama_dir.parent / "lifecycle"
    model = learn(backbone.model, 0, tmp / "t1")
    model = method.end_task(model, 0, tasks[0], tmp / "t1")
    after_task1 = {k: v.clone() for k, v in model.state_dict().items()}
    preds_task1 = generate_answers(model, encoder, tasks[0].test, tasks[0].labels)

    peft_model = learn(model, 1, tmp / "t2")
    # every weight of the base (holding task 1's merged update) is untouched by task 2
    for name, param in peft_model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
            torch.testing.assert_close(param, after_task1[key], rtol=0, atol=0)
    delta2 = {f.name.replace("base_model.model.", "", 1): (f.scaling * f.B @ f.A).detach()
              for f in lora_factors(peft_model)}
    assert any(d.abs().sum() > 0 for d in delta2.values()), "task 2 learned nothing"
    merged = method.end_task(peft_model, 1, tasks[1], tmp / "t2")
    for module, delta in delta2.items():
        torch.testing.assert_close(
            merged.state_dict()[f"{module}.weight"], after_task1[f"{module}.weight"] + delta
        )

    # plain PEFT: fresh base + task 1's saved adapter answers exactly as after task 1
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reloaded = PeftModel.from_pretrained(base, tmp / "t1" / "adapter")
    assert [p.prediction for p in generate_answers(
        reloaded, encoder, tasks[0].test, tasks[0].labels)] == [p.prediction for p in preds_task1]
