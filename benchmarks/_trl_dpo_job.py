"""The TRL side of benchmarks/dpo_vs_trl.py: one DPO job with TRL's DPOTrainer and a fresh LoRA adapter (peft), as a
TRL user would write it. Run as its own process (wall time and peak memory are measured from outside); it does not
import qlorakit. The data is a JSONL of {prompt, chosen, rejected} strings, the prompt already rendered in the
airoboros format by dpo_vs_trl.py. Writes --report (JSON): the log history and the training-loop seconds."""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("--model", "--data", "--output_dir", "--report"):
        p.add_argument(name, required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=a.output_dir, beta=a.beta, learning_rate=a.lr, lr_scheduler_type="constant",
                     warmup_steps=0, max_grad_norm=0.3, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch,
                     logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=a.seed,
                     max_length=a.max_length, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, peft_config=lora,
                         train_dataset=load_dataset("json", data_files=a.data, split="train"))
    t0 = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - t0
    with open(a.report, "w") as f:
        json.dump({"log_history": trainer.state.log_history, "loop_seconds": loop}, f)


if __name__ == "__main__":
    main()
