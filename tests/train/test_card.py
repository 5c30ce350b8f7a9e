"""The model card, what people publish next to the adapter: the base by its public id, data by file name or hub id,
never a path of the machine that trained it; metadata the hub reads (huggingface_hub's ModelCard) with a model-index
of the run's results; the loss plot."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import EvalResult, ModelCard

from helpers import airoboros_rows, read_metrics, write_jsonl
from qlorakit.cli import main
from qlorakit.config import TrainConfig
from qlorakit.data.mixture import SourceSummary
from qlorakit.resources import SAMPLE_DATASET
from qlorakit.train.card import reproduce_command, write_card
from qlorakit.train.card_metadata import EVAL_RESULTS_FILE, LM_EVAL_FILE
from qlorakit.train.loss_plot import SMOOTHING, loss_figure, smooth

SAMPLE = SourceSummary(str(SAMPLE_DATASET), "jsonl", "airoboros", "train", 200, 200, train_examples=200)


def _card(tmp_path, base_path: str, sources=(SAMPLE,), metrics=None, cfg=None, files=None, best_step=None) -> str:
    out = tmp_path / "run"
    out.mkdir()
    for name, data in (files or {}).items():
        (out / name).write_text(json.dumps(data))
    cfg = cfg or TrainConfig()
    write_card(cfg, out, base_path, metrics or [{"step": 1, "epoch": 1.0, "loss": 1.5}], best_step, "finished",
               "USER: {instruction} ASSISTANT: {response}", list(sources))
    return (out / "README.md").read_text()


def test_default_base_is_named_by_hub_id_and_its_cache_never_shows(tmp_path):
    cache = str(tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab")
    card = _card(tmp_path, cache)
    overview = card.split("## Overview", 1)[1].split("##", 1)[0]
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct`" in overview
    licence = card.split("## Licence and usage", 1)[1]
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in licence
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    loading = card.split("## How to use", 1)[1].split("## Licence", 1)[0]
    assert "from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')" in loading and "Q4_1 GGUF, dequantized" in loading
    assert "adapter = 'run'" in loading and "qlorakit chat run\n" in loading
    assert str(tmp_path) not in card and "SmolLM2-135M-Instruct.Q4_1" not in card


def test_a_local_base_is_named_by_its_folder_and_left_out_of_the_metadata(tmp_path):
    base = tmp_path / "models" / "my-llama"
    base.mkdir(parents=True)
    card = _card(tmp_path, str(base))
    assert "A LoRA adapter for `my-llama`" in card and "from_pretrained('my-llama')" in card
    assert "base_model" not in ModelCard(card).data.to_dict() and str(tmp_path) not in card


def test_other_bases_keep_their_own_name(tmp_path):
    card = _card(tmp_path, "my-org/llama-7b")
    assert "A LoRA adapter for `my-org/llama-7b`" in card and "QLoRA, NF4 4-bit base with double quantization" in card


@pytest.mark.parametrize("cfg, says", [
    (TrainConfig(), "on the responses and on the prompts at weight 0.1,"),
    (TrainConfig(prompt_loss_weight=0.0), "on the responses only,"),
    (TrainConfig(prompt_loss_weight=0.0, train_on_source=True), "on the responses and the prompts,"),
])
def test_the_card_says_what_the_loss_covered(tmp_path, cfg, says):
    assert f"Loss was computed {says} normalized" in _card(tmp_path, "my-org/llama-7b", cfg=cfg)


def test_card_states_the_highest_peak_gpu_memory_of_the_rows(tmp_path):
    """A resumed run's rows come from two processes: the card takes the highest of each peak, wherever it is (an
    eval row has none)."""
    rows = [{"step": 1, "epoch": 0.5, "loss": 1.5, "peak_allocated_gib": 7.25, "peak_reserved_gib": 9.5},
            {"step": 2, "epoch": 1.0, "loss": 1.2, "peak_allocated_gib": 8.125, "peak_reserved_gib": 9.0},
            {"step": 2, "epoch": 1.0, "eval_loss": 1.3, "eval_perplexity": 3.7},
            {"step": 3, "epoch": 1.5, "loss": 1.1, "peak_allocated_gib": 6.0, "peak_reserved_gib": 8.0}]
    results = _card(tmp_path, "my-org/llama-7b", metrics=rows).split("## Results", 1)[1].split("## How to use")[0]
    assert "Peak GPU memory in training: 8.12 GiB allocated, 9.50 GiB reserved" in results


def test_card_of_a_cpu_run_says_nothing_of_gpu_memory(tmp_path):
    card = _card(tmp_path, "my-org/llama-7b", metrics=[{"step": 1, "epoch": 1.0, "loss": 1.5},
                                                       {"step": 2, "epoch": 2.0, "loss": 1.2}])
    assert "Training loss went from 1.5000" in card
    assert "GPU memory" not in card and "GiB" not in card


def _results(card_text: str) -> dict:
    """The card's model-index as {dataset name: {metric: value}}, read back by huggingface_hub."""
    out: dict = {}
    for r in ModelCard(card_text).data.eval_results or []:
        assert isinstance(r, EvalResult) and r.task_type == "text-generation"
        out.setdefault(r.dataset_name, {})[r.metric_type] = r.metric_value
    return out


