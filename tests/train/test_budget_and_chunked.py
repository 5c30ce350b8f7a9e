"""Training with a token budget per micro-batch and with the chunked loss: the same optimizer step as the plain
paths, so the token-normalized loss and the accumulation equivalence hold through them."""

from __future__ import annotations

import pytest

from helpers import SGD_ONE_STEP, airoboros_rows, lora_b, read_metrics, rel_diff, write_jsonl
from qlorakit.cli import main
from qlorakit.data.formats import read_jsonl
from qlorakit.data.tokenize import tokenize_all
from qlorakit.train.schedule import budget_steps

pytestmark = pytest.mark.numerics  # rerun on AVX2 kernels where the CPU has AVX512


@pytest.fixture()
def rows_and_lengths(tmp_path, tokenizer):
    rows = airoboros_rows(4)  # responses of 1 to 80 words
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    lengths = [len(e) for e in tokenize_all(read_jsonl(data), tokenizer, "airoboros", 1024)[0]]
    return data, lengths


def test_budget_step_equals_one_big_batch(tiny_llama, tmp_path, rows_and_lengths):
    """One step over every example: 4 examples in one packed row, or the same 4 in budget-sized rows accumulated."""
    data, lengths = rows_and_lengths
    budget = max(lengths)  # the longest example fills a row alone, so the budget makes several rows
    rows = len(budget_steps(lengths, 0, seed=42, budget=budget, accum=1))
    assert 2 <= rows <= 4
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP,
              "--model_max_len", str(budget)]
    assert main(["train", *common, "--output_dir", str(tmp_path / "b4"), "--per_device_train_batch_size", "4"]) == 0
    assert main(["train", *common, "--output_dir", str(tmp_path / "budget"), "--max_tokens_per_batch", str(budget),
                 "--gradient_accumulation_steps", str(rows)]) == 0
    one, packed = lora_b(tmp_path / "b4"), lora_b(tmp_path / "budget")
    assert sum(float(v.abs().sum()) for v in one.values()) > 0
    assert rel_diff(one, packed) < 1e-3
    (want,), (got,) = read_metrics(tmp_path / "b4", "loss"), read_metrics(tmp_path / "budget", "loss")
    assert got["trained_tokens"] == want["trained_tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_budget_steps_cover_the_epoch_once_within_budget(rows_and_lengths):
    _, lengths = rows_and_lengths
    lengths = lengths * 5  # 20 examples
    budget = max(lengths) + 7
    for world in (1, 2):
        steps = [budget_steps(lengths, 1, seed=3, budget=budget, accum=2, world_size=world, rank=r)
                 for r in range(world)]
        seen = []
        for per_rank in zip(*steps):
            assert len({s.examples[0] for s in per_rank}) == 1  # every rank plans the same step
            mine = [mb for s in per_rank for mb in s.micro_batches]
            assert all(sum(lengths[i] for i in mb) <= budget for mb in mine)
            assert sorted(i for mb in mine for i in mb) == sorted(per_rank[0].examples)
            seen += per_rank[0].examples
        assert sorted(seen) == list(range(len(lengths)))
    assert budget_steps(lengths, 1, seed=3, budget=budget, accum=2) == \
        budget_steps(lengths, 1, seed=3, budget=budget, accum=2)


def test_chunked_loss_trains_like_the_plain_loss(tiny_llama, tmp_path, rows_and_lengths):
    data, _ = rows_and_lengths
    common = ["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP,
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    for mode in ("true", "false"):
        assert main(["train", *common, "--output_dir", str(tmp_path / mode), "--chunked_loss", mode]) == 0
    assert rel_diff(lora_b(tmp_path / "false"), lora_b(tmp_path / "true")) < 1e-4
    (plain,), (chunked,) = read_metrics(tmp_path / "false", "loss"), read_metrics(tmp_path / "true", "loss")
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)


@pytest.mark.parametrize("args,want", [
    (["--max_tokens_per_batch", "100", "--model_max_len", "512"], "max_tokens_per_batch: 100 is below model_max_len"),
    (["--max_tokens_per_batch", "1024", "--packing", "false"], "max_tokens_per_batch: needs packing true"),
])
def test_budget_settings_refused_in_one_line(args, want, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert want in err and err.count("\n") == 1


def test_mpt_refuses_a_budget_and_a_chunked_head(tiny_mpt, tmp_path, capsys):
    data = write_jsonl(tmp_path / "r.jsonl", airoboros_rows(4))
    common = ["--model_name_or_path", str(tiny_mpt), "--dataset", str(data), "--max_steps", "1",
              "--output_dir", str(tmp_path / "out")]
    assert main(["train", *common, "--max_tokens_per_batch", "1024"]) == 2
    assert "MptForCausalLM takes no position ids" in capsys.readouterr().err
    assert main(["train", *common, "--chunked_loss", "true"]) == 2
    assert "has no plain output head to chunk" in capsys.readouterr().err
