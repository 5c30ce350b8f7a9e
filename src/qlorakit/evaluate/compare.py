"""``qlorakit compare RUN_A RUN_B ...``: several runs of one base model, and the base itself, scored on the same
held-out rows side by side (eval loss, the answer metrics of training's evaluation, example answers), and where each
adapter changed the model: the size of its update relative to the weight it adds to, by layer and by module type."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

COMPARE_DESCRIPTION = """Score several runs of one base model and the base itself on the same held-out rows: the
eval loss per trained token (as in training), and greedy answers to the first --generate rows scored against their
references (exact match and token F1 on SQuAD-normalized text, ROUGE-L: the metrics of training's eval_generate).
Then --examples answers side by side, and where each adapter changed the model: ||B A * scale|| / ||W|| (Frobenius
norms; a 4-bit W dequantized), over each layer's and each module type's LoRA layers together.

The base loads once and each run's adapter onto it in turn. The rows: --dataset FILE (in the runs' training layout),
else the first run's own eval split where its config had one and its files are still there, else the packaged
held-out closed-context questions. The runs must share the base model and the prompt format (the same token
sequences are scored for all)."""

_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


@dataclass
class Rows:
    examples: list  # data.tokenize.Example, tokenized in the runs' prompt format
    source: str  # where they came from, in words
    answers: list[tuple[list[int], str]] = field(default_factory=list)  # (prompt ids, reference) of the first N


def compare_parser():
    from ..options import Parser, non_negative_integer

    p = Parser("qlorakit compare", usage="qlorakit compare RUN_A RUN_B ... [--dataset FILE] [--generate N] "
               "[--examples K] [--output FILE.json]", description=COMPARE_DESCRIPTION)
    p.add_argument("runs", metavar="RUN", type=Path, nargs="+",
                   help="run directories of 'qlorakit train' (or checkpoint-STEP folders in them)")
    p.add_argument("--dataset", metavar="FILE", default="", help="JSONL rows in the runs' training layout")
    p.add_argument("--generate", metavar="N", type=non_negative_integer, default=32,
                   help="how many rows to answer for the answer metrics; 0 = none. Default: 32.")
    p.add_argument("--examples", metavar="K", type=non_negative_integer, default=2,
                   help="how many of those answers to print, each model's beside the reference. Default: 2.")
    p.add_argument("--max_new_tokens", metavar="N", type=non_negative_integer, default=128,
                   help="longest answer in tokens. Default: 128.")
    p.add_argument("--output", metavar="FILE.json", default="", help="everything printed, as JSON")
    return p


def run_names(runs: list[Path]) -> list[str]:
    """A column name per run: its folder's name, with its parent's where two runs share a name."""
    names = [r.resolve().name for r in runs]
    return [f"{r.resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def check_runs(runs: list[Path]) -> list:
    """Each run's config; runs of another base model or prompt format are refused in one line."""
    from ..config import load_run_config
    from ..runs import run_files

    files = [run_files(r) for r in runs]
    cfgs = [load_run_config(f.config_dir) for f in files]
    first = files[0].adapter_config["base_model_name_or_path"]
    for run, f, cfg in zip(runs[1:], files[1:], cfgs[1:]):
        base = f.adapter_config["base_model_name_or_path"]
        if base != first:
            raise UserError(f"compare: {run} was trained on {base}, {runs[0]} on {first}; compare runs of one base "
                            "model")
        if cfg.prompt_format != cfgs[0].prompt_format:
            raise UserError(f"compare: {run} uses prompt format {cfg.prompt_format}, {runs[0]} "
                            f"{cfgs[0].prompt_format}; compare runs of one prompt format")
    return cfgs