def test_a_run_from_an_absolute_path_publishes_no_local_path_and_its_results_round_trip(tiny_llama, tmp_path):
    """The run's data given by its absolute path under a temporary folder, the base a local folder there too: the
    card names neither folder, and its metadata, read back by huggingface_hub, holds the run's eval results."""
    (tmp_path / "private" / "layout").mkdir(parents=True)
    data = write_jsonl(tmp_path / "private" / "layout" / "mine.jsonl", airoboros_rows(10))
    out = tmp_path / "runs" / "tuned"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data.resolve()),
                 "--output_dir", str(out), "--eval_dataset_size", "2", "--max_steps", "2", "--eval_steps", "2",
                 "--eval_strategy", "steps", "--save_strategy", "no", "--bf16", "false"]) == 0
    text = (out / "README.md").read_text()
    for private in (str(tmp_path), str(tmp_path.resolve()), str(tiny_llama), "private/layout"):
        assert private not in text, private
    assert "| `mine.jsonl` | train |" in text and "--dataset mine.jsonl" in text
    assert "`qlorakit_config.yaml` beside it holds the exact config" in text
    assert str(data.resolve()) in (out / "qlorakit_config.yaml").read_text()  # what resume needs, kept there

    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] and meta["library_name"] == "peft" and meta["datasets"] == ["mine"]
    assert {"qlora", "qlorakit", "4bit"} <= set(meta["tags"]) and "base_model" not in meta  # a local base
    row = read_metrics(out, "eval_loss")[-1]
    expected = {k: v for k, v in row.items() if k in ("eval_loss", "eval_perplexity", "eval_exact_match",
                                                       "eval_token_f1", "eval_rouge_l")}
    assert len(expected) == 5  # the answers scored during training (eval_generate) are results too
    assert _results(str(card)) == {"mine (held-out split)": expected}
    assert meta["model-index"][0]["name"] == "tuned"


def test_the_model_index_holds_generation_metrics_mmlu_and_lm_eval_scores(tmp_path):
    """Generation metrics of the adapter's eval row (the best one where the run loaded it back), qlora's MMLU, and
    what other commands left in the run directory (qlorakit's eval_results.json, lm-eval's results file)."""
    rows = [{"step": 1, "epoch": 0.5, "loss": 1.5},
            {"step": 1, "epoch": 0.5, "eval_loss": 1.2, "eval_perplexity": 3.3, "eval_token_f1": 0.4,
             "eval_tokens": 40, "mmlu_eval_accuracy": 0.3},
            {"step": 2, "epoch": 1.0, "eval_loss": 1.4, "eval_perplexity": 4.1, "eval_token_f1": 0.35,
             "eval_exact_match": 0.1, "eval_tokens": 40}]
    lm_eval = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.42, "acc_stderr,none": 0.01,
                                        "acc_norm,none": 0.40}}}
    cfg = TrainConfig(load_best_model_at_end=True, eval_dataset="held.jsonl")
    held = SourceSummary("/somewhere/held.jsonl", "jsonl", "airoboros", "eval", 4, 4, eval_examples=4)
    card = _card(tmp_path, "my-org/llama-7b", sources=(SAMPLE, held), metrics=rows, cfg=cfg, best_step=1,
                 files={LM_EVAL_FILE: lm_eval, EVAL_RESULTS_FILE: {"my-org/qa": {"exact_match": 0.5}}})
    assert _results(card) == {"held": {"eval_loss": 1.2, "eval_perplexity": 3.3, "eval_token_f1": 0.4},
                              "MMLU (eval split)": {"accuracy": 0.3}, "arc_easy": {"acc": 0.42, "acc_norm": 0.40},
                              "my-org/qa": {"exact_match": 0.5}}
    assert "/somewhere" not in card


def test_the_reproduce_command_names_files_by_name_and_still_parses(tmp_path):
    from qlorakit.config import build_config

    cfg = build_config(["--dataset", f"{tmp_path}/a.jsonl:0.5,org/hub-set:split=train", "--output_dir",
                        str(tmp_path / "run"), "--model_name_or_path", "~/models/llama"])
    line = reproduce_command(cfg)
    assert str(tmp_path) not in line and "~" not in line
    again = build_config(line.split()[2:])
    assert (again.dataset, again.output_dir, again.model_name_or_path) == (
        "a.jsonl:0.5,org/hub-set:split=train", "run", "llama")


def test_smoothing_is_tensorboards_debiased_average():
    values = [4.0, 2.0, float("nan"), 3.0]
    w = SMOOTHING
    a1 = (1 - w) * 4.0
    a2 = a1 * w + (1 - w) * 2.0
    a3 = a2 * w + (1 - w) * 3.0
    expected = [a1 / (1 - w), a2 / (1 - w ** 2), a2 / (1 - w ** 2), a3 / (1 - w ** 3)]
    assert smooth(values) == pytest.approx(expected)
    assert smooth(values)[0] == 4.0  # debiased: without it the curve would start at 40% of the first loss
    assert smooth([1.0] * 5) == pytest.approx([1.0] * 5)


def test_the_loss_plot_draws_raw_smoothed_and_eval():
    rows = [{"step": i, "epoch": i / 4, "loss": 2.0 / i} for i in range(1, 9)]
    rows += [{"step": 4, "epoch": 1.0, "eval_loss": 0.9}, {"step": 8, "epoch": 2.0, "eval_loss": 0.5}]
    fig = loss_figure(rows)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["train (raw)", f"train (smoothed, EMA {SMOOTHING})", "eval"]
    raw, smoothed, evals = (list(ln.get_ydata()) for ln in lines)
    assert raw == [2.0 / i for i in range(1, 9)] and smoothed == pytest.approx(smooth(raw))
    assert evals == [0.9, 0.5] and lines[2].get_linestyle() == "None" and lines[2].get_marker() == "o"
    assert lines[0].get_alpha() < 1 and lines[1].get_alpha() is None  # the raw curve faint, the smoothed one opaque
