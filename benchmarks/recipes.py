"""Recipes: what helps on this task. An ablation of qlorakit's levers on the embedded model, with TRL as reference.

    python benchmarks/recipes.py                          # every arm x 3 seeds (hours on a 2-core CPU)
    python benchmarks/recipes.py --arms default,neftune   # some arms
    python benchmarks/recipes.py --resume                 # go on with an interrupted sweep
    python benchmarks/recipes.py --quick                  # smoke run: default and TRL, 1 seed, a few rows
    python benchmarks/recipes.py --render                 # print the table of saved results again
    python benchmarks/recipes.py --list                   # the arms and what each changes

The task set is benchmarks/data/recipes_train.jsonl and recipes_eval.jsonl (scripts/make_recipe_data.py; its
design is in docs/recipes.md): closed-context questions with one to three passages, distractor passages, one
question in five that the passages cannot answer, and plain instructions.

Each arm x seed is a separate ``python -m qlorakit train`` process with the arm's flags (and the seed) on top of
qlorakit's defaults: an arm names only what it changes, so ``default`` is ``qlorakit train`` with no
hyperparameter flags. TRL's row is ``benchmarks/_trl_job.py`` (SFTTrainer + peft + bitsandbytes) with qlora's
hyperparameters (``TRL_QLORA``, from artidoro/qlora's scripts/finetune_guanaco_7b.sh). Every adapter, TRL's
included, is then evaluated by one process of ``benchmarks/_recipe_eval.py`` (the same loader, eval loss and
greedy decoding) and scored by ``benchmarks/recipe_score.py`` on the same held-out rows.

Per run: the scorer's metrics, eval loss, seconds per optimizer step (qlorakit: the time between its first and
last logged step over the steps between them, read as its log lines arrive; TRL: ``trainer.train()`` seconds /
steps; both exclude loading), and the peak resident memory of the training process (its own ru_maxrss from
os.wait4). Results go to ``--out`` after every run (JSON, so ``--resume`` continues where a sweep stopped; a run
that failed is run again on resume); one markdown table (``recipe_table``) is printed at the end: per arm, mean
and min-max over seeds, how many seeds finished, and every failed seed with its reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from recipe_score import score_rows  # noqa: E402
from recipe_table import aggregate, seed_table, table  # noqa: E402

TRAIN = BENCH / "data" / "recipes_train.jsonl"
EVAL = BENCH / "data" / "recipes_eval.jsonl"
PAIRS = BENCH / "data" / "recipes_pairs.jsonl"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
SEEDS_FROM = 42

DPO_FLAGS = {"method": "dpo", "learning_rate": 1e-4, "num_train_epochs": 1}  # the dpo arms' shared flags
# The baseline every other arm changes one thing from: the loss on the responses only, qlorakit's defaults until the
# prompt-loss-weight arm beat them on every seed and prompt_loss_weight 0.1 became the default (README, "Recipes").
# The arms were measured on it; each still names it, so a rerun measures what the table shows.
RESPONSES = {"prompt_loss_weight": 0}
# arm -> (qlorakit train flags on top of its defaults, what it tests). Literature: docs/recipes.md.
ARMS = {
    "default": ({}, "qlorakit train with no hyperparameter flags (prompt_loss_weight 0.1)"),
    "responses": (RESPONSES, "the loss on the responses only: the defaults before prompt_loss_weight 0.1, and the "
                  "baseline of the arms below (Huerta-Enochian and Ko 2024 on prompt loss)"),
    "neftune": (RESPONSES | {"neftune_noise_alpha": 5}, "NEFTune noise on the input embeddings, alpha 5 "
                "(Jain et al. 2023)"),
    "rslora": (RESPONSES | {"use_rslora": "true"}, "rank-stabilized scale alpha/sqrt(r) (Kalajdzievski 2023)"),
    "loraplus": (RESPONSES | {"loraplus_lr_ratio": 16}, "LoRA+: B's learning rate 16x A's (Hayou et al. 2024)"),
    "gaussian": (RESPONSES | {"init_lora_weights": "gaussian"}, "A initialized Gaussian (peft's alternative init)"),
    "loftq": (RESPONSES | {"init_lora_weights": "loftq"}, "LoftQ: LoRA initialized against the quantization error "
              "(Li et al. 2023)"),
    "dora": (RESPONSES | {"use_dora": "true"}, "DoRA: weight-decomposed LoRA (Liu et al. 2024)"),
    "lr1e-4": (RESPONSES | {"learning_rate": 1e-4}, "learning rate 1e-4 (QLoRA's for 33B-65B)"),
    "lr2e-4": (RESPONSES | {"learning_rate": 2e-4}, "learning rate 2e-4 (QLoRA's for 7B-13B)"),
    "lr1e-3": (RESPONSES | {"learning_rate": 1e-3}, "learning rate 1e-3"),
    "r8": (RESPONSES | {"lora_r": 8, "lora_alpha": 16}, "rank 8 (alpha 16: the default's scale alpha/r = 2 kept)"),
    "r64": (RESPONSES | {"lora_r": 64, "lora_alpha": 128}, "rank 64 (alpha 128: scale 2 kept)"),
    "epochs1": (RESPONSES | {"num_train_epochs": 1}, "1 epoch"),
    "epochs3": (RESPONSES | {"num_train_epochs": 3}, "3 epochs"),
    "dropout0": (RESPONSES | {"lora_dropout": 0.0}, "no LoRA dropout"),
    "cosine": (RESPONSES | {"lr_scheduler_type": "cosine"}, "cosine decay after warmup"),
    "qlora_hp": (RESPONSES | {"lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "learning_rate": 2e-4,
                              "gradient_accumulation_steps": 4, "warmup_ratio": 0, "lr_scheduler_type": "constant",
                              "max_grad_norm": 0.3, "num_train_epochs": 3},
                 "qlorakit with TRL's row's hyperparameters (qlora's, responses only): tool vs recipe"),
    "dpo": (DPO_FLAGS, "the responses arm's run of the same seed, then DPO (beta 0.1, sigmoid) on "
            "recipes_pairs.jsonl: supervised tuning, then preferences"),
    "dpo_rpo": (DPO_FLAGS | {"rpo_alpha": 1.0},
                "as dpo, plus the chosen reply's per-token NLL (RPO, Pang et al. 2024: alpha 1.0)"),
    "trl": (None, "TRL SFTTrainer with qlora's hyperparameters (the reference row)"),
}
# an arm that continues another arm's run of the same seed (init_from)
FOLLOWS = {"dpo": "responses", "dpo_rpo": "responses"}
# qlora's Guanaco-7B script (artidoro/qlora scripts/finetune_guanaco_7b.sh; the README: dropout 0.1 up to 13B):
# r 64, alpha 16, dropout 0.1, lr 2e-4 constant after 3% warmup, batch 4 x accumulation 4, max grad norm 0.3, no
# weight decay, 1875 steps = 30,000 examples = 3.05 epochs of OASST1's 9,846 training rows: here 3 epochs.
# transformers' "constant" schedule ignores warmup (get_scheduler builds it without the warmup steps), so qlora's
# runs, and this row, have none; qlora_hp says warmup_ratio 0 for the same schedule in qlorakit.
TRL_QLORA = {"lora_r": 64, "lora_alpha": 16.0, "lora_dropout": 0.1, "lr": 2e-4, "scheduler": "constant",
             "warmup_ratio": 0.03, "batch": 4, "grad_accum": 4, "max_grad_norm": 0.3, "epochs": 3.0,
             "max_length": 1024}
LABELS = {"default": "default (no hyperparameter flags: prompt loss weight 0.1)",
          "responses": "responses only (`responses`: the old defaults, the baseline of the arms below)",
          "trl": "TRL SFTTrainer, qlora's hyperparameters",
          "dpo": "responses, then DPO", "dpo_rpo": "responses, then DPO + NLL (RPO)",
          "qlora_hp": "qlorakit, qlora's hyperparameters (`qlora_hp`)", "neftune": "NEFTune, alpha 5 (`neftune`)",
          "rslora": "rsLoRA: scale 32/sqrt(16) = 8 (`rslora`)", "loraplus": "LoRA+, B at 16x (`loraplus`)",
          "gaussian": "Gaussian A init (`gaussian`)", "loftq": "LoftQ init (`loftq`)", "dora": "DoRA (`dora`)",
          "lr1e-4": "learning rate 1e-4 (`lr1e-4`)",
          "lr2e-4": "learning rate 2e-4 (`lr2e-4`)", "lr1e-3": "learning rate 1e-3 (`lr1e-3`)",
          "r8": "rank 8, alpha 16 (`r8`)", "r64": "rank 64, alpha 128 (`r64`)", "epochs1": "1 epoch (`epochs1`)",
          "epochs3": "3 epochs (`epochs3`)", "dropout0": "LoRA dropout 0 (`dropout0`)",
          "cosine": "cosine schedule (`cosine`)"}
QUICK = {"arms": "default,trl", "seeds": 1, "train_rows": 16, "eval_rows": 8, "epochs": 1.0}
STEP_LINE = re.compile(r"^step (\d+)/(\d+) ")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="", help="comma-separated arms (default: all; --list shows them)")
    p.add_argument("--seeds", type=int, default=0, help=f"seeds per arm, {SEEDS_FROM}, {SEEDS_FROM + 1}, ... "
                   "(default 3)")
    p.add_argument("--epochs", type=float, default=0, help="epochs for every arm that does not set its own "
                   "(TRL's row included; default: qlorakit's default, TRL's 3)")
    p.add_argument("--steps", type=int, default=0, help="max optimizer steps for every run (default: none)")
    p.add_argument("--train-rows", type=int, default=0, help="train on the first N rows (default all 100; every "
                   "prefix holds each kind of row in its share)")
    p.add_argument("--eval-rows", type=int, default=0, help="evaluate on the first N held-out rows (default all 40)")
    p.add_argument("--max-new-tokens", type=int, default=72, help="longest greedy reply (default 72: the longest "
                   "held-out reference reply is 67 SmolLM2 tokens with its EOS)")
    p.add_argument("--bf16", action="store_true", help="train in bfloat16 autocast (qlorakit --bf16 true, TRL's "
                   "--bf16); default float32 on every CPU, so that tables from different machines compare "
                   "(qlorakit's own auto would choose bf16 on AMX and AVX512-BF16). Evaluation is float32 either way")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    p.add_argument("--model", default="default", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="", help="results JSON (default benchmarks/results/recipes.json; with --quick "
                   "recipes-quick.json)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "recipes"))
    p.add_argument("--resume", action="store_true", help="keep the finished runs in --out and run the rest")
    p.add_argument("--fresh", action="store_true", help="start over even if --out holds results")
    p.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter weights (default: "
                   "deleted once scored; logs, metrics and replies stay)")
    p.add_argument("--render", action="store_true", help="run nothing: print the table of --out")
    p.add_argument("--list", action="store_true", help="print the arms and exit")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if not getattr(args, k):
                setattr(args, k, v)
    args.seeds = args.seeds or 3
    args.out = args.out or str(BENCH / "results" / f"recipes{'-quick' if args.quick else ''}.json")
    args.arm_list = [a.strip() for a in (args.arms or ",".join(ARMS)).split(",") if a.strip()]
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {', '.join(unknown)}; the arms are {', '.join(ARMS)}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Child processes


def child_env() -> dict:
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def run_child(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd``; its exit code, wall seconds, own peak RSS (MiB), and the arrival time of each ``step N/T``
    line of its output (qlorakit's plain progress lines), so the loop's pace can be read without loading."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[int, float]] = []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(shlex.join(cmd) + "\n")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT,
                                text=True, errors="replace")
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()  # a sweep's progress can be watched in the log
                m = STEP_LINE.match(line)
                if m:
                    steps.append((int(m[1]), time.perf_counter()))
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "wall_seconds": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024,
            "step_times": steps, "log": str(log_path)}


def seconds_per_step(step_times: list[tuple[int, float]]) -> float | None:
    """Seconds per step between the first and the last logged step (None with fewer than two)."""
    if len(step_times) < 2 or step_times[-1][0] <= step_times[0][0]:
        return None
    return (step_times[-1][1] - step_times[0][1]) / (step_times[-1][0] - step_times[0][0])


def failure_reason(log_path: Path, rc: int) -> str:
    """The last meaningful line of a failed child's log (qlorakit prints a user mistake as one line)."""
    lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return f"exit {rc}: {lines[-1][:300] if len(lines) > 1 else 'no output'}"


