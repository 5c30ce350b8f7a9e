"""Typed run configuration: defaults, YAML files, ``--key value`` overrides, and validation.

Names follow the original qlora script where it had one, so its users feel at home. Every field carries its help
text in ``metadata["help"]``; ``qlorakit train --help`` prints them. ``validate`` reports every problem at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .compat import ALIASES, QLORA_KEYS, QloraKeys, add_alias_options, resolve, validate_qlora_keys
from .config_methods import METHODS, validate_method
from .config_values import ConfigError, ValueProblem, coerce, implied_values, load_yaml  # noqa: F401 (re-exported)
from .config_checks import DATA_PAIRS, value_problems
from .options import Parser, split_extras


AUTO = ("auto", "true", "false")  # the choices of a key that qlorakit can decide itself


def _f(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def _list(help: str):
    """A key whose value is a YAML list (empty by default)."""
    return field(default_factory=list, metadata={"help": help, "choices": None})


def default_of(f: dataclasses.Field):
    """A field's default value (a fresh one for a list key)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclass
class TrainConfig(QloraKeys):  # QloraKeys (compat.py): the keys of qlora, its fork and the Trainer, listed last
    # --- model ---
    model_name_or_path: str = _f("default", "Base model: 'default' (embedded SmolLM2-135M-Instruct), a local "
                                 "Hugging Face directory, a .gguf file, or a hub id.")
    trust_remote_code: bool = _f(False, "Run Python code shipped with the model. Off unless you trust its author.")
    bits: int = _f(4, "Precision of the frozen base weights: 4 (QLoRA), 8, or 16.", (4, 8, 16))
    quant_type: str = _f("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quant: bool = _f(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    bf16: str = _f("auto", "Compute in bfloat16 (autocast; LoRA weights stay float32): true, false, or auto = where "
                   "the hardware has fast bfloat16 matrix units (CUDA, or a CPU with AMX / AVX512-BF16).",
                   AUTO)
    gradient_checkpointing: str = _f("auto", "Recompute activations in backward to save memory (about a third more "
                                     "compute): true, false, or auto = on only where the activations of the largest "
                                     "micro-batch would take over half the free memory of the device.",
                                     AUTO)
    offload_activations: bool = _f(False, "Keep the activations a micro-batch's forward saves for backward in "
                                   "host memory (pinned on CUDA) until backward needs them; weights stay on the "
                                   "device: less device memory for more host-device copies. With gradient "
                                   "checkpointing these are each layer's input and the head's activations. The "
                                   "numbers do not change.")
    cache_dequantized: str = _f("auto", "Dequantize the 4/8-bit base weights once and reuse them (numerically "
                                "identical, more memory, much less work per step): true, false, or auto = on a "
                                "CPU when they take under a quarter of the free memory.", AUTO)
    mpt: bool = _f(False, "Accepted for compatibility with the MPT fork of qlora; the architecture is read from "
                   "the model's config, so it has no effect.")
    recipe: str = _f("auto", "Where the keys lora_r, lora_alpha, lora_dropout, learning_rate and "
                     "gradient_accumulation_steps you leave out take their values: small = the defaults listed here, "
                     "measured on the embedded 135M model; qlora = the QLoRA paper's for 7B-65B; auto = small under "
                     "1B parameters, else qlora (docs/recipes.md).", ("auto", "small", "qlora"))
    # --- LoRA ---
    lora_r: int = _f(16, "LoRA rank; 16: on the embedded model rank 8 scored lower on every seed, rank 64 lower on "
                     "the mean (README, Recipes). Recipe qlora: 64.")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator, scale = alpha / r (recipe qlora: 16, scale 0.25).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input; 0.05: QLoRA's for its larger models; 0 was no higher "
                             "on the embedded model (README, Recipes; recipe qlora: 0.1 up to 20B, else 0.05).")
    lora_modules: str = _f("all", "'all' linear layers except the output head, or a comma-separated list of module "
                           "names (e.g. q_proj,v_proj).")
    neftune_noise_alpha: float = _f(0.0, "NEFTune: uniform noise on the input embeddings in training steps only, "
                                    "alpha/sqrt(L*d) with L each example's own length (also inside a packed row), "
                                    "d the hidden size; never in eval or generation. 0 = off; the paper used 5.")
    use_rslora: bool = _f(False, "rsLoRA: scale the LoRA branch by alpha/sqrt(r) instead of alpha/r (higher ranks "
                          "keep learning).")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: the B matrices learn at this many times learning_rate, A at it "
                                  "(the paper suggests 16); 0 = off, else at least 1.")
    init_lora_weights: str = _f("default", "LoRA init: default (A Kaiming-uniform, B 0), gaussian (A normal), or "
                                "loftq (bits 4: A and B from the SVD of the float weights minus their 4-bit copy, "
                                "so the adapter starts by cancelling part of the quantization error).",
                                ("default", "gaussian", "loftq"))
    use_dora: bool = _f(False, "DoRA: a trained magnitude per output row besides the LoRA direction, through "
                        "peft's forward, not the fused one. Off: on the embedded model it scored no higher than "
                        "LoRA on three seeds (exact match 0.486 against 0.495) at 1.72x the seconds per step and "
                        "1.66x the peak RSS (README, Recipes).")
    # --- data ---
    dataset: str = _f("default", "Training data: one source or a mixture. A source is a .jsonl, .json, .parquet or "
                      ".csv file, a folder of them, a folder written by datasets' save_to_disk, or a hub id "
                      "(org/name); 'default' is the embedded airoboros sample. Sources are separated by commas, "
                      "each PATH with optional :OPTION parts, an option being a weight (a number) or weight=, "
                      "max_rows=, format=, split=, subset=; e.g. a.jsonl:0.7,b.parquet:max_rows=500 or "
                      "org/name:subset=en:split=train:format=sharegpt (docs/data.md).")
    datasets: list = _list("The training data as a YAML list instead of dataset, one mapping per source: {path, "
                           "format, weight or max_rows, split, subset, columns} (columns renames a layout's fields "
                           "to the dataset's, e.g. {instruction: question, response: answer}). On the command line, "
                           "the list in YAML flow style: '[{path: a.jsonl, weight: 0.7}, {path: b.parquet}]'.")
    dataset_format: str = _f("auto", "Row layout of the sources that do not set their own format (auto = from the "
                             "first row's fields or a table's columns); sharegpt reads conversations/from/value.",
                             ("auto", "airoboros", "alpaca", "messages", "sharegpt", "pairs", "kto"))
    prompt_format: str = _f("airoboros", "How conversations are rendered to text.",
                            ("airoboros", "vicuna", "alpaca", "chatml", "llama2", "tokenizer"))
    model_max_len: int = _f(1024, "Longest example in tokens.")
    truncation: str = _f("truncate", "What to do with a longer example: cut it ('truncate') or 'drop' it. "
                         "Either way it is counted in the log.", ("truncate", "drop"))
    train_on_source: bool = _f(False, "Also train on prompt tokens at weight 1, not only on responses.")
    prompt_loss_weight: float = _f(0.1, "Weight of prompt tokens in the loss, 0 (responses only) to 1 (= "
                                   "train_on_source true): sum(w*ce)/sum(w) over each optimizer step, w 1 on reply "
                                   "tokens; the eval loss stays on replies only. 0.1: above 0 on every seed (README, "
                                   "Recipes); 0 with train_on_source, a preference method or recipe qlora.")
    group_by_length: bool = _f(False, "Batch examples of similar length together (less padding). With false the "
                               "example order does not depend on the batch size.")
    packing: bool = _f(True, "Pack each micro-batch into one padding-free row; attention never crosses examples "
                       "(positions restart per example).")
    max_tokens_per_batch: int = _f(0, "With packing: fill each micro-batch with whole examples up to this many "
                                   "tokens (one padding-free row, bins chosen first-fit-decreasing on the CPU) instead "
                                   "of per_device_train_batch_size examples; 0 = off. At least model_max_len.")
    chunked_loss: str = _f("auto", "Compute the loss a chunk of trained positions at a time, never holding "
                           "full-vocabulary float32 logits (Liger's fused kernel on CUDA where installed): true, "
                           "false, or auto = on CUDA. Equal to the plain loss to float rounding.",
                           AUTO)
    use_liger_kernel: str = _f("auto", "Liger-Kernel's fused RMSNorm, SwiGLU and RoPE kernels (Triton, CUDA only; "
                               "installed by qlorakit[cuda]): true, false, or auto = on CUDA where installed, for "
                               "the architectures Liger has kernels for (LLaMA, Mistral, Qwen2, Phi-3, Gemma, ...).",
                               AUTO)
    eval_dataset_size: float = _f(0.0, "Held-out share of the training data: a count (>= 1) or a fraction (< 1). "
                                  "0 = none.")
    eval_dataset: str = _f("", "Separate data to evaluate on (instead of a split): one source or a mixture, in the "
                           "syntax of dataset.")
    eval_datasets: list = _list("The eval data as a YAML list instead of eval_dataset, entries as in datasets.")
    data_cache_dir: str = _f("", "Where tokenized examples are cached (the next run with the same inputs loads "
                             "them): '' = $QLORAKIT_DATA_CACHE, else $XDG_CACHE_HOME/qlorakit/data, else "
                             "~/.cache/qlorakit/data. Nothing is deleted automatically.")
    data_num_proc: int = _f(0, "Processes that tokenize a source not cached yet; 0 = one per core, each with at "
                            "least 20,000 rows.")
    # --- schedule ---
    output_dir: str = _f("runs/default", "Run directory: adapter, tokenizer, config, metrics, model card.")
    num_train_epochs: float = _f(2.0, "Epochs to train (used when max_steps is not set). 2: one epoch scored lower "
                                 "on every seed, three no higher outside the seed spread (README, Recipes).")
    max_steps: int = _f(-1, "Optimizer steps; when > 0 it caps the run.")
    per_device_train_batch_size: int = _f(4, "Examples per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step. The loss is normalized by the "
                                          "number of trained tokens in all of them, so this equals a bigger batch "
                                          "(recipe qlora: batch 16).")
    learning_rate: float = _f(5e-4, "Peak learning rate; 5e-4: on the embedded model 2e-4 scored lower on every "
                              "seed, 1e-3 no higher outside the seed spread (README, Recipes). Recipe qlora: 2e-4 up "
                              "to 20B parameters, else 1e-4; 5e-6 for a preference method.")
    lr_scheduler_type: str = _f("constant", "Schedule after warmup; constant: qlora's (cosine scored lower on every "
                                "seed, README Recipes).",
                                ("constant", "linear", "cosine"))
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up linearly from 0.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (AdamW) or L2 (SGD).")
    max_grad_norm: float = _f(0.3, "Clip the gradient norm to this; 0 = no clipping.")
    optim: str = _f("adamw_torch", "Optimizer.", ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "sgd"))
    seed: int = _f(42, "Seed for data order, the eval split, LoRA init and dropout.")
    # --- evaluation, checkpoints, logging ---
    eval_strategy: str = _f("epoch", "When to evaluate (needs an eval split or eval_dataset).",
                            ("no", "steps", "epoch"))
    eval_steps: int = _f(50, "Evaluate every N steps when eval_strategy is 'steps'.")
    per_device_eval_batch_size: int = _f(8, "Examples per eval batch.")
    load_best_model_at_end: bool = _f(False, "Leave the best checkpoint's adapter (by metric_for_best_model) at the "
                                      "root.")
    eval_generate: int = _f(32, "At each evaluation also answer the first N eval examples greedily in the run's "
                            "prompt format and score the answers against the references (eval_exact_match, "
                            "eval_token_f1, eval_rouge_l); 0 = off. 32: enough answers to see them change between "
                            "evaluations, few enough that generating them stays a small cost beside training's on a "
                            "CPU.")
    eval_max_new_tokens: int = _f(128, "Longest answer generated at those evaluations, in tokens (a longer one is "
                                  "scored as cut); 128 holds a closed-context answer with its cited source.")
    metric_for_best_model: str = _f("eval_loss", "What makes an evaluation the best (load_best_model_at_end, the "
                                    "checkpoint save_total_limit keeps, early_stopping_patience): eval_loss (lower "
                                    "is better); higher is better: an answer metric (sft, needs eval_generate) or "
                                    "rewards/accuracies, the eval's reward accuracy (dpo, orpo, simpo).",
                                    ("eval_loss", "exact_match", "token_f1", "rouge_l", "rewards/accuracies"))
    early_stopping_patience: int = _f(0, "Stop after this many evaluations without improvement; 0 = never.")
    save_strategy: str = _f("epoch", "When to write checkpoint-STEP/ folders.", ("no", "steps", "epoch"))
    save_steps: int = _f(100, "Save every N steps when save_strategy is 'steps'.")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (never deleting the best); 0 = all.")
    resume_from_checkpoint: str = _f("", "A checkpoint folder, or 'latest' in output_dir, to continue from.")
    max_nonfinite_steps: int = _f(3, "Stop after this many consecutive steps with a non-finite loss or gradient.")
    logging_steps: int = _f(1, "Log every N optimizer steps.")
    # --- distributed ---
    fsdp: bool = _f(False, "Under torchrun: shard the model with FSDP2 instead of replicating it with DDP.")
    # --- preference tuning ---
    method: str = _f("sft", "sft, or on prompt/chosen/rejected pairs dpo (Rafailov et al. 2023), orpo (Hong et "
                     "al. 2024), simpo (Meng et al. 2024); kto (Ethayarajh et al. 2024) on labelled rows.", METHODS)
    loss_type: str = _f("sigmoid", "dpo's loss: sigmoid (with label_smoothing: cDPO), ipo (Azar et al. 2023, on "
                        "token-averaged log-probabilities as TRL) or robust (rDPO, Chowdhury et al. 2024).",
                        ("sigmoid", "ipo", "robust"))
    beta: float = _f(0.0, "dpo/kto: reference strength; simpo: reward scale. 0 = paper value: 0.1 (DPO, KTO), 2.0 "
                     "(SimPO, Llama-3 setting).")
    label_smoothing: float = _f(0.0, "dpo: assumed share of flipped labels in [0, 0.5); 0 = plain DPO.")
    simpo_gamma: float = _f(1.0, "simpo: target reward margin (SimPO paper: gamma/beta 0.5 at beta 2.0).")
    rpo_alpha: float = _f(0.0, "dpo: weight of the chosen completion's NLL added to each pair's loss (RPO, Pang et "
                          "al. 2024: alpha 1.0), -log pi(y_w|x) / |y_w|; 0 = off. It keeps the chosen reply likely "
                          "where chosen and rejected differ in a few tokens, which plain DPO lets fall (likelihood "
                          "displacement, Razin et al. 2024).")
    orpo_lambda: float = _f(0.1, "orpo: weight of the odds-ratio term (ORPO paper: 0.1; TRL's beta).")
    kto_desirable_weight: float = _f(1.0, "kto: weight of desirable (label true) rows (paper: 1.0).")
    kto_undesirable_weight: float = _f(1.0, "kto: weight of undesirable rows (paper: 1.0).")
    disable_dropout: bool = _f(True, "Preference methods: dropout off (as TRL), so policy = reference at step 0.")
    init_from: str = _f("", "A finished run directory: start from its adapter on its base (sft, then dpo).")
    reference: str = _f("init", "dpo/kto's frozen reference: init = the starting adapter (init_from's, or the "
                        "fresh one, equal to the base), base = the bare base.", ("init", "base"))
    precompute_reference: bool = _f(False, "Keep the reference log-probabilities in the data cache for reuse.")
    # the keys given in the file or on the command line (not a key itself): the recipe leaves them as they are
    given: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})

    # ------------------------------------------------------------------
    def use_bf16(self) -> bool:
        """Whether this run computes in bfloat16 on this machine's device."""
        from .devices import bf16_is_fast

        return bf16_is_fast() if self.bf16 == "auto" else self.bf16 == "true"

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        return {name: values[name] for name in FIELDS}


