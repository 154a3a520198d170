"""nlora: continual learning of language models with sparse low-rank adapters (N-LoRA).

What a notebook needs, importable from the top level (loaded on first use, so ``import
nlora`` stays light)::

    import nlora
    config = nlora.make_config(tasks=["dbpedia", "agnews"], epochs=1)  # defaults as the CLI
    metrics = nlora.run(config, "runs/nb")            # resumes if the folder holds this run
    print(nlora.format_results(metrics))
    nlora.write_report(["runs/nb"], "report/")        # Markdown + figures
    nlora.export_model("runs/nb", "exported/")        # plain HF folder
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "RunConfig": ("nlora.config", "RunConfig"),
    "make_config": ("nlora.presets", "make_config"),
    "read_options": ("nlora.config", "read_options"),
    "run": ("nlora.runner", "run"),
    "compare_methods": ("nlora.compare", "compare"),  # not "compare": that is a submodule
    "format_results": ("nlora.tables", "format_results"),
    "read_metrics": ("nlora.rundir", "read_metrics"),
    "analyse_run": ("nlora.analysis", "analyse_run"),
    "write_report": ("nlora.report", "write_report"),
    "export_model": ("nlora.export", "export_model"),
    "list_tasks": ("nlora.catalog", "list_tasks"),
    "load_task": ("nlora.data", "load_task"),
    "run_demo": ("nlora.demo", "run_demo"),
    "run_study": ("nlora.study.driver", "run_study"),  # nlora study SPEC --out STUDY
    "write_study_report": ("nlora.study.report", "write_study_report"),
    "format_demo": ("nlora.demo", "format_demo"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'nlora' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
