"""``qlorakit plan MODEL``: the shipped model presets, a config.json or a model directory, and the printed plan."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from ..model.memory import OPTIMIZER_STATE_BYTES
from ..resources import plan_preset
from .estimate import estimate_memory, format_plan

SHIPPED_MODELS = ("mpt-30b", "llama-33b", "llama-65b", "llama-2-70b")

# --- command line -----------------------------------------------------------------------------------------------


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
    elif not path.is_file():
        raise UserError(f"unknown model {model!r}, use one of {', '.join(SHIPPED_MODELS)}, a config.json path "
                        "or a model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}), pass a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object, pass a Hugging Face config.json")
    return config, model


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message}, see 'qlorakit plan --help'")


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expects a number above 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qlorakit plan", description="Peak GPU memory per device of a QLoRA run, from the config.")
    p.add_argument("model", help=f"{', '.join(SHIPPED_MODELS)}, a config.json path, or a model directory")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=4)
    p.add_argument("--double_quant", type=_boolean, default=True)
    p.add_argument("--lora_r", type=_positive_int, default=64)
    p.add_argument("--lora_modules", default="all", help="'all' or a comma-separated list of layer names")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--micro_batch", type=_positive_int, default=1)
    p.add_argument("--seq_len", type=_positive_int, default=512)
    p.add_argument("--gradient_checkpointing", type=_boolean, default=True)
    p.add_argument("--optim", choices=tuple(OPTIMIZER_STATE_BYTES), default="paged_adamw_32bit")
    p.add_argument("--bf16", type=_boolean, default=True)
    p.add_argument("--world_size", type=_positive_int, default=1)
    p.add_argument("--fsdp", type=_boolean, default=False)
    p.add_argument("--device_gib", type=_positive_float, default=48.0)
    return p


def plan_main(argv: list[str]) -> int:
    """``qlorakit plan MODEL [--flags]``: print the plan; a mistake is one line on stderr and exit status 2."""
    try:
        args = _parser().parse_args(argv)
        config, name = load_model_config(args.model)
        settings = {k: v for k, v in vars(args).items() if k not in ("model", "device_gib")}
        plan = estimate_memory(config, **settings)
    except SystemExit as e:  # --help printed its text
        return e.code if isinstance(e.code, int) else 0
    except UserError as e:
        print(f"qlorakit plan: {e}", file=sys.stderr)
        return 2
    plan.model = name
    print(format_plan(plan, args.device_gib))
    return 0


if __name__ == "__main__":
    sys.exit(plan_main(sys.argv[1:]))
