"""The argument names of the original qlora script (artidoro/qlora's qlora.py), of jondurbin's fork of it, and of
the Hugging Face TrainingArguments their scripts pass, as qlorakit reads them.

A name qlorakit shares with them (bits, lora_r, adam_beta2, source_max_len, ...) is a config key of its own. Each
other name is one ``Alias`` here, of one kind:

* ``renamed``: the same setting under qlorakit's name (evaluation_strategy -> eval_strategy), the value as given;
* ``mapped``: a value that becomes settings of qlorakit's (use_flash_attention_2 true -> attn_implementation
  flash_attention_2);
* ``ignored``: accepted, with one warning line that says why it has no effect here;
* ``refused``: one error line that says what to use instead (for a yes/no name: only when it is true).

Some values of shared keys are aliases too (dataset_format airoboros_chat). Any other unknown key stays an error.
docs/coming-from-qlora.md is this table for people; ``qlorakit train --help`` lists every alias with its note.
It sits below the config: it knows the config's keys by name only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .options import Parser


@dataclass(frozen=True)
class Alias:
    kind: str  # renamed, mapped, ignored, refused
    origin: str  # where the name comes from: qlora, fork, Trainer (HF TrainingArguments)
    note: str  # why (ignored, refused), or what it becomes (renamed, mapped): help, docs and messages say it
    boolean: bool = False  # a yes/no name: a bare --flag means true, as Hugging Face's argument parser allows
    target: str = ""  # renamed: qlorakit's key
    sets: dict = field(default_factory=dict)  # mapped, boolean: {True: {key: value}, False: {key: value}}


def _key(default, help: str, choices: tuple | None = None, many: bool = False):
    """A config key, as config.py's are: its default, help and choices; ``many``: the flag takes several words."""
    return field(default=default, metadata={"help": help, "choices": choices, "many": many})


