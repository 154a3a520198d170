"""The model as it was after task T of a run (``nlora load RUN --task T``, or Python).

A task's saved adapter alone is not that model: N-LoRA (and O-LoRA, IncLoRA) train task T's
adapter on the base with tasks 1..T-1 merged, so it reproduces its predictions only there
(each adapter's ``loads_on.json`` says so). ``load_model`` replays the run's own restore
steps (the method's ``restore_task``, as a resumed run does) for tasks 1..T::

    from nlora.load import load_model
    loaded = load_model("runs/o1", task=2)
    loaded.model, loaded.tokenizer  # a transformers model (PEFT for seqlora / pertaskft)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nlora.config import RunConfig
from nlora.data import Task
from nlora.errors import ConfigError
from nlora.methods import get_method
from nlora.methods.base import ContinualMethod
from nlora.model import load_backbone
from nlora.rundir import finished_tasks, require_run_dir, restore_step, step_folders


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    config: RunConfig
    method: ContinualMethod
    task: int  # 1-based: the model is as it was after this task (step) was trained
    folders: list[Path]  # the task folders restored, in order
    is_seq2seq: bool


def task_shells(config: RunConfig, source: Path | str = "config.yaml") -> list[Task]:
    """The run's tasks by name only (no data is read). A name that is not CATEGORY/DATASET
    (a crafted config.yaml's ``SC/../../x``) would name a folder elsewhere: refused."""
    tasks = []
    for name in config.tasks:
        parts = str(name).split("/")
        if len(parts) != 2 or any(part in ("", ".", "..") or "\\" in part for part in parts):
            raise ConfigError(f"{source}: task {name!r} is not CATEGORY/DATASET; a run's task "
                              "folders are named from it, so nlora reads no such run")
        tasks.append(Task(name=name, category=parts[0], dataset=parts[1], labels=[]))
    return tasks


def load_model(run_dir: Path | str, task: int | None = None, device: str = "cpu") -> LoadedModel:
    """The model after task ``task`` (1-based; default: the last finished) of ``run_dir``."""
    run_dir = require_run_dir(run_dir)
    config = RunConfig.from_yaml(run_dir / "config.yaml")
    method_class = get_method(config.method)
    tasks = task_shells(config, run_dir / "config.yaml")
    done = finished_tasks(run_dir, tasks, method_class.joint)
    if done == 0:
        raise ConfigError(f"{run_dir} has no finished task yet")
    task = done if task is None else task
    if not 1 <= task <= done:
        raise ConfigError(f"--task {task}: {run_dir} has {done} finished task(s), 1..{done}")
    if not method_class.keeps_every_task and task != done:
        raise ConfigError(
            f"--task {task}: a {config.method} run keeps the full weights of its latest "
            f"finished task only ({done})"
        )
    backbone = load_backbone(config.model)
    method = method_class(config, backbone.is_seq2seq)
    folders = step_folders(run_dir, tasks, method.joint)[:task]
    model = backbone.model.to(device)
    for j, folder in enumerate(folders):
        model = restore_step(run_dir, method, model, j, tasks[j], folder)
    model = method.eval_model(model, task - 1)  # the adapter answering task T, where per task
    model.eval()
    return LoadedModel(model, backbone.tokenizer, config, method, task, folders,
                       backbone.is_seq2seq)


def verify_predictions(loaded: LoadedModel) -> tuple[int, int]:
    """Predict again what step ``loaded.task`` recorded in its predictions.jsonl (the test
    rows come from the run's data folder); return (matching, total)."""
    from nlora.batching import Encoder
    from nlora.evaluate import predict
    from nlora.runner import load_tasks

    config = loaded.config
    folder = loaded.folders[-1]
    recorded: dict[str, dict[int, str]] = {}
    for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        recorded.setdefault(row["task"], {})[row["index"]] = row["prediction"]
    tasks = load_tasks(config)
    encoder = Encoder(loaded.tokenizer, loaded.is_seq2seq, config.max_source_length,
                      config.truncation)
    matching = total = 0
    with torch.no_grad():
        for i, task in enumerate(tasks):
            if task.name not in recorded:
                continue
            model = loaded.method.eval_model(loaded.model, i)
            preds = predict(model, encoder, task.test, task.labels, config.eval_batch_size,
                            config.eval_mode, desc=f"verify {task.dataset}",
                            max_new_tokens=task.max_new_tokens)
            for p in preds:
                total += 1
                matching += recorded[task.name].get(p.index) == p.prediction
    loaded.method.eval_model(loaded.model, loaded.task - 1)
    return matching, total


def save_model(loaded: LoadedModel, out: Path | str) -> Path:
    """Save the loaded model as a plain Hugging Face model folder (adapters merged)."""
    from peft import PeftModel

    from nlora.io import prepare_output_folder, write_dir_atomic
    from nlora.rundir import refuse_output_in_run

    out = Path(out)
    run_dir = loaded.folders[0].parents[1] if loaded.folders else None
    refuse_output_in_run(out, [run_dir] if run_dir else [])
    prepare_output_folder(out)
    model = loaded.model
    if isinstance(model, PeftModel):  # seqlora / pertaskft: fold the answering adapter in
        model = model.merge_and_unload(adapter_names=list(model.active_adapters))

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)

    write_dir_atomic(out, fill)
    return out