def flag_list(flags: dict) -> list[str]:
    out = []
    for k, v in flags.items():
        out += [f"--{k}", str(v)]
    return out


def qlorakit_command(arm: str, seed: int, files: dict, out: Path, args) -> list[str]:
    flags = dict(ARMS[arm][0])
    if args.epochs and "num_train_epochs" not in flags:
        flags["num_train_epochs"] = args.epochs
    if args.steps:
        flags["max_steps"] = args.steps
    base = {"model_name_or_path": args.model, "dataset": str(files["train"]), "dataset_format": "airoboros",
            "seed": seed, "output_dir": str(out), "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1,
            "bf16": "true" if args.bf16 else "false"}
    if arm in FOLLOWS:  # the base model, rank and prompt format come from the run it continues; the data are pairs
        base = {k: v for k, v in base.items() if k not in ("model_name_or_path", "dataset_format")}
        base |= {"dataset": str(files["pairs"]), "init_from": str(adapter_dir(args, FOLLOWS[arm], seed))}
    return [sys.executable, "-m", "qlorakit", "train"] + flag_list(base) + flag_list(flags)


def trl_command(model_dir: str, data: Path, out: Path, report: Path, seed: int, args) -> list[str]:
    j = dict(TRL_QLORA, epochs=args.epochs or TRL_QLORA["epochs"])
    cmd = [sys.executable, str(BENCH / "_trl_job.py"), "--model", model_dir, "--data", str(data), "--output_dir",
           str(out), "--report", str(report), "--seed", str(seed)]
    cmd += flag_list(j) + (["--bf16"] if args.bf16 else [])
    if args.steps:
        cmd += ["--max_steps", str(args.steps)]
    return cmd


