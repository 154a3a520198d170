"""``nlora export``: the final model as a plain HF folder that reproduces the run's answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TASKS

from nlora.cli import main

TINY = ["--train-per-task", "8", "--test-per-task", "4", "--epochs", "1", "--batch-size", "4",
        "--lr", "5e-2", "--max-source-length", "64", "--seed", "3"]

# Loads a folder and answers prompts with transformers alone: nlora cannot be imported.
PLAIN = """
import json, sys
sys.modules["nlora"] = None
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
folder, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
seq2seq = AutoConfig.from_pretrained(folder).is_encoder_decoder
model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
out = []
for ids in prompts:  # token ids of each prompt (as nlora truncates them), one at a time
    ids = torch.tensor([ids])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new, do_sample=False, num_beams=1,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen = gen[0] if seq2seq else gen[0, ids.shape[1]:]
    out.append(tok.decode(gen, skip_special_tokens=True).strip())
print(json.dumps(out))
"""


def _run(model_dir, data_dir, out, *extra):
    return main(["run", "--model", str(model_dir), "--data", str(data_dir), "--tasks",
                 ",".join(TINY_TASKS), "--out", str(out), *TINY, *extra])


def _final_predictions(run: Path) -> list[dict]:
    last = sorted((run / "tasks").iterdir())[-1]
    return [json.loads(x) for x in (last / "predictions.jsonl").read_text().splitlines()]


def _nlora_predictions(folder: Path, data_dir: Path, name: str) -> list[str]:
    """Predictions of a plain folder through nlora's own evaluation (same batching)."""
    from nlora.batching import Encoder
    from nlora.evaluate import predict
    from nlora.families import load_task
    from nlora.model import load_backbone

    backbone = load_backbone(str(folder))
    task = load_task(data_dir, name, 8, 4, seed=3)
    encoder = Encoder(backbone.tokenizer, backbone.is_seq2seq, 64)
    return [p.prediction for p in predict(backbone.model, encoder, task.test, task.labels)]


def test_export_reproduces_the_runs_final_predictions(tiny_model_dir, data_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert _run(tiny_model_dir, data_dir, run) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not any(out.glob("adapter*")) and not any(out.glob("*.bin"))
    assert (out / "tokenizer_config.json").is_file()
    final = _final_predictions(run)
    for name in TINY_TASKS:
        expected = [r["prediction"] for r in final if r["task"] == name]
        assert _nlora_predictions(out, data_dir, name) == expected, name


def test_the_exported_folder_loads_without_nlora(tiny_llama_dir, data_dir, tmp_path):
    from nlora.batching import Encoder
    from nlora.families import load_task
    from nlora.model import load_backbone

    run, out = tmp_path / "run", tmp_path / "exported"
    assert _run(tiny_llama_dir, data_dir, run) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    task = load_task(data_dir, TINY_TASKS[0], 8, 4, seed=3)
    encoder = Encoder(load_backbone(str(tiny_llama_dir)).tokenizer, False, 64)
    prompts = [encoder.example_ids(e) for e in task.test]
    new_tokens = max(len(encoder.label_ids(label)) for label in task.labels) + 1
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, str(out), json.dumps(prompts), str(new_tokens)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    # one prompt at a time, unpadded: the run's batched answers, row by row
    expected = [r["prediction"] for r in _final_predictions(run) if r["task"] == TINY_TASKS[0]]
    assert plain == expected


@pytest.mark.slow  # end to end: make test (the fast tier) skips it
def test_a_per_task_method_exports_one_folder_per_task(tiny_llama_dir, data_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    assert _run(tiny_llama_dir, data_dir, run, "--method", "pertaskft") == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["01-yelp", "02-agnews", "03-CB"]
    final = _final_predictions(run)
    for folder, name in zip(folders, TINY_TASKS, strict=True):
        info = json.loads((out / folder / "nlora_export.json").read_text())
        assert info["answers_task"] == name
        expected = [r["prediction"] for r in final if r["task"] == name]
        assert _nlora_predictions(out / folder, data_dir, name) == expected, name


def test_export_of_an_unfinished_run_takes_the_last_finished_task(
    tiny_llama_dir, data_dir, tmp_path, interrupt_training
):
    interrupt_training(2)
    run = tmp_path / "run"
    assert _run(tiny_llama_dir, data_dir, run) == 130
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    info = json.loads((tmp_path / "e/nlora_export.json").read_text())
    assert (info["finished"], info["after"]) == (2, "02-agnews")
    answers = [json.loads(x) for x in (run / "tasks/02-agnews/predictions.jsonl").read_text()
               .splitlines()]
    expected = [r["prediction"] for r in answers if r["task"] == TINY_TASKS[0]]
    assert _nlora_predictions(tmp_path / "e", data_dir, TINY_TASKS[0]) == expected


@pytest.mark.parametrize("case", ["not-a-run", "not-empty"])
def test_export_errors_are_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    if case == "not-empty":
        (run / "config.yaml").write_text("tasks: [NLI/CB]\n")
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert ("not an nlora run" if case == "not-a-run" else "not empty") in err
