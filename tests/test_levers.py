"""The quality levers' config keys: their defaults (off, but prompt_loss_weight 0.1: README, "Recipes"), their ranges
and the combinations refused, every problem at once and naming its key; the help and the model card list them."""

from __future__ import annotations

import pytest

from qlorakit.cli import main
from qlorakit.config import ConfigError, build_config
from qlorakit.train.card import hyperparameter_rows

LEVERS = ("neftune_noise_alpha", "use_rslora", "loraplus_lr_ratio", "init_lora_weights", "use_dora",
          "prompt_loss_weight")


def test_levers_are_off_by_default_but_the_prompt_weight_that_won():
    cfg = build_config([])
    assert (cfg.neftune_noise_alpha, cfg.use_rslora, cfg.loraplus_lr_ratio, cfg.init_lora_weights, cfg.use_dora,
            cfg.prompt_loss_weight) == (0.0, False, 0.0, "default", False, 0.1)


def test_good_values_are_read():
    cfg = build_config(["--neftune_noise_alpha", "5", "--use_rslora", "true", "--loraplus_lr_ratio", "16",
                        "--init_lora_weights", "loftq", "--prompt_loss_weight", "0.1"])
    assert (cfg.neftune_noise_alpha, cfg.use_rslora, cfg.loraplus_lr_ratio, cfg.init_lora_weights,
            cfg.prompt_loss_weight) == (5.0, True, 16.0, "loftq", 0.1)
    assert build_config(["--use_dora", "true", "--init_lora_weights", "gaussian"]).use_dora is True


@pytest.mark.parametrize("args,message", [
    (["--neftune_noise_alpha", "-1"], "neftune_noise_alpha: must be >= 0, got -1.0"),
    (["--loraplus_lr_ratio", "0.5"], "loraplus_lr_ratio: must be 0 (off) or at least 1, got 0.5"),
    (["--prompt_loss_weight", "1.5"], "prompt_loss_weight: must be in [0, 1], got 1.5"),
    (["--prompt_loss_weight", "0.3", "--train_on_source", "true"],
     "prompt_loss_weight: train_on_source true already trains prompt tokens at weight 1"),
    (["--init_lora_weights", "loftq", "--bits", "16"], "init_lora_weights: loftq corrects the 4-bit quantization "
                                                       "error; it needs bits 4, got 16"),
    (["--init_lora_weights", "loftq", "--use_dora", "true"], "init_lora_weights: loftq with use_dora true is not "
                                                             "supported"),
    (["--init_lora_weights", "pissa"], "init_lora_weights: 'pissa' is not one of default, gaussian, loftq"),
])
def test_each_bad_value_is_refused_naming_its_key(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_config(args)


def test_all_lever_problems_at_once_in_one_line(capsys):
    assert main(["train", "--loraplus_lr_ratio", "0.5", "--prompt_loss_weight", "2", "--neftune_noise_alpha",
                 "-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert all(k in err for k in ("loraplus_lr_ratio", "prompt_loss_weight", "neftune_noise_alpha"))


def test_help_and_card_list_the_levers(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{k}" in out for k in LEVERS)
    rows = "\n".join(hyperparameter_rows(build_config(["--use_rslora", "true"])))
    assert all(f"| {k} |" in rows for k in LEVERS) and "| use_rslora | True |" in rows
