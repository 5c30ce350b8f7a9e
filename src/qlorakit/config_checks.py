"""The config's range and combination checks, each problem naming its key: the general ones, then the quality
levers' (neftune_noise_alpha, use_rslora, loraplus_lr_ratio, init_lora_weights, use_dora, prompt_loss_weight).

``config.validate`` reports these with the choices it checks itself, every problem at once; the keys and their help
are in config.py.
"""

from __future__ import annotations

ANSWER_METRICS = ("exact_match", "token_f1", "rouge_l")  # metric_for_best_model's (metrics.METRICS, one layer up)
DATA_PAIRS = (("dataset", "datasets"), ("eval_dataset", "eval_datasets"))  # one string or a YAML list: not both


def value_problems(cfg) -> list[str]:
    """Every range or combination problem of ``cfg`` (a TrainConfig)."""
    problems = []
    positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "model_max_len",
                "logging_steps", "per_device_eval_batch_size"]
    for name in positive:
        if getattr(cfg, name) < 1:
            problems.append(f"{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        problems.append(f"learning_rate: must be > 0, got {cfg.learning_rate}")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    for name in ("weight_decay", "max_grad_norm", "eval_dataset_size", "save_total_limit",
                 "early_stopping_patience", "lora_alpha", "neftune_noise_alpha"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.eval_dataset_size >= 1 and not float(cfg.eval_dataset_size).is_integer():
        problems.append(f"eval_dataset_size: a count must be whole, got {cfg.eval_dataset_size}")
    for one, many in DATA_PAIRS:
        if getattr(cfg, many) and getattr(cfg, one) not in ("", "default"):
            problems.append(f"{one} and {many} are both set; give the data as {one} (one source, or a mixture as "
                            f"PATH:OPTION,PATH...) or as the {many} list, not both")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        problems.append("num_train_epochs: must be > 0 when max_steps is not set")
    if cfg.save_strategy == "steps" and cfg.save_steps < 1:
        problems.append(f"save_steps: must be at least 1, got {cfg.save_steps}")
    if cfg.eval_strategy == "steps" and cfg.eval_steps < 1:
        problems.append(f"eval_steps: must be at least 1, got {cfg.eval_steps}")
    if cfg.max_tokens_per_batch < 0:
        problems.append(f"max_tokens_per_batch: must be >= 0, got {cfg.max_tokens_per_batch}")
    elif 0 < cfg.max_tokens_per_batch < cfg.model_max_len:
        problems.append(f"max_tokens_per_batch: {cfg.max_tokens_per_batch} is below model_max_len "
                        f"{cfg.model_max_len}; raise it so every example fits one micro-batch")
    elif cfg.max_tokens_per_batch and not cfg.packing:
        problems.append("max_tokens_per_batch: needs packing true (it fills one padding-free row)")
    if cfg.max_nonfinite_steps < 1:
        problems.append(f"max_nonfinite_steps: must be at least 1, got {cfg.max_nonfinite_steps}")
    if cfg.early_stopping_patience and cfg.eval_strategy == "no":
        problems.append("early_stopping_patience: needs evaluation; set eval_strategy to steps or epoch")
    if cfg.load_best_model_at_end and cfg.eval_strategy == "no":
        problems.append("load_best_model_at_end: needs evaluation; set eval_strategy to steps or epoch")
    if cfg.eval_generate < 0 or cfg.eval_max_new_tokens < 1:
        problems.append(f"eval_generate, eval_max_new_tokens: must be >= 0 and >= 1, got {cfg.eval_generate} and "
                        f"{cfg.eval_max_new_tokens}")
    if cfg.metric_for_best_model in ANSWER_METRICS and cfg.method == "sft" and (not cfg.eval_generate or
                                                                                  cfg.train_on_source):
        problems.append(f"metric_for_best_model: {cfg.metric_for_best_model} scores generated answers; set "
                        "eval_generate above 0 (and train_on_source false, which leaves no prompt to answer)")
    return problems + lever_problems(cfg)


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
