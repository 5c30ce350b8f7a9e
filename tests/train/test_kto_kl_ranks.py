"""KTO's KL reference point under torchrun: the mean over every rank's examples of the step (the ranks' sums and
counts summed), not over this rank's alone. Run by pytest; torchrun runs this file as the ranks' script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qlorakit.data.pairs import kto_row
from qlorakit.data.tokenize import tokenize_preference
from qlorakit.model.load import load_tokenizer
from qlorakit.train import processes
from qlorakit.train.objectives.forward import sequence_logps
from qlorakit.train.objectives.preference import KTO

WORDS = "alpha beta gamma delta river stone cloud maple".split()
# Policy minus reference log-probability of each example's mismatched pair, by construction (the reference is set
# from the policy's own numbers): the mean over all four is 1.875, rank 0's (rows 0, 1) 0.75, rank 1's 3.0.
DELTAS = np.array([0.5, 1.0, 2.0, 4.0])
# Each rank's micro-batches and their weights: two real rows and a filler (weight 0), as a short last step has.
SHARES = {0: ([[0], [1], [0]], [1.0, 1.0, 0.0]), 1: ([[2], [3], [3]], [1.0, 1.0, 0.0])}


def approx(x: float):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


def kto_data(model_dir: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    rows = [kto_row({"prompt": f"Which word follows {WORDS[i]} {WORDS[i + 1]}?",
                     "completion": " ".join(WORDS[i:i + 2 + i]), "label": bool(i % 2)}, f"kto:{i}") for i in range(4)]
    tokenizer = load_tokenizer(model_dir)
    return model, tokenizer.pad_token_id, tokenize_preference(rows, tokenizer, "airoboros")


def kl_point(model, pad_id: int, examples, ref: np.ndarray, micro: list[list[int]], weights: list[float],
             info: processes.DistInfo | None = None) -> float:
    kto = KTO(beta=0.1)
    kto.reference["train"] = ref
    batches = [kto.collate(examples, ids, pad_id, True) for ids in micro]
    kto.begin_step(model, batches, torch.device("cpu"), False, weights, info)
    return float(kto.kl)


def reference_with_deltas(model, pad_id: int, examples) -> np.ndarray:
    """An (N, 2) reference whose KL column is the policy's mismatched log-probabilities minus DELTAS."""
    with torch.no_grad():
        batch = KTO(beta=0.1).collate(examples, list(range(len(examples))), pad_id, True)
        policy = sequence_logps(model, batch["pref_kl"], torch.device("cpu"))[0].double().numpy()
    return np.stack([np.zeros_like(policy), policy - DELTAS], axis=1)


def test_the_kl_point_on_two_ranks_is_the_single_process_one(tiny_llama, tmp_path):
    model, pad_id, examples = kto_data(str(tiny_llama))
    ref = reference_with_deltas(model, pad_id, examples)
    np.save(tmp_path / "ref.npy", ref)
    single = kl_point(model, pad_id, examples, ref, [[0, 1], [2, 3]], [1.0, 1.0])
    alone = [kl_point(model, pad_id, examples, ref, *SHARES[r]) for r in (0, 1)]  # each rank by itself (the twin)
    assert single == approx(DELTAS.mean()) and alone == [approx(0.75), approx(3.0)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tiny_llama), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"kl_{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [approx(single), approx(single)]


def main(model_dir: str, folder: str) -> None:
    """A rank's part: its micro-batches' KL point over the process group, written to kl_RANK.json."""
    info = processes.init()
    model, pad_id, examples = kto_data(model_dir)
    ref = np.load(Path(folder) / "ref.npy")
    value = kl_point(model, pad_id, examples, ref, *SHARES[info.rank], info=info)
    (Path(folder) / f"kl_{info.rank}.json").write_text(json.dumps(value))
    processes.shutdown(info)


if __name__ == "__main__":
    main(*sys.argv[1:3])