def eval_command(model_dir: str, adapter: Path, eval_file: Path, out: Path, args) -> list[str]:
    return [sys.executable, str(BENCH / "_recipe_eval.py"), "--model", model_dir, "--adapter", str(adapter),
            "--eval", str(eval_file), "--out", str(out), "--max_new_tokens", str(args.max_new_tokens)]


# ----------------------------------------------------------------------------------------------------------------
# One run: train, evaluate, score


def adapter_dir(args, arm: str, seed: int) -> Path:
    return Path(args.runs_dir) / f"{arm}-s{seed}" / "adapter"


def train_one(arm: str, seed: int, run_dir: Path, model_dir: str, files: dict, args) -> dict:
    """Train one arm x seed; the training numbers, or ``status: failed`` with the reason."""
    adapter = run_dir / "adapter"
    load_before = os.getloadavg()[0]  # a shared machine's load: seconds per step are only comparable at like loads
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if arm == "trl":
        report = run_dir / "trl_report.json"
        child = run_child(trl_command(model_dir, files["trl"], adapter, report, seed, args), run_dir / "train.log")
    else:
        start = adapter_dir(args, FOLLOWS[arm], seed) if arm in FOLLOWS else None
        if start and not (start / "adapter_model.safetensors").is_file():
            return {"arm": arm, "seed": seed, "status": "failed", "reason": f"{arm} continues the {FOLLOWS[arm]} "
                    f"arm's run of seed {seed}, and {start} holds no adapter: run --arms {FOLLOWS[arm]},{arm}"}
        child = run_child(qlorakit_command(arm, seed, files, adapter, args), run_dir / "train.log")
    out = {"arm": arm, "seed": seed, "train_wall_seconds": child["wall_seconds"], "peak_rss_mib": child["peak_rss_mib"],
           "train_log": child["log"], "load_average": [load_before, os.getloadavg()[0]]}
    if child["rc"] != 0:
        return out | {"status": "failed", "reason": failure_reason(Path(child["log"]), child["rc"])}
    if arm == "trl":
        rep = json.loads(report.read_text(encoding="utf-8"))
        out |= {"steps": rep["steps"], "seconds_per_step": rep["train_seconds"] / max(rep["steps"], 1)}
    else:
        out |= {"steps": child["step_times"][-1][0] if child["step_times"] else None,
                "seconds_per_step": seconds_per_step(child["step_times"])}
    if arm in FOLLOWS:  # the settings' digest covers the train and eval files; this names the pairs a run used
        out["pairs_sha256"] = hashlib.sha256(files["pairs"].read_bytes()).hexdigest()[:16]
    return out | {"status": "ok", "adapter": str(adapter)}


