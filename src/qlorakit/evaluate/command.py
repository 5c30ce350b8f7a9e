"""``qlorakit eval RUN_DIR``: loss, perplexity and answer scores of the base and the tuned model side by side."""

from __future__ import annotations

from pathlib import Path

import torch

from ..metrics import answer_metrics, normalize_answer
from ..train.step import supports_packing
from ..train.validate import eval_loss

# ---------------------------------------------------------------------------------------------------------------
# qlorakit eval RUN_DIR --dataset FILE [--mmlu FILE] [--generate N]: base and tuned model side by side.

LETTERS = "ABCD"


def answer_scores(replies: list[str], references: list[str]) -> dict[str, float]:
    """The answer metrics of training's evaluation (metrics.py: exact_match, token_f1, rouge_l) and 'contains' (the
    normalized reference appears in the normalized reply), each a mean over the rows."""
    n = max(len(references), 1)
    contains = sum(normalize_answer(ref) in normalize_answer(r) for r, ref in zip(replies, references))
    return answer_metrics(replies, references) | {"contains": contains / n}


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
eval_tokens (the trained tokens the loss is over), exact_match, token_f1, rouge_l, contains, mmlu_accuracy."""


def eval_parser():
    from ..options import Parser, non_negative_integer

    p = Parser("qlorakit eval", usage="qlorakit eval RUN_DIR [--dataset FILE] [--mmlu FILE] [--generate N] "
               "[--output FILE.json]", description=EVAL_DESCRIPTION)
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                   help="a run directory of 'qlorakit train', or a checkpoint-STEP folder in one")
    p.add_argument("--dataset", metavar="FILE", default="", help="JSONL in the run's training layout")
    p.add_argument("--mmlu", metavar="FILE", default="", help="MMLU-layout questions: CSV question,A,B,C,D,answer "
                   "(the original files) or JSONL with question, choices (4) and answer (a letter or an index)")
    p.add_argument("--generate", metavar="N", type=non_negative_integer, default=50,
                   help="how many --dataset rows to answer for the answer scores; 0 = none. Default: 50.")
    p.add_argument("--output", metavar="FILE.json", default="", help="where to write the results as JSON")
    return p


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
    if not o.dataset and not o.mmlu:
        parser.error("give --dataset FILE and/or --mmlu FILE")
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
