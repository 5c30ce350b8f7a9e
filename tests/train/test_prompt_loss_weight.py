"""prompt_loss_weight: the loss sum_i w_i * ce_i / sum_i w_i over a whole optimizer step, w 1 on reply tokens and the
weight on prompt tokens. 0 is the replies-only batch and loss exactly, 1 is train_on_source true, 0.1 the default;
0.5 is the formula (the token-count normalization twin is caught), on the plain and the chunked head, and across
accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import SGD_ONE_STEP, adapter_weights, airoboros_rows, read_metrics, rel_diff, train_with, write_jsonl
from qlorakit.config import ConfigError, build_config
from qlorakit.data.batching import collate
from qlorakit.data.formats import read_jsonl
from qlorakit.data.tokenize import IGNORE, tokenize_conversation
from qlorakit.model.load import load_base_model
from qlorakit.model.lora import add_lora, target_modules
from qlorakit.train.step import loss_sum

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tokenizer):
    """The same rows tokenized for replies only, and with train_on_source."""
    path = write_jsonl(tmp_path_factory.mktemp("plw") / "d.jsonl", airoboros_rows(5))
    convs = read_jsonl(path)
    return ([tokenize_conversation(c, tokenizer, "airoboros") for c in convs],
            [tokenize_conversation(c, tokenizer, "airoboros", train_on_source=True) for c in convs])


@pytest.fixture(scope="module")
def model(tiny_llama):
    base = load_base_model(str(tiny_llama), bits=16, bf16=False, device=CPU)
    return add_lora(base, r=4, alpha=8, dropout=0.0, modules=target_modules(base, "all"), seed=0).eval()


@pytest.mark.parametrize("packing", [True, False])
def test_weight_0_is_todays_batch_and_1_is_train_on_sources_targets(examples, packing):
    plain, source = examples
    today = collate(plain, 0, packing)
    zero = collate(plain, 0, packing, prompt_weight=0.0)
    assert zero.keys() == today.keys() and "weights" not in zero
    assert all(torch.equal(zero[k], today[k]) for k in today if isinstance(today[k], torch.Tensor))
    one = collate(plain, 0, packing, prompt_weight=1.0)
    assert torch.equal(one["targets"], collate(source, 0, packing)["targets"])
    assert torch.equal(one["weights"], (one["targets"] != IGNORE).float())


@pytest.mark.parametrize("chunked", [False, True], ids=["plain-head", "chunked-head"])
@torch.no_grad()
def test_the_weighted_loss_and_its_normalization(model, examples, chunked):
    plain, source = examples
    loss0, n0 = loss_sum(model, collate(plain, 0, True, prompt_weight=0.0), CPU, chunked)
    today, n_today = loss_sum(model, collate(plain, 0, True), CPU, chunked)
    assert float(loss0) == float(today) and n0 == n_today  # exactly today's loss
    loss1, n1 = loss_sum(model, collate(plain, 0, True, prompt_weight=1.0), CPU, chunked)
    src, n_src = loss_sum(model, collate(source, 0, True), CPU, chunked)
    assert n1 == n_src and float(loss1) / n1 == pytest.approx(float(src) / n_src, rel=1e-5)

    # 0.5 against per-token losses computed here: reply tokens weigh 1, prompt tokens 0.5
    batch = collate(plain, 0, True, prompt_weight=0.5)
    inputs = {k: v for k, v in batch.items() if k not in ("targets", "weights")}
    logits = model(**inputs).logits[0]
    targets = batch["targets"][0]
    ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    trained = targets != IGNORE
    reply = collate(plain, 0, True)["targets"][0] != IGNORE
    prompt = trained & ~reply
    assert prompt.sum() > 0 and reply.sum() > 0
    want = (ce[reply].sum() + 0.5 * ce[prompt].sum()) / (reply.sum() + 0.5 * prompt.sum())
    loss_h, n_h = loss_sum(model, batch, CPU, chunked)
    assert n_h == pytest.approx(float(reply.sum() + 0.5 * prompt.sum()))
    assert float(loss_h) / n_h == pytest.approx(float(want), rel=1e-5)
    twin = (ce[reply].sum() + 0.5 * ce[prompt].sum()) / trained.sum()  # divided by the token count instead
    assert abs(float(twin) - float(want)) > 0.01 * float(want)


def _run(tiny_llama, data, out, *extra):
    train_with(["--model_name_or_path", str(tiny_llama), "--dataset", str(data), *SGD_ONE_STEP,
                "--per_device_train_batch_size", "4", "--output_dir", str(out), *extra])
    return adapter_weights(out), read_metrics(out, "loss")[0]["loss"]


def test_the_default_is_weight_0_1_weight_1_equals_train_on_source_and_0_is_replies_only(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))
    default, loss_default = _run(tiny_llama, data, tmp_path / "default")
    tenth, loss_tenth = _run(tiny_llama, data, tmp_path / "tenth", "--prompt_loss_weight", "0.1")
    assert loss_tenth == loss_default and all(torch.equal(default[k], tenth[k]) for k in default)
    zero, loss_zero = _run(tiny_llama, data, tmp_path / "zero", "--prompt_loss_weight", "0")
    assert loss_zero != loss_default and rel_diff(zero, default) > 1e-3
    # train_on_source alone: the default weight gives way (prompts at weight 1), no clash with a key not given
    source, loss_source = _run(tiny_llama, data, tmp_path / "source", "--train_on_source", "true")
    one, loss_one = _run(tiny_llama, data, tmp_path / "one", "--prompt_loss_weight", "1")
    assert loss_one == pytest.approx(loss_source, rel=1e-6) and loss_one != loss_zero
    assert rel_diff(source, one) < 1e-5 < 0.1 < rel_diff(zero, one)  # the prompt tokens did train


@pytest.mark.parametrize("argv, want", [
    ([], 0.1),
    (["--train_on_source", "true"], 0.0),  # prompts at weight 1 already
    (["--train_on_source", "false"], 0.0),  # said as qlora's command lines say it: the responses only
    (["--method", "dpo"], 0.0),  # a preference method scores completions only
    (["--method", "dpo", "--prompt_loss_weight", "0.3"], 0.3),  # given: kept
])
def test_the_default_weight_gives_way_only_to_keys_that_rule_it_out(argv, want):
    cfg = build_config(argv)
    assert cfg.prompt_loss_weight == want and ("prompt_loss_weight" in cfg.given) == ("--prompt_loss_weight" in argv)


def test_a_given_weight_with_train_on_source_is_still_one_clear_line():
    with pytest.raises(ConfigError, match="prompt_loss_weight: train_on_source true already trains"):
        build_config(["--train_on_source", "true", "--prompt_loss_weight", "0.1"])


def test_the_normalization_spans_the_whole_step_across_accumulation(tiny_llama, tmp_path):
    """Weight 0.5 with 2 micro-batches of 2 equals one micro-batch of 4: the summed weight of the whole step
    divides, not each micro-batch's own (the mean-of-means twin would differ)."""
    data = write_jsonl(tmp_path / "d.jsonl", airoboros_rows(4))
    one_batch, loss_a = _run(tiny_llama, data, tmp_path / "a", "--prompt_loss_weight", "0.5")
    accumulated, loss_b = _run(tiny_llama, data, tmp_path / "b", "--prompt_loss_weight", "0.5",
                               "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert rel_diff(one_batch, accumulated) < 1e-5