def evaluate_one(result: dict, run_dir: Path, model_dir: str, files: dict, eval_rows: list[dict], args) -> dict:
    """Eval loss, replies and the scorer's metrics of a trained run (``status: failed`` if evaluation fails)."""
    report = run_dir / "eval.json"
    child = run_child(eval_command(model_dir, Path(result["adapter"]), files["eval"], report, args),
                      run_dir / "eval.log")
    result = result | {"eval_wall_seconds": child["wall_seconds"]}
    if child["rc"] != 0:
        return result | {"status": "failed", "reason": "evaluation " + failure_reason(Path(child["log"]),
                                                                                     child["rc"])}
    rep = json.loads(report.read_text(encoding="utf-8"))
    replies = rep["replies"]
    with open(run_dir / "replies.jsonl", "w", encoding="utf-8") as f:
        for row, reply in zip(eval_rows, replies):
            f.write(json.dumps({"instruction": row["instruction"], "reference": row["response"],
                                "reply": reply}, ensure_ascii=False) + "\n")
    followed = any(FOLLOWS.get(a) == result["arm"] for a in args.arm_list)  # a later arm starts from it
    if not (args.keep_adapters or followed):
        for p in Path(result["adapter"]).glob("*.safetensors"):
            p.unlink()
    return result | {"eval_loss": rep["eval_loss"], "metrics": score_rows(eval_rows, replies)}


