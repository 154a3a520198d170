"""A finished run's model as a plain Hugging Face folder (``nlora export RUN --out DIR``).

The model is rebuilt exactly as a resumed run rebuilds it (each finished task's
``restore_task``, in order), any adapter still separate is merged into the weights, and
the result is saved with ``save_pretrained`` (safetensors) beside the tokenizer. The folder
loads with ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` alone; nlora is not needed.

A per-task method (pertaskft: task i is answered by its own adapter) exports one folder per
task, ``DIR/NN-dataset/``, each with that task's adapter merged into the base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from nlora.config import RunConfig
from nlora.errors import ConfigError
from nlora.io import prepare_output_folder, write_dir_atomic
from nlora.load import task_shells
from nlora.methods import get_method
from nlora.model import Backbone, load_backbone
from nlora.rundir import (
    finished_tasks,
    refuse_output_in_run,
    require_run_dir,
    restore_step,
    step_folders,
)

log = logging.getLogger("nlora")

INFO_FILE = "nlora_export.json"  # where the folder came from (ignored by transformers)


def _merged(model: torch.nn.Module) -> PreTrainedModel:
    """The model with any LoRA adapter folded into its weights."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def _save(model: PreTrainedModel, backbone: Backbone, folder: Path, info: dict) -> None:
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        backbone.tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    write_dir_atomic(folder, fill)


def export_model(run_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Save the model after the last finished task of ``run_dir`` under ``out_dir``.

    Returns the folders written: ``[out_dir]``, or one per task for a per-task method.
    """
    run_dir, out_dir = require_run_dir(run_dir), Path(out_dir)
    refuse_output_in_run(out_dir, [run_dir])
    for leftover in prepare_output_folder(out_dir):
        log.info("removed %s, left by an interrupted export", leftover)
    config = RunConfig.from_yaml(run_dir / "config.yaml")
    method_class = get_method(config.method)
    tasks = task_shells(config, run_dir / "config.yaml")
    folders = step_folders(run_dir, tasks, method_class.joint)
    done = finished_tasks(run_dir, tasks, method_class.joint)
    if done == 0:
        raise ConfigError(f"{run_dir} has no finished task to export")
    info = {"run": str(run_dir.resolve()), "method": config.method, "model": config.model,
            "tasks": config.tasks, "finished": done}

    if method_class.per_task_model:
        written = []
        for i in range(done):
            backbone = load_backbone(config.model)
            method = method_class(config, backbone.is_seq2seq)
            model = restore_step(run_dir, method, backbone.model, i, tasks[i], folders[i])
            model = _merged(method.eval_model(model, i))
            target = out_dir / folders[i].name
            _save(model, backbone, target, {**info, "answers_task": tasks[i].name})
            written.append(target)
        return written

    backbone = load_backbone(config.model)
    method = method_class(config, backbone.is_seq2seq)
    model = backbone.model
    for j in range(done):
        model = restore_step(run_dir, method, model, j, tasks[j], folders[j])
    model = _merged(method.eval_model(model, done - 1))
    _save(model, backbone, out_dir, {**info, "after": folders[done - 1].name})
    return [out_dir]
