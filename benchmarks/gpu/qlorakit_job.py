"""The qlorakit side of the GPU benchmark: the job on qlorakit's library path, with the pieces the training loop
uses (token-budget rows with host boundaries, varlen attention, the fused LoRA branch on 4-bit layers
with bf16 copies cached per step, the chunked head loss, fused AdamW, Liger's RMSNorm/SwiGLU/RoPE where installed),
timed step by step.

    python benchmarks/gpu/qlorakit_job.py --model DIR --out PART.json [--device cuda] [--tiny]

The step is ``train/step.py``'s: forward under bf16 autocast, the summed loss divided by the step's trained tokens,
backward, clip, optimizer step. Writes PART.json when done (and after every step, so a hang leaves what it did).
"""

from __future__ import annotations

from common import StepClock, job_parser


def build(model_dir: str, job: dict, device, checkpointing: bool, liger_setting: str = "auto"):
    import torch

    from qlorakit.model.attention import packed_attention_backend, use_packed_attention
    from qlorakit.model.cuda import adamw_options
    from qlorakit.model.fused_lora import cache_lora_casts
    from qlorakit.model.liger import use_liger_kernel
    from qlorakit.model.load import enable_gradient_checkpointing, load_base_model
    from qlorakit.model.lora import add_lora, target_modules
    from qlorakit.model.loss import liger_available, supports_chunked_loss

    base = load_base_model(model_dir, bits=4, quant_type="nf4", double_quant=True, bf16=True, device=device)
    _, liger = use_liger_kernel(base, liger_setting, device.type)  # as qlorakit train does (use_liger_kernel)
    if checkpointing:
        enable_gradient_checkpointing(base)
    model = add_lora(base, r=job["lora_r"], alpha=job["lora_alpha"], dropout=job["lora_dropout"],
                     modules=target_modules(base, "all"), seed=job["seed"])
    packed = use_packed_attention(model.get_base_model())
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = adamw_options(params)
    optimizer = torch.optim.AdamW(params, lr=job["lr"], weight_decay=0.0, **opt_kwargs)
    cache_lora_casts(model, optimizer)
    model.train()
    info = {"attention": packed_attention_backend(device, torch.bfloat16) if packed else "sdpa",
            "loss": ("plain" if not supports_chunked_loss(model) else
                     "liger" if device.type == "cuda" and liger_available() else "chunked"),
            "optimizer": "fused" if opt_kwargs.get("fused") else "foreach", "liger_kernels": liger,
            "gradient_checkpointing": checkpointing, "trainable_parameters": sum(p.numel() for p in params)}
    return model, optimizer, params, info


def train_step(model, optimizer, params, step, device, max_grad_norm: float) -> float:
    """One optimizer step over one micro-batch (the step's rows as one padding-free row); its mean token loss."""
    import torch

    from qlorakit.data.batching import collate_varlen, to_device
    from qlorakit.data.tokenize import Example
    from qlorakit.model.loss import loss_sum_chunked, supports_chunked_loss

    batch = collate_varlen([Example(ids, list(ids)) for row in step for ids in row])
    targets = batch.pop("targets")
    inputs = to_device(batch, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if supports_chunked_loss(model):
            loss, n = loss_sum_chunked(model, inputs, targets, device)
        else:  # the plain path of train/step.py
            keep = (targets != -100).to(device)
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
            loss, n = torch.nn.functional.cross_entropy(logits.float(), targets.to(device)[keep],
                                                        reduction="sum"), int(keep.sum())
    (loss / n).backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()) / n


def main(argv=None) -> int:
    p = job_parser(__doc__)
    p.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    p.add_argument("--liger", choices=("auto", "true", "false"), default="auto",
                   help="use_liger_kernel: Liger's RMSNorm, SwiGLU and RoPE kernels (auto: on CUDA where installed)")
    args = p.parse_args(argv)
    import torch

    clock = StepClock(args, "qlorakit")
    job, device = clock.job, torch.device(args.device)
    model, optimizer, params, info = build(args.model, job, device, not args.no_checkpointing, args.liger)
    clock.result |= info
    clock.start()
    losses = []
    for step in clock.steps:
        losses.append(train_step(model, optimizer, params, step, device, job["max_grad_norm"]))
        clock.step_done(losses)
    result = clock.finish()
    print(f"qlorakit: {result['tokens_per_second']:.0f} tokens/s, step-0 loss {losses[0]:.4f}, "
          f"peak {result.get('peak_memory_gib', 'n/a')} GiB, attention {info['attention']}, loss {info['loss']}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
