"""The preference methods' keys: which keys each method reads, their paper defaults, and the check that a key a
method ignores is not set (config.py's validate calls it with the config's defaults)."""

from __future__ import annotations

METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
PAIR_METHODS = ("dpo", "orpo", "simpo")  # their eval holds a reward accuracy (eval_rewards/accuracies); kto's not
# The keys each preference method reads (beyond the shared ones); a key set away from its default while the method
# ignores it is an error (validate_method).
METHOD_KEYS = {"sft": (), "dpo": ("loss_type", "beta", "label_smoothing", "rpo_alpha", "reference",
                                  "precompute_reference"),
               "orpo": ("orpo_lambda",), "simpo": ("beta", "simpo_gamma"),
               "kto": ("beta", "kto_desirable_weight", "kto_undesirable_weight", "reference",
                       "precompute_reference")}
PREFERENCE_KEYS = ("loss_type", "beta", "label_smoothing", "rpo_alpha", "simpo_gamma", "orpo_lambda",
                   "kto_desirable_weight", "kto_undesirable_weight", "disable_dropout", "reference",
                   "precompute_reference")
PAPER_BETA = {"dpo": 0.1, "kto": 0.1, "simpo": 2.0}  # DPO, KTO papers; SimPO paper (Llama-3 setting)


def validate_method(cfg, defaults: dict) -> list[str]:
    """A preference key the method ignores, set away from its default, is an error naming both; and the values."""
    problems = []
    used = set(METHOD_KEYS.get(cfg.method, ())) | ({"disable_dropout"} if cfg.method != "sft" else set())
    for key in PREFERENCE_KEYS:
        if key not in used and getattr(cfg, key) != defaults[key]:
            problems.append(f"{key}: method {cfg.method} does not use it; remove it or choose a method that does "
                            f"({', '.join(m for m, keys in METHOD_KEYS.items() if key in keys) or 'any but sft'})")
    if cfg.beta < 0:
        problems.append(f"beta: must be > 0 (or 0 for the method's paper value), got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        problems.append(f"label_smoothing: must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.loss_type == "robust" and cfg.label_smoothing == 0:
        problems.append("loss_type robust: needs label_smoothing > 0 (the assumed flip rate); with 0 it is sigmoid")
    for key in ("rpo_alpha", "orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight"):
        if getattr(cfg, key) < 0:
            problems.append(f"{key}: must be >= 0, got {getattr(cfg, key)}")
    if cfg.method != "sft" and cfg.train_on_source:
        problems.append(f"train_on_source: method {cfg.method} scores completions only; remove it")
    return problems + best_metric_problems(cfg)


def best_metric_problems(cfg) -> list[str]:
    """metric_for_best_model against the method: the answer metrics score sft's generated answers (eval_generate),
    rewards/accuracies is a pair method's eval; each mistake one line naming the metric and the method's choices."""
    metric, method = cfg.metric_for_best_model, cfg.method
    if metric == "eval_loss" or (metric == "rewards/accuracies" and method in PAIR_METHODS):
        return []
    choices = ("eval_loss, exact_match, token_f1 or rouge_l" if method == "sft" else
               "eval_loss or rewards/accuracies" if method in PAIR_METHODS else "eval_loss")
    if metric == "rewards/accuracies":
        return [f"metric_for_best_model: rewards/accuracies is the reward accuracy of a dpo, orpo or simpo eval; "
                f"method {method} has none: choose {choices}"]
    if method != "sft":  # an answer metric
        return [f"metric_for_best_model: {metric} scores generated answers, which only method sft makes "
                f"(eval_generate); for method {method} choose {choices}"]
    return []  # sft's answer metric: config_checks asks for eval_generate


def method_beta(cfg) -> float:
    """``beta``, or the method's paper value where it is 0."""
    return cfg.beta or PAPER_BETA.get(cfg.method, 0.0)
