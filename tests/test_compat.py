"""The names of qlora, its fork and the Hugging Face Trainer: every one is honoured, accepted with one warning line, or
refused in one line that says what to use; bare yes/no flags mean true; unknown keys stay errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlorakit.cli import main
from qlorakit.compat import ALIASES, VALUE_ALIASES
from qlorakit.config import FIELDS, ConfigError, build_config

# The fields of artidoro/qlora's qlora.py (ModelArguments, DataArguments, TrainingArguments, GenerationArguments).
QLORA = """model_name_or_path trust_remote_code use_auth_token eval_dataset_size max_train_samples max_eval_samples
source_max_len target_max_len dataset dataset_format cache_dir train_on_source mmlu_split mmlu_dataset do_mmlu_eval
max_mmlu_samples mmlu_source_max_len full_finetune adam8bit double_quant quant_type bits lora_r lora_alpha
lora_dropout max_memory_MB report_to output_dir optim per_device_train_batch_size gradient_accumulation_steps
max_steps weight_decay learning_rate remove_unused_columns max_grad_norm gradient_checkpointing do_train
lr_scheduler_type warmup_ratio logging_steps group_by_length save_strategy save_steps save_total_limit
max_new_tokens min_new_tokens do_sample num_beams num_beam_groups penalty_alpha use_cache temperature top_k top_p
typical_p diversity_penalty repetition_penalty length_penalty no_repeat_ngram_size""".split()
# What jondurbin's fork adds to them (its qlora.py of the llama-2-70b airoboros example, and --mpt before it).
FORK = """deepspeed expand_conversations max_shard_size merged_output_dir model_max_len num_train_epochs
per_device_eval_batch_size save_quantized_base skip_excess_length use_flash_attention_2 working_dir mpt
lora_modules""".split()
# The Hugging Face TrainingArguments their scripts pass (scripts/*.sh of qlora, the fork's README).
TRAINER = """data_seed evaluation_strategy eval_steps dataloader_num_workers logging_strategy do_eval adam_beta1
adam_beta2 adam_epsilon seed bf16 ddp_find_unused_parameters predict_with_generate do_predict""".split()

FORK_70B = """--model_name_or_path {model} --working_dir {tmp}/w --output_dir {tmp}/o --merged_output_dir {tmp}/m
--num_train_epochs 5 --logging_steps 1 --save_strategy steps --save_steps 75 --save_total_limit 3 --data_seed 11422
--evaluation_strategy steps --per_device_eval_batch_size 2 --eval_dataset_size 0.01 --eval_steps 75
--max_new_tokens 4096 --dataloader_num_workers 3 --logging_strategy steps --do_train --lora_r 64 --lora_alpha 16
--lora_modules all --bf16 --bits 4 --double_quant --quant_type nf4 --lr_scheduler_type constant --dataset {data}
--dataset_format airoboros_chat --model_max_len 4096 --per_device_train_batch_size 2 --learning_rate 0.00008
--adam_beta2 0.999 --max_grad_norm 0.3 --lora_dropout 0.0 --weight_decay 0.0 --seed 11422 --report_to wandb
--gradient_checkpointing --use_flash_attention_2 --ddp_find_unused_parameters False"""


@pytest.mark.parametrize("name", sorted(set(QLORA + FORK + TRAINER)))
def test_every_name_of_qlora_its_fork_and_the_trainer_is_read(name):
    assert name in FIELDS or name in ALIASES, name


def test_the_forks_70b_command_reads_as_written(tmp_path):
    argv = FORK_70B.format(model="m", tmp=tmp_path, data="c.json").split()
    warnings: list[str] = []
    cfg = build_config(argv, warnings)
    assert (cfg.bf16, cfg.gradient_checkpointing, cfg.double_quant) == ("true", "true", True)  # bare flags: true
    assert (cfg.eval_strategy, cfg.attn_implementation, cfg.data_seed, cfg.adam_beta2) == \
        ("steps", "flash_attention_2", 11422, 0.999)
    assert (cfg.dataset_format, cfg.prompt_format) == ("messages", "llama2")  # airoboros_chat
    assert (cfg.working_dir, cfg.merged_output_dir, cfg.report_to) == (f"{tmp_path}/w", f"{tmp_path}/m", "wandb")
    assert [w.split(":")[0] for w in warnings] == ["--max_new_tokens", "--dataloader_num_workers", "--do_train",
                                                  "--ddp_find_unused_parameters"]
    assert all("has no effect here: " in w for w in warnings)


def test_ignored_names_warn_once_each_in_one_line(tmp_path, capsys):
    """Through the CLI: a line each on stderr, then the run goes on (here to a missing model, refused)."""
    assert main(["train", "--model_name_or_path", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o"),
                 "--do_train", "--remove_unused_columns", "False", "--dataloader_num_workers", "3"]) == 2
    lines = capsys.readouterr().err.splitlines()
    warned = [x for x in lines if x.startswith("qlorakit train: warning: ")]
    assert [x.split()[3] for x in warned] == ["--do_train:", "--remove_unused_columns:", "--dataloader_num_workers:"]
    assert "remove_unused_columns: has no effect here: examples hold token ids and labels only" in warned[1]


@pytest.mark.parametrize("args,want", [
    (["--deepspeed", "ds.json"], "deepspeed (from --deepspeed): qlorakit shards with FSDP instead of DeepSpeed: use "
                                 "--fsdp true"),
    (["--full_finetune"], "full_finetune (from --full_finetune): qlorakit trains LoRA adapters"),
    (["--do_predict", "True"], "qlorakit generate RUN_DIR"),
    (["--dataset_format", "oasst1"], "dataset_format: 'oasst1' (from --dataset_format): qlora's oasst1 layout"),
    (["--use_flash_attention_2", "--attn_implementation", "eager"], "disagree; give one of them"),
    (["--do_train", "maybe"], "do_train: 'maybe' (from --do_train) is not true or false"),
    (["--evaluation_strategy", "sometimes"], "eval_strategy: 'sometimes' is not one of no, steps, epoch"),
    (["--do_mmlu_evaluation", "true"], "unknown key 'do_mmlu_evaluation' (from --do_mmlu_evaluation); did you mean "
                                          "'do_mmlu_eval'?"),
    (["--report_to", "neptune"], "report_to: neptune is not one of none, all, tensorboard, wandb, mlflow, trackio"),
])
def test_refusals_and_mistakes_say_what_to_use(args, want):
    with pytest.raises(ConfigError) as e:
        build_config(args)
    assert want in str(e.value)


def test_a_bare_flag_is_true_only_for_a_yes_no_key(tmp_path):
    from qlorakit.errors import UserError

    with pytest.raises(UserError, match="argument --lora_r: expected one argument"):
        build_config(["--lora_r", "--bf16"])
    with pytest.raises(ConfigError, match="lora_r: needs a value .*; double_quant: needs a value"):  # YAML keys
        build_config([str(write_yaml(tmp_path / "c.yaml", "lora_r:\ndouble_quant:\n"))])
    assert build_config(["--packing", "--bf16", "--lora_r", "8"]).packing is True


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_refused_yes_no_names_are_fine_when_false():
    assert build_config(["--full_finetune", "False", "--do_predict", "false", "--fp16", "false"]).bits == 4


def test_mapped_and_renamed_names_and_values():
    cfg = build_config(["--skip_excess_length", "--adam8bit", "--evaluation_strategy", "no",
                        "--dataset_format", "alpaca-clean", "--lr_scheduler_type", "constant_with_warmup",
                        "--report_to", "tensorboard", "wandb", "--group_by_length"])
    assert (cfg.truncation, cfg.optim, cfg.eval_strategy, cfg.dataset_format, cfg.lr_scheduler_type) == \
        ("drop", "paged_adamw_8bit", "no", "alpaca", "constant")
    assert cfg.report_to == "tensorboard,wandb" and cfg.group_by_length is True  # HF's list, qlora's bare flag
    own = build_config(["--dataset_format", "airoboros_chat", "--prompt_format", "chatml"])
    assert (own.dataset_format, own.prompt_format) == ("messages", "chatml")  # a key given keeps its value


def test_help_shows_each_alias(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, alias in ALIASES.items():
        assert f"--{name} " in text and " ".join(alias.note.split()) in text, name
    for (key, value), _ in VALUE_ALIASES.items():
        assert f"--{key} {value}" in text


def test_the_docs_table_has_every_name():
    doc = (Path(__file__).parents[1] / "docs" / "coming-from-qlora.md").read_text()
    for name in sorted(set(QLORA + FORK + TRAINER) | set(ALIASES)):
        assert f"`--{name}`" in doc, name
    for (key, value), _ in VALUE_ALIASES.items():
        assert f"`--{key} {value}`" in doc
