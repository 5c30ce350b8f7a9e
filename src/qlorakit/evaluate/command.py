"""``qlorakit eval RUN_DIR``: loss, perplexity and answer scores of the base and the tuned model side by side; with
``--tasks``, lm-evaluation-harness's (evaluate/tasks_command.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..metrics import answer_metrics, contains
from ..train.step import supports_packing
from ..train.validate import eval_loss

# ---------------------------------------------------------------------------------------------------------------
# qlorakit eval RUN_DIR --dataset FILE [--mmlu FILE] [--generate N]: base and tuned model side by side.

LETTERS = "ABCD"


def answer_scores(replies: list[str], references: list[str]) -> dict[str, float]:
    """The answer metrics of training's evaluation (metrics.py: exact_match, token_f1, rouge_l) and 'contains' (the
    normalized reference appears in the normalized reply), each a mean over the rows."""
    n = max(len(references), 1)
    return answer_metrics(replies, references) | {"contains": sum(map(contains, replies, references)) / n}


def read_mmlu(path: Path) -> list[dict]:
    """MMLU-layout rows: CSV ``question,A,B,C,D,answer`` (the original files, no header) or JSONL with
    ``question``, ``choices`` (4 strings) and ``answer`` (a letter or an index)."""
    import csv

    from ..data.formats import DataError, _json_rows

    rows = []
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            for lineno, rec in enumerate(csv.reader(f), start=1):
                if len(rec) != 6 or rec[5].strip().upper() not in LETTERS:
                    raise DataError(f"{path}:{lineno}: expected question,A,B,C,D,answer with answer in A-D")
                rows.append({"question": rec[0], "choices": rec[1:5], "answer": rec[5].strip().upper()})
    else:
        for lineno, rec in _json_rows(path):
            ans = rec.get("answer")
            ans = LETTERS[ans] if isinstance(ans, int) and 0 <= ans < 4 else str(ans).strip().upper()
            if not isinstance(rec.get("choices"), list) or len(rec["choices"]) != 4 or ans not in LETTERS:
                raise DataError(f"{path}:{lineno}: expected question, 4 choices and an answer letter A-D")
            rows.append({"question": rec["question"], "choices": rec["choices"], "answer": ans})
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


@torch.no_grad()
def mmlu_accuracy(model, tokenizer, prompt_format: str, rows: list[dict]) -> float:
    """Share of questions whose answer letter is the most likely of A-D as the first token of the reply."""
    from ..data.formats import Message
    from ..data.tokenize import prompt_ids

    letter_ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in LETTERS]
    device = next(model.parameters()).device
    right = 0
    for r in rows:
        body = r["question"] + "\n" + "\n".join(f"{c}. {t}" for c, t in zip(LETTERS, r["choices"]))
        ids = prompt_ids([Message("user", body + "\nAnswer with the letter only.")], tokenizer, prompt_format)
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
        right += LETTERS[int(logits[letter_ids].argmax())] == r["answer"]
    return right / len(rows)


EVAL_DESCRIPTION = """Score a run's tuned model beside its base model (the same weights with the adapter off), and
print a table of both. With --dataset: the loss and perplexity per trained token, computed as in training, and answer
scores of greedy replies to the first --generate rows, as training's evaluation scores them (exact_match and
token_f1 on SQuAD-normalized text: case, punctuation, articles and spacing dropped; rouge_l: ROUGE-L F-measure;
contains: the normalized reference appears in the normalized reply; each a mean in [0, 1]). With --mmlu:
the share of questions whose answer letter is the most likely first token of the reply.

--output writes {"base": {...}, "tuned": {...}}, each with the keys it measured: eval_loss, eval_perplexity,
eval_tokens (the trained tokens the loss is over), exact_match, token_f1, rouge_l, contains, mmlu_accuracy.