@dataclass
class QloraKeys:
    """The config keys that come from qlora, its fork and the Hugging Face Trainer: a part of TrainConfig, whose
    help lists them last, in a section of their own."""

    source_max_len: int = _key(0, "qlora's cut: each prompt keeps its first N tokens (the BOS counts), as qlora's "
                             "collator cuts its input; 0 = no limit. model_max_len still caps the whole example.")
    target_max_len: int = _key(0, "qlora's cut: each reply keeps its first N tokens (its end token counts); 0 = no "
                             "limit.")
    max_train_samples: int = _key(0, "Train on the first N examples of the training split only; 0 = all.")
    max_eval_samples: int = _key(0, "Evaluate on the first N examples of the eval split only; 0 = all.")
    data_seed: int = _key(-1, "Seed of the eval split and the example order; -1 = seed.")
    adam_beta1: float = _key(0.9, "AdamW's beta1 (decay of the gradient average).")
    adam_beta2: float = _key(0.999, "AdamW's beta2 (decay of the squared-gradient average).")
    adam_epsilon: float = _key(1e-8, "AdamW's epsilon.")
    attn_implementation: str = _key("auto", "Attention kernel: auto (transformers' choice, SDPA where the model has "
                                  "it), sdpa, eager, or flash_attention_2 (a CUDA GPU with the flash-attn package; "
                                  "elsewhere the log says what is used instead).",
                                  ("auto", "sdpa", "eager", "flash_attention_2"))
    working_dir: str = _key("", "Where checkpoint-STEP folders go (the fork's name); '' = output_dir.")
    merged_output_dir: str = _key("", "After training, merge the adapter into its base and save a plain transformers "
                                "model here, as 'qlorakit merge' does; '' = no merge.")
    logging_strategy: str = _key("steps", "When to log the training loss: every logging_steps steps, at the end of "
                               "each epoch, or never.", ("steps", "epoch", "no"))
    report_to: str = _key("none", "Trackers that also get the metrics, the config and the model card: none, or some "
                        "of tensorboard, wandb, mlflow, trackio (comma-separated, or several words); all = those "
                        "installed.", many=True)
    run_name: str = _key("", "The run's name in those trackers; '' = the output_dir folder's name.")
    do_mmlu_eval: bool = _key(False, "At each evaluation also score MMLU accuracy (qlora's MMLU callback).")
    mmlu_dataset: str = _key("mmlu-fs", "The MMLU file: a JSON or JSONL file of {subject, input, output} rows, or "
                           "qlora's names mmlu-fs (five-shot) and mmlu-zs (zero-shot), read from data/mmlu/ as in "
                           "a qlora checkout.")
    mmlu_split: str = _key("eval", "With mmlu-fs or mmlu-zs: the validation (eval) or test file.", ("eval", "test"))
    greater_is_better: str = _key("auto", "The Trainer's direction of metric_for_best_model: auto = the one the "
                                  "metric implies (eval_loss: lower is better; exact_match, token_f1, rouge_l, "
                                  "rewards/accuracies: higher); true or false must agree with it.",
                                  ("auto", "true", "false"))
    max_mmlu_samples: int = _key(0, "Score the first N MMLU questions only; 0 = all.")
    mmlu_source_max_len: int = _key(2048, "Longest MMLU prompt in tokens; a longer one keeps its end (the question).")

    def data_order_seed(self) -> int:
        """The seed of the eval split and the example order: data_seed where given, else seed."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def checkpoint_dir(self) -> Path:
        """Where checkpoint-STEP folders go: working_dir where given, else output_dir."""
        return Path(self.working_dir or self.output_dir)


QLORA_KEYS = frozenset(f.name for f in dataclasses.fields(QloraKeys))


GENERATION = "a setting of qlora's predict step; 'qlorakit chat' and 'qlorakit generate' take their own"
PREDICT = "after training, answer a JSONL of prompts with 'qlorakit generate RUN_DIR --input FILE --output FILE'"


def _generation(boolean: bool = False) -> Alias:
    return Alias("ignored", "qlora", GENERATION, boolean)


ALIASES: dict[str, Alias] = {
    # renamed and mapped: honoured under qlorakit's names
    "evaluation_strategy": Alias("renamed", "Trainer", "the same as --eval_strategy", target="eval_strategy"),
    "use_flash_attention_2": Alias("mapped", "fork", "true: --attn_implementation flash_attention_2 (on a CUDA GPU "
                                   "with the flash-attn package; elsewhere the log says what is used instead)",
                                   True, sets={True: {"attn_implementation": "flash_attention_2"}}),
    "skip_excess_length": Alias("mapped", "fork", "true: --truncation drop; false: --truncation truncate", True,
                                sets={True: {"truncation": "drop"}, False: {"truncation": "truncate"}}),
    "adam8bit": Alias("mapped", "qlora", "true: --optim paged_adamw_8bit", True,
                      sets={True: {"optim": "paged_adamw_8bit"}}),
    # ignored: accepted with a warning
    "do_train": Alias("ignored", "Trainer", "'qlorakit train' always trains", True),
    "do_eval": Alias("ignored", "Trainer", "evaluation follows --eval_strategy, on --eval_dataset_size held-out rows "
                     "or --eval_dataset", True),
    "remove_unused_columns": Alias("ignored", "Trainer", "examples hold token ids and labels only; there are no "
                                   "other columns to remove", True),
    "dataloader_num_workers": Alias("ignored", "Trainer", "examples are tokenized before the first step and "
                                    "batched from memory, so there is no loading to spread over workers"),
    "ddp_find_unused_parameters": Alias("ignored", "Trainer", "under DDP every trainable (LoRA) parameter takes "
                                        "part in every step, so there are none to find", True),
    "use_auth_token": Alias("ignored", "qlora", "the hub token is read as the hub client reads it (HF_TOKEN, or "
                            "'hf auth login')", True),
    "cache_dir": Alias("ignored", "qlora", "downloads go to the Hugging Face cache; set HF_HOME to move it"),
    "max_memory_MB": Alias("ignored", "qlora", "each process holds the whole model on its own device; 'qlorakit "
                           "plan' says beforehand whether it fits"),
    "expand_conversations": Alias("ignored", "fork", "every reply of a multi-turn conversation is trained already, "
                                  "in one example (what expanding achieves, without repeating the prompts)", True),
    "max_shard_size": Alias("ignored", "fork", "the merged model (--merged_output_dir) is saved in 2GB shards"),
    "save_quantized_base": Alias("ignored", "fork", "the adapter names its base model; 'qlorakit merge' and "
                                 "'qlorakit export' write a whole model", True),
    "max_new_tokens": _generation(), "min_new_tokens": _generation(), "do_sample": _generation(True),
    "num_beams": _generation(), "num_beam_groups": _generation(), "penalty_alpha": _generation(),
    "use_cache": _generation(True), "temperature": _generation(), "top_k": _generation(), "top_p": _generation(),
    "typical_p": _generation(), "diversity_penalty": _generation(), "repetition_penalty": _generation(),
    "length_penalty": _generation(), "no_repeat_ngram_size": _generation(),
    # refused: what to use instead
    "deepspeed": Alias("refused", "fork", "qlorakit shards with FSDP instead of DeepSpeed: use --fsdp true (with "
                       "--nproc N)"),
    "full_finetune": Alias("refused", "qlora", "qlorakit trains LoRA adapters; for a 16-bit base use --bits 16, and "
                           "a larger --lora_r to train more", True),
    "do_predict": Alias("refused", "Trainer", PREDICT, True),
    "predict_with_generate": Alias("refused", "Trainer", PREDICT, True),
    "fp16": Alias("refused", "Trainer", "qlorakit computes in bfloat16 or float32: use --bf16 true (or --bf16 false "
                  "for float32 on a GPU without bfloat16)", True),
}

# Values of qlorakit's keys that the scripts spell their way: (key, value) -> (the settings it means, a note).
VALUE_ALIASES: dict[tuple[str, str], tuple[dict, str]] = {
    ("dataset_format", "airoboros_chat"): ({"dataset_format": "messages", "prompt_format": "llama2"},
                                           "the fork's ShareGPT-style conversations in the Llama 2 chat prompt: "
                                           "--dataset_format messages --prompt_format llama2"),
    ("dataset_format", "alpaca-clean"): ({"dataset_format": "alpaca"}, "--dataset_format alpaca"),
    ("metric_for_best_model", "loss"): ({"metric_for_best_model": "eval_loss"}, "--metric_for_best_model eval_loss "
                                        "(the Trainer adds the eval_ prefix)"),
    ("metric_for_best_model", "eval_rewards/accuracies"): ({"metric_for_best_model": "rewards/accuracies"},
                                                          "--metric_for_best_model rewards/accuracies (TRL's "
                                                          "name with the Trainer's eval_ prefix)"),
    ("lr_scheduler_type", "constant_with_warmup"): ({"lr_scheduler_type": "constant"},
                                                    "--lr_scheduler_type constant (qlorakit's warms up over "
                                                    "warmup_ratio)"),
}
_ROWS = ("give JSONL rows qlorakit reads (instruction/response, instruction/input/output, or messages) and "
         "--dataset_format auto")
REFUSED_VALUES: dict[tuple[str, str], str] = {
    ("dataset_format", name): f"qlora's {name} layout is not read here; {_ROWS}"
    for name in ("input-output", "chip2", "self-instruct", "hh-rlhf", "oasst1")
}

BOOLEAN_WORDS = {"true": True, "false": False}


def as_boolean(value) -> bool | None:
    """True or False for a yes/no value as given (None: a bare flag, which means true), None when it is neither."""
    if value is None or isinstance(value, bool):
        return value is not False
    return BOOLEAN_WORDS.get(str(value).lower())


def resolve(given: dict[str, tuple[object, str]], keys: dict[str, bool] | None = None
            ) -> tuple[dict[str, tuple[object, str]], list[str], list[str]]:
    """``given`` (key -> (value, where from)) in qlorakit's ``keys`` (key -> whether it is a yes/no key); the
    problems (refusals, contradictions, a bare flag that needs a value); the warning lines of the names that have no
    effect. A bare --flag (value None) of a yes/no key means true, as in Hugging Face's parser. Other keys pass
    through (unknown ones too: the config reports those with its own problems)."""
    keys = keys or {}
    out, problems, warnings = {}, [], []
    for key, (value, source) in given.items():
        if key in ALIASES:
            continue
        if value is None and key in keys:  # a bare --flag (or a YAML key without a value)
            if not (keys[key] and source.startswith("--")):
                problems.append(f"{key}: needs a value (from {source})")
                continue
            value = "true"
        out[key] = (value, source)
    for key, (value, source) in given.items():
        alias = ALIASES.get(key)
        if alias is None:
            continue
        flag = value if not alias.boolean else as_boolean(value)
        if alias.boolean and flag is None:
            problems.append(f"{key}: {value!r} (from {source}) is not true or false")
            continue
        if alias.kind == "ignored":
            warnings.append(f"{source}: has no effect here: {alias.note}")
        elif alias.kind == "refused" and (not alias.boolean or flag):
            problems.append(f"{key} (from {source}): {alias.note}")
        elif alias.kind == "renamed":
            _put(out, given, alias.target, value, f"{source} as {alias.target}", problems)
        elif alias.kind == "mapped":
            for k, v in alias.sets.get(flag, {}).items():
                _put(out, given, k, v, f"{source} {str(flag).lower()}", problems)
    for (key, value), (settings, _) in VALUE_ALIASES.items():
        if key in out and str(out[key][0]) == value:
            where = out.pop(key)[1]
            for k, v in settings.items():  # a key the user gave as well keeps their value
                out[k] = out[k] if k in out else (v, f"{where} {value}")
    for (key, value), note in REFUSED_VALUES.items():
        if key in out and str(out[key][0]) == value:
            problems.append(f"{key}: {value!r} (from {out.pop(key)[1]}): {note}")
    return out, problems, warnings


def _put(out: dict, given: dict, key: str, value, source: str, problems: list[str]) -> None:
    """Set ``key`` from an alias, unless the user gave it too: then the two must agree."""
    if key in given and key not in ALIASES and str(given[key][0]).lower() != str(value).lower():
        problems.append(f"{key}: {given[key][0]!r} (from {given[key][1]}) and {value!r} (from {source}) disagree; "
                        "give one of them")
        return
    out.setdefault(key, (value, source))


ALIAS_KINDS = {"renamed": "", "mapped": "", "ignored": "accepted, no effect: ", "refused": "refused: "}


def add_alias_options(parser: Parser) -> Parser:
    """One option per name of qlora, its fork and the Hugging Face Trainer (``compat.ALIASES``), with what it does."""
    import textwrap

    values = "".join(textwrap.fill(f"--{k} {v}: {note}.", 116, initial_indent="  ", subsequent_indent="    ") + "\n"
                     for (k, v), (_, note) in VALUE_ALIASES.items())
    group = parser.add_argument_group("names of qlora, its fork and the Hugging Face Trainer",
                                      f"Their scripts run as written (docs/coming-from-qlora.md). Values:\n{values}")
    for name, alias in ALIASES.items():
        bare = {"nargs": "?", "const": None} if alias.boolean else {}  # a bare yes/no flag is true
        group.add_argument(f"--{name}", metavar="true|false" if alias.boolean else "VALUE", default=argparse.SUPPRESS,
                           help=f"({alias.origin}) {ALIAS_KINDS[alias.kind]}{alias.note}.".replace("%", "%%"), **bare)
    return parser


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def report_to_names(report_to: str) -> list[str]:
    """The trackers ``report_to`` names ('none' and 'all' as given)."""
    return [name for name in report_to.replace(" ", ",").split(",") if name]


def validate_qlora_keys(cfg) -> list[str]:
    """The problems of the keys that came from qlora, its fork and the Trainer."""
    problems = []
    for name in ("source_max_len", "target_max_len", "max_train_samples", "max_eval_samples", "max_mmlu_samples"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name}: must be >= 0 (0 = no limit), got {getattr(cfg, name)}")
    if cfg.mmlu_source_max_len < 1:
        problems.append(f"mmlu_source_max_len: must be at least 1, got {cfg.mmlu_source_max_len}")
    if cfg.data_seed < -1:
        problems.append(f"data_seed: must be >= 0, or -1 for seed, got {cfg.data_seed}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            problems.append(f"{name}: must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.adam_epsilon <= 0:
        problems.append(f"adam_epsilon: must be > 0, got {cfg.adam_epsilon}")
    unknown = [n for n in report_to_names(cfg.report_to) if n not in ("none", "all", *TRACKERS)]
    if unknown:
        problems.append(f"report_to: {', '.join(unknown)} is not one of none, all, {', '.join(TRACKERS)}")
    implied = "false" if cfg.metric_for_best_model == "eval_loss" else "true"
    if cfg.greater_is_better not in ("auto", implied):
        problems.append(f"greater_is_better: {cfg.greater_is_better} contradicts metric_for_best_model "
                        f"{cfg.metric_for_best_model} ({'higher' if implied == 'true' else 'lower'} is better); "
                        "leave it auto")
    if cfg.do_mmlu_eval and cfg.eval_strategy == "no":
        problems.append("do_mmlu_eval: MMLU is scored at each evaluation; set eval_strategy to steps or epoch")
    return problems