FIELDS = {f.name: f for f in sorted(dataclasses.fields(TrainConfig), key=lambda f: f.name in QLORA_KEYS)
          if not f.metadata.get("internal")}
_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value, source: str):
    """``value`` as the field's type, or ConfigError naming key and source (config_values.py)."""
    try:
        return coerce(key, _TYPES[key], value, source)
    except ValueProblem as e:
        raise ConfigError(str(e)) from None


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, [*FIELDS, *ALIASES], n=1)
    return f"; did you mean '{close[0]}'?" if close else "; see 'qlorakit train --help'"


SECTIONS = {"model_name_or_path": "model", "lora_r": "LoRA", "dataset": "data", "output_dir": "schedule",
            "eval_strategy": "evaluation, checkpoints, logging", "fsdp": "distributed", "method": "preference tuning",
            "source_max_len": "qlora and Trainer"}  # first key: section title
TRAIN_USAGE = "qlorakit train [CONFIG.yaml] [--key value ...] [--nproc N]"
TRAIN_DESCRIPTION = """Fine-tune a causal LM with QLoRA. Without arguments: the embedded default job
(SmolLM2-135M-Instruct on the shipped airoboros sample, into runs/default).

CONFIG.yaml is a mapping of the keys below (key: value); a --key value flag wins over the file. Every mistake in
the file and the flags is reported at once, each naming its key."""


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def _metavar(name: str, f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if choices:
        return "|".join(map(str, choices))
    return {bool: "true|false", int: "N", float: "X", str: "TEXT", list: "YAML_LIST"}[_TYPES[name]]


def _yes_no(key: str) -> bool:
    return _TYPES[key] is bool or "true" in (FIELDS[key].metadata["choices"] or ())


def add_config_options(parser: Parser) -> Parser:
    """One ``--key VALUE`` per TrainConfig field, in the class's sections, each with its help and default. Values
    stay as typed (strings): ``config_from_mapping`` coerces and validates them with the YAML's, every problem at
    once."""
    group = parser
    for name, f in FIELDS.items():
        if name in SECTIONS:
            group = parser.add_argument_group(f"{SECTIONS[name]} keys")
        help = f"{f.metadata['help']} Default: {_show(default_of(f))}."
        # a bare yes/no --key is read too, as true, as in Hugging Face's parser (compat.resolve)
        nargs = {"nargs": "+"} if f.metadata.get("many") else {"nargs": "?"} if _yes_no(name) else {}
        group.add_argument(f"--{name}", metavar=_metavar(name, f), const=None, default=argparse.SUPPRESS,
                           help=help.replace("%", "%%"), **nargs)
    return add_alias_options(parser)


def train_parser() -> Parser:
    """The parser of ``qlorakit train``'s config keys (the CLI adds --nproc)."""
    return add_config_options(Parser("qlorakit train", usage=TRAIN_USAGE, description=TRAIN_DESCRIPTION))


def parse_args(argv: list[str], parser: Parser | None = None
               ) -> tuple[argparse.Namespace, list[str], dict[str, tuple[object, str]]]:
    """(the parser's namespace, for its options that are not config keys; the positional arguments; every
    ``--key value`` given, known keys and unknown ones alike, as key -> (value, '--key')). Unknown keys are left to
    ``config_from_mapping``, which reports them with the other problems and suggests the nearest key."""
    ns, extras = (parser or train_parser()).parse_known_args(argv)
    flags = {k: (v, f"--{k}") for k, v in vars(ns).items() if k in FIELDS or k in ALIASES}
    positionals = []
    for option, value in split_extras(extras):
        if option is None:
            positionals.append(value)
        else:
            flags[option.lstrip("-").replace("-", "_")] = (value, option)
    return ns, positionals, flags


def build_config(argv: list[str], warnings: list[str] | None = None) -> TrainConfig:
    """``[CONFIG.yaml] [--key value ...]``: the YAML file, then flags (flags win), then validation. Raises
    ConfigError listing every problem; ``warnings`` gets a line for each name given that has no effect here."""
    return read_args(argv, warnings=warnings)[0]


def read_args(argv: list[str], parser: Parser | None = None, warnings: list[str] | None = None
              ) -> tuple[TrainConfig, argparse.Namespace]:
    """``build_config`` with ``parser`` (train's keys plus options of a command's own, such as --nproc); also
    returns the parser's namespace for those."""
    ns, positionals, flags = parse_args(argv, parser)
    problems = [f"unexpected argument {a!r}: give one config file, then --key value pairs" for a in positionals[1:]]
    merged = {}
    if positionals:
        try:
            merged = load_yaml(positionals[0])
        except ConfigError as e:
            problems.append(str(e))
    return config_from_mapping(merge_flags(merged, flags), problems, warnings), ns


def merge_flags(file_values: dict[str, tuple[object, str]], flags: dict[str, tuple[object, str]]
                ) -> dict[str, tuple[object, str]]:
    """A config file's key -> (value, source) with the flags' over them: a flag wins over the file, and a flag
    that gives the data in one form (dataset, or the datasets list) replaces the file's other form."""
    merged = dict(file_values)
    for one, many in DATA_PAIRS:
        if (one in flags) != (many in flags):
            merged.pop(many if one in flags else one, None)
    return {**merged, **flags}


def config_from_mapping(merged: dict[str, tuple[object, str]], problems: list[str] | None = None,
                        warnings: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of key -> (value, where it came from); ``problems`` found before are reported with the
    ones found here, all at once. Bare flags and the names of qlora, its fork and the Trainer are read as
    ``compat.resolve`` says; the lines of those that have no effect go to ``warnings``."""
    merged, alias_problems, alias_warnings = resolve(merged, {k: _yes_no(k) for k in FIELDS})
    problems = list(problems or []) + alias_problems
    if warnings is not None:
        warnings += alias_warnings
    values = {}
    for key, (value, source) in merged.items():
        if key not in FIELDS:
            problems.append(f"unknown key '{key}' (from {source}){_suggest(key)}")
            continue
        try:
            values[key] = _coerce(key, value, source)
        except ConfigError as e:
            problems.append(str(e))
    cfg = TrainConfig(**values | implied_values(values), given=frozenset(values))
    problems += validate(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with ``cfg``, each naming its key."""
    problems = []
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            problems.append(f"{name}: {getattr(cfg, name)!r} is not one of {', '.join(map(str, choices))}")
    problems += value_problems(cfg)  # config_checks.py: ranges and combinations
    return problems + validate_method(cfg, {k: FIELDS[k].default for k in FIELDS}) + validate_qlora_keys(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def load_run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run wrote to ``run_dir/qlorakit_config.yaml``."""
    p = Path(run_dir) / "qlorakit_config.yaml"
    if not p.is_file():
        raise ConfigError(f"{run_dir} is not a qlorakit run directory (no qlorakit_config.yaml); "
                          "pass the output_dir of a 'qlorakit train' run")
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    known = {k: v for k, v in data.items() if k in FIELDS}
    return TrainConfig(**known, given=frozenset(known))  # resolved values: a recipe does not change them again