def held_out_rows(cfg, tokenizer, dataset: str) -> Rows:
    """The rows every model is scored on (see COMPARE_DESCRIPTION), tokenized as training tokenized them."""
    from ..data.formats import read_jsonl
    from ..data.tokenize import tokenize_all
    from ..resources import HELDOUT_CLOSED_CONTEXT

    if not dataset and (cfg.eval_dataset or cfg.eval_datasets or cfg.eval_dataset_size):
        from ..data.prepare import DataOptions, prepare_data

        try:
            data = prepare_data(DataOptions.from_config(cfg), tokenizer, mode="build")
            ex = data.eval
            if cfg.max_eval_samples:
                ex = [ex[i] for i in range(min(cfg.max_eval_samples, len(ex)))]
            return Rows([ex[i] for i in range(len(ex))], f"the eval split of {cfg.output_dir}")
        except UserError as e:
            print(f"qlorakit compare: the first run's eval split cannot be rebuilt ({e}); using the packaged "
                  "held-out rows", file=sys.stderr)
    path = Path(dataset) if dataset else HELDOUT_CLOSED_CONTEXT
    fmt = cfg.dataset_format if dataset else "auto"
    examples, _ = tokenize_all(read_jsonl(path, fmt), tokenizer, cfg.prompt_format, cfg.model_max_len,
                               cfg.truncation)
    return Rows(examples, str(path) if dataset else "the packaged held-out closed-context questions")


def score_model(model, tokenizer, cfg, rows: Rows, max_new_tokens: int) -> dict:
    """Eval loss over every row, and the answer metrics (with the answers) of the first rows."""
    from ..data.templates import stop_text, stop_token_ids
    from ..metrics import answer_metrics
    from ..model.generate import generate_batched
    from ..train.step import supports_packing
    from ..train.validate import eval_loss

    device = next(model.parameters()).device
    res = eval_loss(model, rows.examples, batch_size=cfg.per_device_eval_batch_size, pad_id=tokenizer.pad_token_id,
                    packing=supports_packing(model), device=device, use_bf16=cfg.use_bf16())
    if rows.answers:
        replies = generate_batched(model, tokenizer, [p for p, _ in rows.answers],
                                   stop_ids=stop_token_ids(tokenizer, cfg.prompt_format),
                                   stop=stop_text(cfg.prompt_format, tokenizer),
                                   batch_size=cfg.per_device_eval_batch_size, max_new_tokens=max_new_tokens,
                                   do_sample=False)
        res |= answer_metrics(replies, [r for _, r in rows.answers]) | {"answers": replies}
    return res


