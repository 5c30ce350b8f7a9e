"""The defaults by model size (the ``recipe`` key; docs/recipes.md, "Defaults by model size").

qlorakit's own defaults (config.py) are the recipe ``benchmarks/recipes.py`` chose on the embedded 135M model: three
seeds per arm on a held-out closed-context task (README, "Recipes"). Nothing measured here says they carry to a 7B or
a 30B model, so above ``SMALL_LIMIT`` parameters the keys the user left out take the values of the papers that did
measure there:

- QLoRA (Dettmers et al. 2023, arXiv:2305.14314) and its scripts (artidoro/qlora, ``scripts/finetune_guanaco_*.sh``):
  LoRA r 64, alpha 16 on all linear layers, batch 16 (4 x accumulation 4); learning rate 2e-4 and dropout 0.1 for
  7B and 13B, 1e-4 and 0.05 for 33B and 65B. ``LARGE_LIMIT`` splits the two between 13B and 33B. The loss on
  the responses only (qlora's ``train_on_source`` false): prompt_loss_weight 0.
- A preference method (dpo, orpo, simpo, kto) starts from an instruction-tuned model and moves it far less: learning
  rate 5e-6, the alignment-handbook's Zephyr-7B DPO QLoRA recipe (huggingface/alignment-handbook,
  ``recipes/zephyr-7b-beta/dpo/config_qlora.yaml``).

A key the user gave (file or flag) is never changed, even where its value equals the default; a run started with
``init_from`` keeps its adapter's shape. The choice and what it set are logged with the run's summary, and the
saved config records the resolved ``recipe`` with the values, so a resume or a rerun from that config sees the same
numbers.
"""

from __future__ import annotations

import dataclasses

from ..config import TrainConfig
from ..errors import UserError

SMALL_LIMIT = 1e9  # parameters; below it the measured small-model recipe (the table's model has 135M)
LARGE_LIMIT = 20e9  # QLoRA's 7B/13B settings below, its 33B/65B settings above
QLORA_BATCH = 16  # per_device_train_batch_size x gradient_accumulation_steps in every Guanaco script
PREFERENCE_LR = 5e-6
INHERITED_SHAPE = ("lora_r", "lora_alpha")  # an init_from run continues its adapter: its shape is not the rule's


def qlora_values(cfg: TrainConfig, parameters: float) -> dict:
    """The QLoRA rule's value of each key it sets, for a base of ``parameters`` parameters."""
    large = parameters >= LARGE_LIMIT
    values = {"lora_r": 64, "lora_alpha": 16.0, "lora_dropout": 0.05 if large else 0.1,
              "learning_rate": (1e-4 if large else 2e-4) if cfg.method == "sft" else PREFERENCE_LR,
              "prompt_loss_weight": 0.0}
    batch_given = {"per_device_train_batch_size", "gradient_accumulation_steps", "max_tokens_per_batch"} & cfg.given
    if not batch_given and QLORA_BATCH % cfg.per_device_train_batch_size == 0:
        values["gradient_accumulation_steps"] = QLORA_BATCH // cfg.per_device_train_batch_size
    return values


def choose(cfg: TrainConfig, parameters: float | None) -> str:
    """``small`` or ``qlora``: the user's, or by size where ``recipe`` is auto."""
    if cfg.recipe != "auto":
        return cfg.recipe
    return "qlora" if parameters is not None and parameters >= SMALL_LIMIT else "small"


def apply_recipe(cfg: TrainConfig, parameters: float | None = None) -> tuple[TrainConfig, str]:
    """``cfg`` with the chosen recipe's values on the keys the user left out, ``recipe`` resolved; and a line that
    says what it chose and set, for the log (logged with the run's summary, so a mistake found before it stays the
    only line). ``parameters``: the base's count, counted here (from its config, no weights) where needed."""
    unknown = ""
    if cfg.recipe != "small" and parameters is None:
        try:
            parameters = base_parameters(cfg.model_name_or_path, cfg.trust_remote_code)
        except UserError:
            raise
        except Exception as e:  # a config transformers cannot build: loading the model says so in its own words
            unknown = f" (the parameters of {cfg.model_name_or_path} could not be counted: {type(e).__name__})"
    name = choose(cfg, parameters)
    size = ("chosen" if parameters is None else f"{parameters / 1e9:.2f}B parameters" if parameters >= 1e8
            else f"{parameters / 1e6:.1f}M parameters")
    if name == "small":
        return (dataclasses.replace(cfg, recipe=name),
                f"recipe: small ({size}){unknown}: qlorakit's defaults, measured on the embedded 135M model")
    keep = cfg.given | (set(INHERITED_SHAPE) if cfg.init_from else set())
    values = {k: v for k, v in qlora_values(cfg, parameters or 0.0).items() if k not in keep}
    shown = ", ".join(f"{k} {v:g}" for k, v in values.items()) or "nothing: every key it sets was given"
    return dataclasses.replace(cfg, recipe=name, **values), f"recipe: qlora ({size}), QLoRA's values: {shown}"


def base_parameters(name: str, trust_remote_code: bool = False) -> float:
    """The parameter count of the model ``model_name_or_path`` names, from its config alone: the model is built on
    the meta device (no memory, no weights read); a GGUF's config is read from the file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.load import converted_gguf, from_local_or_hub, named_gguf, resolve_model_path

    gguf = named_gguf(name)
    converted = converted_gguf(gguf) if gguf is not None else None
    if converted is not None:  # its config.json: reading the GGUF's header takes seconds
        path, extra = str(converted), {}
    elif gguf is not None:
        path, extra = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        path, extra = resolve_model_path(name), {}
    config = from_local_or_hub(
        lambda: AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **extra), path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return float(sum(p.numel() for p in model.parameters()))
