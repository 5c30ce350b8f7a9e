"""``qlorakit plan MODEL``: the shipped model presets, a config.json or a model directory, and the printed plan."""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

from ..errors import UserError
from ..hub import missing, use_hub
from ..model.memory import CUDA_CONTEXT_BYTES, GIB, OPTIMIZER_STATE_BYTES
from ..options import Parser, boolean, integer, number, positive_integer, positive_number
from ..resources import plan_preset
from .estimate import estimate_memory, format_plan

SHIPPED_MODELS = ("mpt-30b", "llama-33b", "llama-65b", "llama-2-70b")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_config(repo_id: str) -> Path:
    """The config.json of a hub model (only that file): from the local cache, or the hub where it can be reached."""
    from huggingface_hub import hf_hub_download

    online = use_hub()
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as e:  # noqa: BLE001 -- not cached, no such repo, or the network failed: one line each
        if not online:
            raise missing("MODEL", repo_id) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{repo_id}: cannot fetch its config.json from the hub ({first})") from None


def load_model_config(model: str) -> tuple[dict, str]:
    """The config of a shipped model name, a config.json path, or a model directory; and a name to show."""
    if model in SHIPPED_MODELS:
        text = plan_preset(model).read_text()
        return json.loads(text), model
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{model} has no config.json, pass a model directory or a config.json path")
    elif not path.is_file() and HUB_ID.match(model):
        path = hub_config(model)
    elif not path.is_file():
        raise UserError(f"unknown model {model!r}, use one of {', '.join(SHIPPED_MODELS)}, a config.json path, "
                        "a model directory or a hub id")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}), pass a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object, pass a Hugging Face config.json")
    return config, model


PLAN_DESCRIPTION = """Peak GPU memory per device of a QLoRA run, from the model's config.json alone: know before
you rent.

The settings are 'qlorakit train' keys, so a run's config can be planned as is (--config run.yaml), and each
'would fit' suggestion is flags you can paste after your own 'qlorakit train' arguments. Without --config the
defaults are the QLoRA paper's 65B run (below); with it, a key the file leaves out takes train's default. A flag
wins over the file. 'auto' (bf16, gradient_checkpointing) is decided as training decides it on a GPU: bf16 on
(Ampere or newer), checkpointing on when the activations of the largest micro-batch would take over half of the
memory left after the weights."""
DEFAULTS = {name: p.default for name, p in inspect.signature(estimate_memory).parameters.items()
            if p.kind is p.KEYWORD_ONLY}
AUTO_KEYS = ("bf16", "gradient_checkpointing")


def _auto_or_boolean(text: str) -> bool | str:
    return "auto" if text.lower() == "auto" else boolean(text)


# The train keys the plan reads: (value type, metavar or None for the choices, choices, the planner's old name).
TRAIN_KEYS = {
    "bits": (integer, None, (4, 8, 16), None),
    "double_quant": (boolean, "true|false", None, None),
    "lora_r": (positive_integer, "N", None, None),
    "lora_modules": (str, "all|NAMES", None, None),
    "lora_dropout": (number, "X", None, None),
    "per_device_train_batch_size": (positive_integer, "N", None, "--micro_batch"),
    "gradient_accumulation_steps": (positive_integer, "N", None, None),
    "model_max_len": (positive_integer, "N", None, "--seq_len"),
    "gradient_checkpointing": (_auto_or_boolean, "true|false|auto", None, None),
    "optim": (str, None, tuple(OPTIMIZER_STATE_BYTES), None),
    "bf16": (_auto_or_boolean, "true|false|auto", None, None),
    "fsdp": (boolean, "true|false", None, None),
    "offload_activations": (boolean, "true|false", None, None),
}
PLAN_NOTES = {
    "model_max_len": " The plan counts every example at this length: the largest micro-batch.",
    "gradient_accumulation_steps": " It does not change the peak; suggestions that shrink the micro-batch raise it "
                                   "to keep the effective batch.",
}