@torch.no_grad()
def update_sizes(model, adapter: str) -> dict:
    """||delta W|| / ||W|| of ``adapter`` over its LoRA layers: all together, by layer index and by module type
    (each group: the square root of its summed squared norms, the update's over the weights')."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    sums: dict[str, dict[str, list[float]]] = {"by_layer": {}, "by_module": {}, "all": {}}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        delta = module.get_delta_weight(adapter).float()
        weight = dequantize_module_weight(module.get_base_layer()).float()
        d2, w2 = float(delta.pow(2).sum()), float(weight.pow(2).sum())
        layer = _LAYER.search(name + ".")
        groups = {"by_layer": layer.group(1) if layer else "other", "by_module": name.rsplit(".", 1)[-1],
                  "all": "all"}
        for kind, key in groups.items():
            acc = sums[kind].setdefault(key, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + d2, acc[1] + w2
    ratio = {kind: {k: (d / w) ** 0.5 if w else 0.0 for k, (d, w) in by.items()} for kind, by in sums.items()}
    ratio["by_layer"] = dict(sorted(ratio["by_layer"].items(), key=lambda kv: (not kv[0].isdigit(),
                                                                                int(kv[0]) if kv[0].isdigit() else 0)))
    return {"all": ratio["all"].get("all", 0.0), "by_layer": ratio["by_layer"], "by_module": ratio["by_module"]}


def compare_runs(runs: list[Path], dataset: str = "", generate: int = 32, max_new_tokens: int = 128) -> dict:
    """Every model's scores on the same rows, and every adapter's update sizes: the JSON ``compare`` writes."""
    from ..runs import load_run
    from ..train.validate import prompt_and_reference
    from ..data.templates import stop_text

    cfgs = check_runs(runs)
    names = run_names(runs)
    model, tokenizer, cfg = load_run(runs[0])  # the base, once, with the first adapter as "default"
    adapters = ["default"]
    for i, run in enumerate(runs[1:], start=1):
        adapters.append(f"run{i}")
        model.load_adapter(str(run), adapter_name=adapters[-1])
    rows = held_out_rows(cfg, tokenizer, dataset)
    if not rows.examples:
        raise UserError(f"compare: no rows to score in {rows.source}; give --dataset FILE")
    stop = stop_text(cfg.prompt_format, tokenizer)
    found = (prompt_and_reference(ex, tokenizer, stop) for ex in rows.examples[:generate])
    rows.answers = [r for r in found if r is not None]
    with model.disable_adapter():
        scores = {"base": score_model(model, tokenizer, cfg, rows, max_new_tokens)}
    updates = {}
    for name, adapter, run_cfg in zip(names, adapters, cfgs):
        model.set_adapter(adapter)
        scores[name] = score_model(model, tokenizer, run_cfg, rows, max_new_tokens)
        updates[name] = update_sizes(model, adapter)
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p, _ in rows.answers]
    return {"base_model": model.peft_config["default"].base_model_name_or_path,
            "runs": dict(zip(names, map(str, runs))),
            "rows": {"source": rows.source, "scored": len(rows.examples), "answered": len(rows.answers)},
            "scores": scores, "update_sizes": updates,
            "examples": [{"prompt": p, "reference": r} for p, (_, r) in zip(prompts, rows.answers)]}


def score_table(result: dict) -> list[str]:
    """One column per model (base, each run): eval loss and the answer metrics."""
    from ..metrics import LABELS, METRICS

    cols = list(result["scores"])
    width = max(12, *(len(c) + 2 for c in cols))
    lines = [f"{'':<14}" + "".join(f"{c:>{width}}" for c in cols)]
    for key, label in [("eval_loss", "eval loss"), *((m, LABELS[m]) for m in METRICS)]:
        if all(key in result["scores"][c] for c in cols):
            lines.append(f"{label:<14}" + "".join(f"{result['scores'][c][key]:>{width}.4f}" for c in cols))
    return lines


def example_lines(result: dict, k: int) -> list[str]:
    """The first ``k`` answered prompts: the question's end, the reference, and each model's answer."""
    def short(text: str, n: int) -> str:
        text = " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())
        return text if len(text) <= n else "..." + text[-(n - 3):]

    lines = []
    for i, ex in enumerate(result["examples"][:k]):
        lines += ["", f"example {i + 1}: {short(ex['prompt'], 200)}", f"  reference: {short(ex['reference'], 300)}"]
        for name, s in result["scores"].items():
            lines.append(textwrap.fill(short(s["answers"][i], 300), 116, initial_indent=f"  {name}: ",
                                       subsequent_indent="    "))
    return lines


def update_table(result: dict) -> list[str]:
    """||B A * scale|| / ||W|| per run: all LoRA layers, then by layer index, then by module type."""
    runs = list(result["update_sizes"])
    width = max(12, *(len(r) + 2 for r in runs))
    sizes = result["update_sizes"]
    lines = ["", "where each adapter changed the model: ||B A * scale|| / ||W|| (Frobenius)",
             f"{'':<14}" + "".join(f"{r:>{width}}" for r in runs),
             f"{'all layers':<14}" + "".join(f"{sizes[r]['all']:>{width}.5f}" for r in runs)]
    for kind, label in (("by_layer", "layer"), ("by_module", "")):
        keys = list(dict.fromkeys(k for r in runs for k in sizes[r][kind]))
        for key in keys:
            name = f"{label} {key}".strip()
            lines.append(f"{name:<14}" + "".join(
                f"{sizes[r][kind][key]:>{width}.5f}" if key in sizes[r][kind] else f"{'-':>{width}}" for r in runs))
    return lines


def compare_main(argv: list[str]) -> int:
    """``qlorakit compare RUN_A RUN_B ... [--dataset FILE] [--generate N] [--examples K] [--output FILE.json]``."""
    o = compare_parser().parse_args(argv)
    result = compare_runs(o.runs, o.dataset, o.generate, o.max_new_tokens)
    rows = result["rows"]
    print(f"base model: {result['base_model']}")
    print(f"rows: {rows['scored']} from {rows['source']} (eval loss over all, answers to the first "
          f"{rows['answered']})")
    print("\n".join(score_table(result) + example_lines(result, o.examples) + update_table(result)))
    if o.output:
        Path(o.output).write_text(json.dumps(result, indent=2))
        print(f"qlorakit compare: results written to {o.output}", file=sys.stderr)
    return 0
