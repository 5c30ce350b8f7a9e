"""The GPU benchmark's environment reading and its report.

    python benchmarks/gpu/report.py env --out PARTS/env.json [--device cuda]
    python benchmarks/gpu/report.py build --parts PARTS --out OUT_DIR

``build`` reads whatever parts exist (a part that failed or timed out is reported as missing, with its log's last
lines) and writes gpu.json ({"device", "job", "tools": {tool: {tokens_per_second, peak_memory_gib, step0_loss,
mfu, ...}}, "shapes": {...}, "checks": {...}}) and gpu.md, a README table fragment. run.sh calls it after every
part, so the files always hold everything finished so far.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import job_for, versions, write_json

TOOLS = ("qlorakit", "trl", "trl_liger")
LABELS = {"qlorakit": "qlorakit", "trl": "TRL SFTTrainer", "trl_liger": "TRL SFTTrainer + Liger"}
KEEP = ("tokens_per_second", "peak_memory_gib", "peak_reserved_gib", "step0_loss", "mfu", "setup_seconds",
        "measured_steps", "measured_seconds", "attention", "loss", "optimizer", "adapter_dtype_trained",
        "wall_seconds", "losses")


def env(device: str) -> dict:
    import platform

    import torch
    from vs_trl import matmul_peak

    info = {"versions": versions(), "python": platform.python_version(), "device_type": device}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        info["cuda"] = torch.version.cuda
    else:
        from vs_trl import processor_name

        info["device"] = processor_name()
    info["matmul_peak_bf16"] = matmul_peak(torch.bfloat16)
    return info


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def log_tail(parts: Path, name: str, lines: int = 8) -> str | None:
    log = parts / f"{name}.log"
    if not log.is_file():
        return None
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def pytest_summary(path: Path) -> dict | None:
    """Counts and failed test names from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"tests": len(cases), "passed": len(cases) - len(failed) - skipped, "failed": failed,
            "skipped": skipped}


def tool_entry(part: dict | None, peak: float | None, parts: Path, name: str) -> dict:
    if part is None:
        tail = log_tail(parts, name)
        if tail and tail.startswith("skipped:"):
            return {"status": tail}
        return {"status": "failed or not run", "log_tail": tail}
    entry = {k: part[k] for k in KEEP if k in part}
    fps = part.get("useful_flops_per_second")
    entry["mfu"] = fps / peak if fps and peak else None
    done = part.get("wall_seconds") is not None
    entry["status"] = "done" if done else "incomplete (stopped mid-run)"
    if not done:
        entry["log_tail"] = log_tail(parts, name)
    return entry


def shape_block(parts: Path, shape: str, peak: float | None, tiny: bool) -> dict:
    made = read(parts / f"{shape}-model.json")
    tools = {t: tool_entry(read(parts / f"{shape}-{t}.json"), peak, parts, f"{shape}-{t}") for t in TOOLS}
    job = {"model": f"randomly initialised {shape} shape", "parameters": made and made.get("parameters"),
           **job_for(tiny)}
    losses = {t: v["step0_loss"] for t, v in tools.items() if v.get("step0_loss") is not None}
    check = None
    if "qlorakit" in losses and len(losses) > 1:
        ref = losses["qlorakit"]
        check = {t: abs(v - ref) / abs(ref) < 0.01 for t, v in losses.items() if t != "qlorakit"}
    return {"job": job, "tools": tools, "step0_loss_within_1pct_of_qlorakit": check}


def _rate(flops: float | None) -> str:
    if not flops:
        return "n/a"
    return f"{flops / 1e12:.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOP/s"


def _row(tool: str, v: dict) -> str:
    if v.get("tokens_per_second") is None:
        return f"| {LABELS[tool]} | {v['status']} | | | |"
    mem = v.get("peak_memory_gib")
    cells = [f"{v['tokens_per_second']:,.0f}", "n/a" if mem is None else f"{mem:.1f}", f"{v['step0_loss']:.4f}",
             "n/a" if v.get("mfu") is None else f"{v['mfu']:.1%}"]
    return f"| {LABELS[tool]} | " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    env_ = report.get("environment", {})
    job = report["job"]
    peak = (env_.get("matmul_peak_bf16") or {}).get("flops_per_second")
    out = [f"### QLoRA on one {report['device']}: qlorakit vs TRL SFTTrainer", "",
           f"Randomly initialised models, NF4 double-quant base, LoRA r {job['lora_r']} on all linear layers, "
           f"dropout {job['lora_dropout']:g}, bf16, gradient checkpointing; {job['rows_per_step']} packed rows of "
           f"{job['row_tokens']:,} tokens per step, the same rows in the same order for every tool; tokens/s over "
           f"{job['measured_steps']} steps after {job['warmup_steps']} warm-up; peak memory: allocated, from the "
           f"first step; MFU: the job's FLOPs without recomputation over the measured bf16 matmul peak "
           f"({_rate(peak)}).", ""]
    for shape, block in report["shapes"].items():
        out += [f"**{shape}** ({(block['job'].get('parameters') or 0) / 1e9:.2f} B parameters)", "",
                "| tool | tokens/s | peak memory (GiB) | step-0 loss | MFU |", "|---|---:|---:|---:|---:|"]
        out += [_row(t, v) for t, v in block["tools"].items()]
        out.append("")
    out.append(f"Measured by `{report['command']}`; " + ", ".join(
        f"{k} {v}" for k, v in env_.get("versions", {}).items() if v) + ".")
    return "\n".join(out)


def build(parts: Path, out: Path, tiny: bool) -> dict:
    env_ = read(parts / "env.json") or {}
    peak = (env_.get("matmul_peak_bf16") or {}).get("flops_per_second")
    shapes = sorted({p.name.split("-model.json")[0] for p in parts.glob("*-model.json")},
                    key=lambda s: ("llama2-7b", "llama3-8b", "tiny").index(s) if s in ("llama2-7b", "llama3-8b",
                                                                                       "tiny") else 9)
    blocks = {s: shape_block(parts, s, peak, tiny) for s in shapes}
    first = next(iter(blocks.values()), {"job": job_for(tiny), "tools": {}})
    report = {"device": env_.get("device", "unknown"), "job": first["job"], "tools": first["tools"],
              "shapes": blocks, "environment": env_,
              "checks": {s: b["step0_loss_within_1pct_of_qlorakit"] for s, b in blocks.items()},
              "pytest_cuda": pytest_summary(parts / "pytest.xml"),
              "command": "bash benchmarks/gpu/run.sh" + (" --tiny --device cpu" if tiny else "")}
    write_json(out / "gpu.json", report)
    (out / "gpu.md").write_text(markdown(report) + "\n", encoding="utf-8")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", required=True)
    e.add_argument("--device", default="cuda")
    b = sub.add_parser("build")
    b.add_argument("--parts", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "env":
        write_json(args.out, env(args.device))
    else:
        build(Path(args.parts), Path(args.out), args.tiny)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