def plan_parser() -> Parser:
    from ..config import FIELDS

    p = Parser("qlorakit plan", usage="qlorakit plan [MODEL] [--config RUN.yaml] [--key value ...] [--device_gib G]",
               description=PLAN_DESCRIPTION)
    p.add_argument("model", nargs="?", metavar="MODEL", help=f"{', '.join(SHIPPED_MODELS)}, a config.json path, or "
                   "a model directory; default: the model_name_or_path of --config")
    p.add_argument("--config", metavar="RUN.yaml", help="a 'qlorakit train' config file: the run to plan")
    p.add_argument("--compare", nargs="+", metavar="MODEL", help="instead of a plan: these models side by side at the "
                   "same LoRA settings (--lora_r, --lora_modules): decoder layers, hidden and MLP shapes, and the LoRA "
                   "parameters of each layer kind, per layer and in all (e.g. --compare mpt-30b llama-33b)")
    p.add_argument("--device_gib", type=positive_number, default=48.0, metavar="G",
                   help="memory of one GPU in GiB, to say whether the run fits and what would. Default: 48.")
    g = p.add_argument_group("train keys", "As 'qlorakit train' takes them. 'Default here' is the plan's without "
                             "--config:\nthe QLoRA paper's 65B run.")
    for key, (typ, metavar, choices, old) in TRAIN_KEYS.items():
        default = str(DEFAULTS[key]).lower() if isinstance(DEFAULTS[key], bool) else DEFAULTS[key]
        g.add_argument(f"--{key}", *([old] if old else []), dest=key, type=typ, metavar=metavar, choices=choices,
                       default=argparse.SUPPRESS,
                       help=f"{FIELDS[key].metadata['help']}{PLAN_NOTES.get(key, '')} Default here: {default}.")
    g.add_argument("--nproc", "--world_size", dest="world_size", type=positive_integer, metavar="N",
                   default=argparse.SUPPRESS, help="GPUs, one process each, as 'qlorakit train --nproc' starts them: "
                   "DDP (replicated), or FSDP (sharded) with --fsdp true. Default here: 1.")
    return p


def run_settings(config_file: str, model: str | None = None) -> tuple[dict, str | None]:
    """The plan's settings of a 'qlorakit train' config file (for the keys it leaves out, train's defaults for the
    model's size: the recipe key, train/recipe.py), and its model unless that is the embedded default. ``model``:
    the model to plan, where it is not the file's."""
    from ..config import build_config
    from ..model.memory import architecture, parameter_count
    from ..train.recipe import apply_recipe

    cfg = build_config([config_file])
    name = model or (None if cfg.model_name_or_path == "default" else cfg.model_name_or_path)
    if name:
        cfg = apply_recipe(cfg, float(parameter_count(architecture(load_model_config(name)[0]))))[0]
    settings = {k: getattr(cfg, k, DEFAULTS[k]) for k in DEFAULTS}  # world_size is not in a config: --nproc
    for key in AUTO_KEYS:
        settings[key] = "auto" if settings[key] == "auto" else settings[key] == "true"
    return settings, None if cfg.model_name_or_path == "default" else cfg.model_name_or_path


def resolve_auto(model_config: dict, settings: dict, device_gib: float) -> tuple[dict, list[str]]:
    """``settings`` with 'auto' decided as training decides it on a GPU, and a line saying so for each."""
    settings, notes = dict(settings), []
    if settings["bf16"] == "auto":
        settings["bf16"] = True
        notes.append("bf16 auto: on, as on a GPU with fast bfloat16 (Ampere or newer)")
    if settings["gradient_checkpointing"] == "auto":
        off = estimate_memory(model_config, **{**settings, "gradient_checkpointing": False})
        free = device_gib * GIB - off.base_weights - off.lora_weights - CUDA_CONTEXT_BYTES
        settings["gradient_checkpointing"] = off.activations > free / 2
        notes.append(f"gradient_checkpointing auto: {'on' if settings['gradient_checkpointing'] else 'off'}, "
                     f"as training decides it: the largest micro-batch saves {off.activations / GIB:.2f} GiB of "
                     f"activations without it, {free / GIB:.2f} GiB left after the weights")
    return settings, notes


def compare(parser: Parser, args, settings: dict) -> int:
    """``--compare A B ...``: print the models side by side at the plan's LoRA settings."""
    from .compare import format_comparison, tunable

    if args.model:
        parser.error(f"give the models to compare after --compare (not {args.model!r} before it)")
    if len(args.compare) < 2:
        parser.error("--compare needs two models or more")
    models = [tunable(name, load_model_config(model)[0], settings["lora_r"], settings["lora_modules"])
              for model in args.compare for name in [load_model_config(model)[1]]]
    print(format_comparison(models, settings["lora_modules"]))
    return 0


def plan_main(argv: list[str]) -> int:
    """``qlorakit plan [MODEL] [--config RUN.yaml] [--key value ...]``: print the plan."""
    parser = plan_parser()
    args = parser.parse_args(argv)
    settings, config_model = (run_settings(args.config, args.model or None) if args.config
                              else (dict(DEFAULTS), None))
    settings.update({k: v for k, v in vars(args).items() if k in DEFAULTS})  # flags win over the file
    if args.compare:
        return compare(parser, args, settings)
    model = args.model or config_model
    if not model:
        parser.error("give MODEL, or a --config whose model_name_or_path is a model directory or config.json")
    config, name = load_model_config(model)
    settings, notes = resolve_auto(config, settings, args.device_gib)
    plan = estimate_memory(config, **settings)
    plan.model = name
    print("\n".join([format_plan(plan, args.device_gib), *notes]))
    return 0
