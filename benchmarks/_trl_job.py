"""The TRL side of benchmarks/vs_trl.py: one QLoRA job with TRL's SFTTrainer, as a TRL user would write it.

Run by vs_trl.py as a separate process (its wall clock and peak memory are measured from outside); it does not
import qlorakit. The data is a JSONL of prompt/completion pairs that vs_trl.py rendered with qlorakit's airoboros
template, so both tools train on the same text. TRL's defaults are kept where a user would keep them: the default
padding collator (no packing), ``completion_only_loss`` left to TRL (prompt-completion data -> loss on completions),
its own tokenization of prompt + completion.

One deliberate change, on by default: TRL casts the LoRA weights of a quantized model to bfloat16 whatever ``bf16``
says (sft_trainer.py, "the PEFT adapter weights are converted to bf16"). With float32 compute that would run the
adapter matmuls in bfloat16 (many times slower than float32 on an AVX2-only CPU) and keep the trainable weights in
bfloat16, so the two tools would no longer train in the same precision. The adapters are cast back to float32, as
qlorakit keeps them; ``--stock-adapter-dtype`` leaves TRL's cast in place.

Writes ``--report`` (JSON): the log history, the training-loop time, the shape, real lengths and trained-token counts
of every batch its collator built, and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

T_START = time.perf_counter()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", required=True, help="JSONL of {prompt, completion} rows")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (default float32)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; > 0 caps the run")
    p.add_argument("--scheduler", default="constant", help="lr_scheduler_type (benchmarks/recipes.py: qlora's)")
    p.add_argument("--warmup_ratio", type=float, default=0.0, help="share of steps warming up, under 1 (qlora: 0.03)")
    p.add_argument("--max_grad_norm", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--stock-adapter-dtype", action="store_true",
                   help="keep TRL's cast of the LoRA weights to bfloat16 (default: cast back to float32)")
    return p.parse_args(argv)


class RecordingCollator:
    """Calls TRL's collator unchanged and notes what each batch holds (for padding waste and FLOPs)."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[dict] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        trained = (labels[:, 1:] != -100).sum(1).tolist()  # the causal shift: position t predicts label t+1
        self.batches.append({"shape": list(ids.shape), "lengths": lengths, "trained": trained})
        return batch


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    import peft
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list(rows)  # in memory: nothing is written to the datasets cache

    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_ratio,  # transformers 5: a warmup_steps under 1 is the share of the steps
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        max_grad_norm=args.max_grad_norm,
        weight_decay=0.0,
        optim="adamw_torch",
        seed=args.seed,
        bf16=args.bf16,
        fp16=False,
        # Without a GPU, transformers refuses bf16 unless told the run is on the CPU on purpose ("Your setup
        # doesn't support bf16/gpu"); with use_cpu it autocasts to bfloat16 on the CPU, as qlorakit does.
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=True,
        max_length=args.max_length,
        packing=False,  # TRL's default padding collator, as most users run it
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        model_init_kwargs={"dtype": dtype},
    )
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         quantization_config=quant, peft_config=lora)

    adapter_dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    if not args.stock_adapter_dtype:
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    recorder = RecordingCollator(trainer.data_collator)
    trainer.data_collator = recorder  # read when train() builds its DataLoader
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t_ready = time.perf_counter()

    out = trainer.train()
    t_trained = time.perf_counter()
    trainer.save_model(args.output_dir)
    t_saved = time.perf_counter()

    report = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch": torch.__version__},
        "steps": trainer.state.global_step,
        "log_history": trainer.state.log_history,
        "train_metrics": out.metrics,
        "setup_seconds": t_ready - T_START,  # imports, model load + quantization, dataset preparation
        "train_seconds": t_trained - t_ready,  # trainer.train()
        "save_seconds": t_saved - t_trained,
        "trainable_parameters": n_trainable,
        "adapter_dtype_after_trl": adapter_dtypes,
        "adapter_dtype_trained": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
        "train_rows": len(trainer.train_dataset),
        "batches": recorder.batches,
    }
    with open(args.report, "w", encoding="utf-8") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
