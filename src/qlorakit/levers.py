"""The quality levers' config checks (neftune_noise_alpha, use_rslora, loraplus_lr_ratio, init_lora_weights,
use_dora, prompt_loss_weight): their ranges and the combinations that cannot work, each naming its key.

``config.validate`` reports these with every other problem; the keys themselves and their help are in config.py.
"""

from __future__ import annotations


def lever_problems(cfg) -> list[str]:
    """Every problem with the levers of ``cfg`` (a TrainConfig); neftune_noise_alpha >= 0 is checked with the other
    non-negative keys."""
    problems = []
    if cfg.loraplus_lr_ratio and cfg.loraplus_lr_ratio < 1:
        problems.append(f"loraplus_lr_ratio: must be 0 (off) or at least 1, got {cfg.loraplus_lr_ratio}")
    if not 0 <= cfg.prompt_loss_weight <= 1:
        problems.append(f"prompt_loss_weight: must be in [0, 1], got {cfg.prompt_loss_weight}")
    elif cfg.prompt_loss_weight and cfg.train_on_source:
        problems.append("prompt_loss_weight: train_on_source true already trains prompt tokens at weight 1; set "
                        "one of them")
    if cfg.init_lora_weights == "loftq" and cfg.bits != 4:
        problems.append(f"init_lora_weights: loftq corrects the 4-bit quantization error; it needs bits 4, got "
                        f"{cfg.bits}")
    if cfg.init_lora_weights == "loftq" and cfg.use_dora:
        problems.append("init_lora_weights: loftq with use_dora true is not supported (DoRA's magnitudes are set "
                        "before the LoftQ init); set one of them")
    return problems
