"""Options declared once (nlora.options): the CLI, the checks, typed YAML reading and the docs
come from the declarations; methods register themselves; configs written before the
declarations existed still load and resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from nlora.cli import main
from nlora.config import OPTION_CLASSES, OPTIONS, RunConfig, read_options
from nlora.data import SAMPLE_DATA
from nlora.errors import ConfigError
from nlora.methods import METHODS
from nlora.options import option_table
from nlora.presets import make_config

OLD_CONFIGS = Path(__file__).parent / "data" / "configs_0.1"


def test_every_registered_method_is_in_help_docs_and_has_its_facts(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    table = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    for name, method in METHODS.items():
        assert name in text.split("--method {", 1)[1].split("}", 1)[0].split(","), name
        assert f"| `{name}` |" in table, f"docs/methods.md has no row for {name}"
        assert method.title and method.summary, name
    # every option of every method has a flag in --help
    for name, spec in OPTIONS.items():
        if spec.cli:
            assert (spec.flag or "--" + name.replace("_", "-")) in text, name


def test_docs_option_table_is_generated_from_the_declarations():
    doc = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    assert option_table(OPTION_CLASSES) in doc, "run: python scripts/make_options_doc.py"


@pytest.mark.parametrize("case", sorted(p.stem for p in OLD_CONFIGS.glob("*.yaml")))
def test_configs_written_by_nlora_0_1_load_and_equal_todays_config(case, tmp_path):
    # written by the code before options were declared once (commit ba4356c), from these
    # options; today's make_config must build the same settings from them
    text = (OLD_CONFIGS / f"{case}.yaml").read_text().replace("SAMPLE", str(SAMPLE_DATA))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    old = RunConfig.from_yaml(path)
    options = json.loads((OLD_CONFIGS / f"{case}.options.json").read_text())
    new = make_config(**options, data_dir=str(SAMPLE_DATA))
    # --protocol release learned since 0.1 what the releases' DeepSpeed scheduler does (two
    # steps at learning rate 0 per task) and how they average losses (loss_parts, 1 for this
    # script's single GPU): zero_lr_steps is the one setting such a config now differs in
    release = old.protocol == "release"
    assert set(new.differences(old)) == ({"zero_lr_steps"} if release else set())
    added = {"zero_lr_steps", "loss_parts"} if release else set()
    assert {k: v for k, v in new.preset_sources.items() if k not in added} == \
        old.preset_sources
    # and the file given back as --config gives today's config of the same options
    assert make_config(**read_options(path)).differences(new) == []


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("learning_rate: 1e-3\n", None),  # YAML reads 1e-3 as a string: still a number
    ("prefix_cache: 'no'\n", "prefix_cache must be true or false, got 'no'"),
    ("zero_shot: maybe\n", "zero_shot must be true or false, got 'maybe'"),
    ("model: null\n", "model needs a value"),
    ("tasks: 5\n", "tasks must be a list of names, got 5"),
    ("model: [a, b]\n", "model must be a string"),
    ("data_dir: 5\n", "data_dir must be a string, got 5"),
    ("target_modules: 5\n", "target_modules must be a list of names"),
    ("order: 5\n", "order must be a string, got 5"),
    ("method: [x]\n", "method must be a string"),
    ("instructions: [a, b]\n", "instructions must be a mapping"),
    ("lora_r: true\n", "lora_r must be a whole number, got True"),
    ("epochs: [1, two]\n", "epochs must be a whole number or a list of them"),
    ("preset_sources: 5\n", "preset_sources must be written by nlora"),
])
def test_config_file_values_are_read_as_their_declared_type(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    if message is None:
        assert read_options(path)["learning_rate"] == pytest.approx(1e-3)
        return
    with pytest.raises(ConfigError) as err:
        read_options(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_config_file_that_is_not_utf8_is_one_line(tmp_path):
    for encoding in ("utf-16", "latin-1"):
        path = tmp_path / f"{encoding}.yaml"
        path.write_bytes("model: café\n".encode(encoding))
        with pytest.raises(ConfigError, match="not UTF-8"):
            read_options(path)


@pytest.mark.parametrize(("options", "message"), [
    (dict(lora_r=99999999999999999999), "--lora-r must be a whole number of at least 1 and at "
     "most 65536, got 99999999999999999999"),
    (dict(epochs=99999999999999999999), "--epochs must be a whole number of at least 1 and at "
     "most 100000"),
    (dict(batch_size=99999999999), "--batch-size must be a whole number of at least 1 and at "
     "most 1048576"),
    (dict(prox_lambda=float("nan")), "--prox-lambda must be a finite number >= 0, got nan"),
    (dict(prox_lambda=float("inf")), "--prox-lambda must be a finite number >= 0, got inf"),
    (dict(lora_alpha=0), "--lora-alpha must be a finite number > 0, got 0"),
    (dict(l1_lambda="sometimes"), "l1_lambda must be a number or a list of them, one per task "
     "or 'auto', got 'sometimes'"),
    (dict(inflora_threshold=1.5), "--inflora-threshold must be a finite number > 0 and <= 1"),
    (dict(osf_preserve=[0.2, 1.0]), "--osf-preserve must be a finite number >= 0 and < 1, got "
     "1.0"),
])
def test_out_of_range_values_are_refused_naming_the_flag(options, message):
    with pytest.raises(ConfigError) as err:
        make_config(tasks=["SC/yelp", "TC/agnews"], data_dir=str(SAMPLE_DATA), **options)
    assert message in str(err.value)


def test_a_method_is_added_by_adding_one_file(tmp_path):
    # a copy of the package with one more file in methods/: its flag, its checks and its
    # choice exist without touching any other file
    shutil.copytree(REPO / "src" / "nlora", tmp_path / "nlora",
                    ignore=shutil.ignore_patterns("sample_data", "__pycache__"))
    (tmp_path / "nlora" / "methods" / "decayed.py").write_text('''
from dataclasses import dataclass

from nlora.methods.base import register
from nlora.methods.inclora import IncLoRA
from nlora.options import option


@dataclass
class DecayedOptions:
    decayed_weight: float = option(0.5, "weight of nothing at all", "float", "Decayed options",
                                   low=0, high=1)


@register
class Decayed(IncLoRA):
    name = "decayed"
    title = "Decayed"
    summary = "IncLoRA under another name, for a test"
    options = DecayedOptions
    defaults = {"learning_rate": 0.25}
''')
    script = f'''
from nlora.cli import build_parser
from nlora.errors import ConfigError
from nlora.presets import make_config
parser = build_parser()
config = make_config(tasks=["SC/yelp"], data_dir={str(SAMPLE_DATA)!r}, method="decayed")
print("lr", config.learning_rate, "weight", config.decayed_weight)
try:
    make_config(tasks=["SC/yelp"], data_dir={str(SAMPLE_DATA)!r}, decayed_weight=2.0)
except ConfigError as err:
    print("error", err)
try:
    parser.parse_args(["run", "--help"])
except SystemExit:
    pass
'''
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lr 0.25 weight 0.5" in out.stdout
    assert "error --decayed-weight must be a finite number >= 0 and <= 1, got 2.0" in out.stdout
    assert "--decayed-weight DECAYED_WEIGHT" in out.stdout and "decayed" in out.stdout