With --tasks: EleutherAI's lm-evaluation-harness (pip install 'qlorakit[eval]') on the tuned model, in the run's
precision: lm-eval's task names, groups, tags and patterns (mmlu, hellaswag, mmlu_*), paths of task YAML files in
lm-eval's format, and qlorakit's offline tasks, which need no download: qlorakit (both of these),
qlorakit_mmlu_sample (45 multiple-choice questions in MMLU's layout; acc) and qlorakit_closed_context (40
closed-context questions in the airoboros format; greedy replies scored as --dataset scores them). Hub datasets are
read from the local datasets cache only (offline). --compare adds the base (the same weights with the adapter off) and
any runs named after it, scored on the same prompts. Prompts are lm-eval's, with no chat template, unless
--apply_chat_template: then every model, the base too, sees them in RUN_DIR's prompt format. The table has one row
per task and metric (value ± standard error); RUN_DIR/lm_eval_results.json and a section of RUN_DIR/README.md (the
model card) get the same, and --output a copy of the JSON: {tasks, num_fewshot, limit, batch_size, precision, ...,
models: {NAME: {results: {TASK: {METRIC: value, METRIC_stderr: value}}, n_shot, n_samples}}}."""


def eval_parser():
    from ..options import Parser, non_negative_integer

    p = Parser("qlorakit eval", usage="qlorakit eval RUN_DIR (--tasks T1,T2 [--compare [RUN ...]] [--num_fewshot N] "
               "[--limit N] [--batch_size N] [--apply_chat_template] | --dataset FILE [--mmlu FILE] [--generate N]) "
               "[--output FILE.json]", description=EVAL_DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                   help="a run directory of 'qlorakit train', or a checkpoint-STEP folder in one")
    p.add_argument("--dataset", metavar="FILE", default="", help="JSONL in the run's training layout")
    p.add_argument("--mmlu", metavar="FILE", default="", help="MMLU-layout questions: CSV question,A,B,C,D,answer "
                   "(the original files) or JSONL with question, choices (4) and answer (a letter or an index)")
    p.add_argument("--generate", metavar="N", type=non_negative_integer, default=50,
                   help="how many --dataset rows to answer for the answer scores; 0 = none. Default: 50.")
    p.add_argument("--output", metavar="FILE.json", default="", help="where to write the results as JSON")
    add_harness_options(p)
    return p


def example_limit(text: str) -> int | float:
    """--limit: a whole number of examples, or a share of them below 1 (lm-eval's two readings)."""
    import argparse

    from ..options import positive_number

    value = positive_number(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"expects a whole number of examples or a share below 1, got {text!r}")
    return int(value) if value >= 1 else value


def add_harness_options(p) -> None:
    from ..options import non_negative_integer, positive_integer

    p.add_argument("--tasks", metavar="T1,T2", default="", help="lm-eval tasks, comma-separated: names, groups, "
                   "tags, patterns, task YAML files, or qlorakit's offline tasks (qlorakit, qlorakit_mmlu_sample, "
                   "qlorakit_closed_context)")
    p.add_argument("--compare", metavar="RUN", nargs="*", default=None, help="with --tasks: score the base and "
                   "these runs too, side by side (--compare alone: the base and RUN_DIR)")
    p.add_argument("--num_fewshot", metavar="N", type=non_negative_integer, default=None,
                   help="few-shot examples per prompt. Default: each task's own (0 where it sets none).")
    p.add_argument("--limit", metavar="N", type=example_limit, default=None,
                   help="score at most N examples per task (below 1: that share of them). Default: all.")
    p.add_argument("--batch_size", metavar="N", type=positive_integer, default=8,
                   help="examples per forward pass, fixed (lm-eval's 'auto' probes memory, which a CPU run does not "
                   "need). Default: 8.")
    p.add_argument("--apply_chat_template", action="store_true",
                   help="render prompts in RUN_DIR's prompt format, for every model scored (the base too)")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log lines")


def check_mode(parser, o) -> None:
    """--tasks (lm-eval) or --dataset/--mmlu (qlorakit's own scores): one of the two, with its own options."""
    harness_only = [f"--{k}" for k in ("compare", "num_fewshot", "limit", "apply_chat_template")
                    if getattr(o, k) not in (None, False)]
    if o.tasks and (o.dataset or o.mmlu):
        parser.error("give --tasks (lm-eval) or --dataset/--mmlu, not both")
    if not o.tasks and harness_only:
        parser.error(f"{', '.join(harness_only)} go with --tasks")
    if not o.tasks and not o.dataset and not o.mmlu:
        parser.error("give --tasks T1,T2 (lm-eval), or --dataset FILE and/or --mmlu FILE")


def eval_main(argv: list[str]) -> int:
    """``qlorakit eval RUN_DIR --dataset FILE [--mmlu FILE] [--generate N] [--output FILE.json]``."""
    import json
    import sys

    from ..generation import Sampling, generate_replies
    from ..runs import load_run
    from ..data.formats import _json_rows, read_jsonl
    from ..data.tokenize import tokenize_all

    parser = eval_parser()
    o = parser.parse_args(argv)
    check_mode(parser, o)
    if o.tasks:
        from .tasks_command import tasks_main

        return tasks_main(o)
    run_dir, n_gen = o.run_dir, o.generate
    model, tok, cfg = load_run(run_dir)
    device, bf16 = next(model.parameters()).device, cfg.use_bf16()
    results: dict[str, dict] = {"tuned": {}, "base": {}}

    def both(fn):
        results["tuned"].update(fn())
        with model.disable_adapter():
            results["base"].update(fn())

    if o.dataset:
        path = Path(o.dataset)
        convs = read_jsonl(path, cfg.dataset_format)
        examples, _ = tokenize_all(convs, tok, cfg.prompt_format, cfg.model_max_len, cfg.truncation)
        both(lambda: eval_loss(model, examples, batch_size=cfg.per_device_eval_batch_size, pad_id=tok.pad_token_id,
                               packing=supports_packing(model), device=device, use_bf16=bf16))
        if n_gen > 0:
            raw = [row for _, row in _json_rows(path)][:n_gen]  # the rows read_jsonl read, with their extra keys
            refs = [r.get("answer") or c.messages[-1].content for r, c in zip(raw, convs)]
            prompts = [list(c.messages[:-1]) for c in convs[:len(refs)]]
            sampling = Sampling(max_new_tokens=min(256, max(len(tok(r)["input_ids"]) for r in refs) + 32))
            both(lambda: answer_scores(generate_replies(model, tok, cfg.prompt_format, prompts, sampling), refs))
    if o.mmlu:
        rows = read_mmlu(Path(o.mmlu))
        both(lambda: {"mmlu_accuracy": mmlu_accuracy(model, tok, cfg.prompt_format, rows)})
    keys = [k for k in results["tuned"] if k != "eval_tokens"]
    print(f"{'metric':<18}{'base':>12}{'tuned':>12}")
    for k in keys:
        print(f"{k:<18}{results['base'][k]:>12.4f}{results['tuned'][k]:>12.4f}")
    if o.output:
        Path(o.output).write_text(json.dumps(results, indent=2))
        print(f"qlorakit eval: results written to {o.output}", file=sys.stderr)
    return 0