# ----------------------------------------------------------------------------------------------------------------
# Data, results file, table


def read_rows(path: Path, n: int) -> list[dict]:
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return rows[:n] if n else rows


def write_rows(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def prepare_data(model_dir: str, args) -> tuple[dict, list[dict], dict]:
    """The train and eval files the runs read (first N rows where asked), TRL's prompt/completion rendering of
    the same training rows (qlorakit's airoboros text, as benchmarks/vs_trl.py builds it), and the settings that
    make results comparable."""
    from qlorakit.data.formats import read_jsonl
    from qlorakit.model.load import load_tokenizer
    from vs_trl import prompt_completion

    data_dir = Path(args.runs_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = read_rows(TRAIN, args.train_rows), read_rows(EVAL, args.eval_rows)
    files = {"train": data_dir / "train.jsonl", "eval": data_dir / "eval.jsonl", "trl": data_dir / "trl.jsonl",
             "pairs": data_dir / "pairs.jsonl"}
    prompts = {r["instruction"] for r in train_rows}  # the pairs of the training rows taken
    write_rows(files["pairs"], (p for p in read_rows(PAIRS, 0) if p["prompt"] in prompts))
    write_rows(files["train"], train_rows)
    write_rows(files["eval"], eval_rows)
    tokenizer = load_tokenizer(model_dir)
    write_rows(files["trl"], (prompt_completion(c, tokenizer) for c in read_jsonl(files["train"], "airoboros")))
    digest = hashlib.sha256(files["train"].read_bytes() + files["eval"].read_bytes()).hexdigest()[:16]
    settings = {"model": model_dir, "data_sha256": digest, "train_rows": len(train_rows),
                "eval_rows": len(eval_rows), "epochs": args.epochs, "steps": args.steps,
                "max_new_tokens": args.max_new_tokens, "compute": compute(args)}
    return files, eval_rows, settings


def compute(args) -> str:
    return "bfloat16" if args.bf16 else "float32"


def load_results(path: Path, settings: dict, args) -> dict:
    if path.exists() and not args.fresh:
        if not args.resume:
            sys.exit(f"{path} holds results: give --resume to go on with them, --fresh to start over, or --out")
        res = json.loads(path.read_text(encoding="utf-8"))
        # files from before the compute was a setting were made on AVX2-only CPUs, where qlorakit's bf16 auto is
        # float32 (and TRL's row was float32): say so, so that they resume
        res.setdefault("settings", {}).setdefault("compute", "float32")
        if res.get("settings") != settings:
            sys.exit(f"{path} was made with other settings ({res.get('settings')}); these are {settings}: "
                     "give --fresh or another --out")
        return res
    return {"settings": settings, "runs": {}}


def todo_runs(res: dict, arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The (arm, seed) runs still to do: those not recorded, and those recorded as failed (run again). Seed by
    seed, so a sweep stopped early leaves whole seeds (every arm of the first seeds), not whole arms."""
    return [(a, s) for s in seeds for a in arms if res["runs"].get(f"{a}/{s}", {}).get("status") != "ok"]


def save_results(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


VECTOR_UNITS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "avx512f": "AVX512", "avx2": "AVX2"}


def machine() -> dict:
    """The processor's name, its core count, the widest of its vector units in VECTOR_UNITS (what decides its
    float32 and bf16 speed) and Python's version, from one read of /proc/cpuinfo."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    field = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines) if v}  # every CPU's alike
    flags = set(field.get("flags", "").split())
    return {"processor": field.get("model name") or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "vector_units": next((n for f, n in VECTOR_UNITS.items() if f in flags), "?"),
            "python": sys.version.split()[0]}


def render(res: dict, arms: list[str] | None = None) -> str:
    runs = list(res["runs"].values())
    arms = arms or [a for a in ARMS if any(r["arm"] == a for r in runs)]
    s, m = res["settings"], res.get("machine", {})
    head = (f"Recipes on {Path(s['model']).name}: {s['train_rows']} training rows, {s['eval_rows']} held-out rows "
            f"(greedy, up to {s['max_new_tokens']} new tokens), {s.get('compute', 'float32')} compute on "
            f"{m.get('processor', '?')} ({m.get('cpus', '?')} cores"
            f"{', ' + m['vector_units'] if m.get('vector_units') else ''}), "
            f"epochs: {'%g' % s['epochs'] if s['epochs'] else 'each arm its own'}"
            f"{', at most %d steps' % s['steps'] if s['steps'] else ''}. Each cell: mean (min–max) over the seeds "
            "that finished.")
    first = [a for a in ("responses", "default") if a in arms][:1]  # the baseline first, where it ran
    by_seed = seed_table(runs, first + [a for a in arms if a not in first])  # arms by name: a narrow table
    return (head + "\n\n" + table(aggregate(runs, arms), LABELS) + "\n\nExact match seed by seed (in brackets: "
            f"the difference from `{first[0] if first else 'the first column'}` on that seed):\n\n" + by_seed
            + "\n\ncommand: " + res.get("command", "?"))


def list_arms() -> None:
    for name, (flags, what) in ARMS.items():
        shown = "benchmarks/_trl_job.py " + " ".join(flag_list(TRL_QLORA)) if flags is None else \
            ("qlorakit train " + " ".join(flag_list(flags))).strip()
        print(f"{name:10} {what}\n{'':10} {shown}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        list_arms()
        return 0
    out = Path(args.out)
    if args.render:
        print(render(json.loads(out.read_text(encoding="utf-8"))))
        return 0
    os.environ.update(OFFLINE_ENV)
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]  # this process imports qlorakit from this checkout too
    sys.path.insert(0, str(ROOT / "src"))
    from qlorakit.model.load import resolve_model_path

    command = shlex.join(["python", "benchmarks/recipes.py"] + (sys.argv[1:] if argv is None else argv))
    model_dir = resolve_model_path(args.model)
    files, eval_rows, settings = prepare_data(model_dir, args)
    res = load_results(out, settings, args)
    res.update(command=command, machine=machine())
    seeds = list(range(SEEDS_FROM, SEEDS_FROM + args.seeds))
    todo = todo_runs(res, args.arm_list, seeds)
    print(f"{len(todo)} runs to do ({len(args.arm_list)} arms x {len(seeds)} seeds, "
          f"{len(args.arm_list) * len(seeds) - len(todo)} done); results: {out}", flush=True)
    for i, (arm, seed) in enumerate(todo, 1):
        run_dir = Path(args.runs_dir) / f"{arm}-s{seed}"
        print(f"[{i}/{len(todo)}] {arm} seed {seed}: training ({run_dir})", flush=True)
        result = train_one(arm, seed, run_dir, model_dir, files, args)
        if result["status"] == "ok":
            print(f"[{i}/{len(todo)}] {arm} seed {seed}: evaluating", flush=True)
            result = evaluate_one(result, run_dir, model_dir, files, eval_rows, args)
        res["runs"][f"{arm}/{seed}"] = result
        save_results(out, res)
        em = result.get("metrics", {}).get("exact_match")
        print(f"[{i}/{len(todo)}] {arm} seed {seed}: {result['status']}"
              + (f", exact match {em:.3f}, eval loss {result['eval_loss']:.3f}" if em is not None else "")
              + (f" ({result['reason']})" if result["status"] != "ok" else ""), flush=True)
    res["markdown"] = render(res, args.arm_list)
    save_results(out, res)
    print("\n" + res["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
