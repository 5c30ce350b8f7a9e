"""The TRL side of the GPU benchmark: SFTTrainer on the same packed rows, in the same order, as a TRL user trains
packed data without flash-attn installed (padding-free rows, transformers' SDPA attention, TRL's defaults otherwise).

    python benchmarks/gpu/trl_job.py --model DIR --out PART.json [--device cuda] [--liger] [--tiny]

The rows come pre-packed (``common.packed_steps``) with their ``seq_lengths``, so TRL's padding-free collator
restarts positions per example and masks each example's first label, exactly the predictions qlorakit trains. Two
settings differ from a fresh SFTConfig on purpose: a sequential sampler (identical rows per step for every tool) and
the LoRA weights cast back to float32 after TRL's cast to bfloat16 (qlorakit trains them in float32;
``--stock-adapter-dtype`` keeps TRL's). ``--liger``: TRL's ``use_liger_kernel`` (Liger's RMSNorm, SwiGLU and RoPE
kernels; TRL keeps its own chunked LM head).
"""

from __future__ import annotations

import tempfile

from common import StepClock, job_parser


def dataset_of(steps):
    """One dataset row per packed row: its ids, labels and the lengths of its examples."""
    from datasets import Dataset

    rows = []
    for step in steps:
        for row in step:
            ids = [t for ex in row for t in ex]
            rows.append({"input_ids": ids, "labels": list(ids), "seq_lengths": [len(ex) for ex in row]})
    return Dataset.from_list(rows)


def make_trainer(args, job, steps):
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_gpu_"), per_device_train_batch_size=job["rows_per_step"],
        gradient_accumulation_steps=job["grad_accum"], learning_rate=job["lr"], lr_scheduler_type="constant",
        warmup_steps=0, max_steps=len(steps), max_grad_norm=job["max_grad_norm"], weight_decay=0.0,
        seed=job["seed"], bf16=True, use_cpu=args.device == "cpu", gradient_checkpointing=True,
        padding_free=True, packing=False, max_length=None, dataset_kwargs={"skip_prepare_dataset": True},
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_num_workers=0, model_init_kwargs={"dtype": torch.bfloat16},
        use_liger_kernel=args.liger, disable_tqdm=True)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    lora = LoraConfig(r=job["lora_r"], lora_alpha=job["lora_alpha"], lora_dropout=job["lora_dropout"],
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    return SFTTrainer(model=args.model, args=config, train_dataset=dataset_of(steps),
                      processing_class=AutoTokenizer.from_pretrained(args.model), quantization_config=quant,
                      peft_config=lora)


def main(argv=None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--liger", action="store_true", help="TRL's use_liger_kernel")
    p.add_argument("--stock-adapter-dtype", action="store_true", help="keep TRL's bf16 LoRA weights")
    args = p.parse_args(argv)
    from transformers import TrainerCallback

    tool = "trl_liger" if args.liger else "trl"
    clock = StepClock(args, tool)
    result = clock.result
    trainer = make_trainer(args, clock.job, clock.steps)
    result["adapter_dtype_after_trl"] = sorted({str(q.dtype) for q in trainer.model.parameters() if q.requires_grad})
    if not args.stock_adapter_dtype:
        for q in trainer.model.parameters():
            if q.requires_grad:
                q.data = q.data.float()
    result["adapter_dtype_trained"] = sorted({str(q.dtype) for q in trainer.model.parameters() if q.requires_grad})
    result["attention"] = trainer.model.config._attn_implementation

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.start()

        def on_step_end(self, a, state, control, **kw):
            clock.step_done([h["loss"] for h in state.log_history if "loss" in h])

    trainer.add_callback(Timer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    clock.finish(losses=losses, step0_loss=losses[0], steps_done=trainer.state.global_step)
    print(f"{tool}: {result['tokens_per_second']:.0f} tokens/s, step-0 loss {losses[0]:.4f}, "
          f"peak {result.get('peak_memory_gib', 'n/a')} GiB, attention {result['attention']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
