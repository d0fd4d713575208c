"""Peer side of bench_match.py: snimu's ``rebasin`` weight matching, run in its own venv.

Usage (called by bench_match.py, not by hand)::

    python rebasin_peer.py JOB.json

``JOB.json`` names the model (an lmckit zoo name and its options: the same
plain ``nn.Module`` classes, only to get identical architectures and state-dict
keys), the two plain safetensors state dicts, the input shape for tracing, the
iteration cap, the seeds (rebasin's group order comes from torch's global
generator) and where to write model B's permuted state dicts. After an untimed
warm-up on a tiny model, prints one JSON line: per seed, total seconds
(tracing/spec derivation + coordinate descent + applying the permutation),
the split, and the number of sweeps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, job["lmckit_src"])  # model classes only (plain torch modules)
    import rebasin
    import torch
    from safetensors.torch import load_file, save_file

    from lmckit.models import create_model

    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    sweeps = 0
    step = rebasin.PermutationCoordinateDescent._calculate_permutations_step

    def counted(self, loop):
        nonlocal sweeps
        sweeps += 1
        return step(self, loop)

    rebasin.PermutationCoordinateDescent._calculate_permutations_step = counted

    # warm-up (first-call costs of torch/scipy/torchview) on a tiny model, untimed
    torch.manual_seed(0)
    wa, wb = create_model("mlp_tiny"), create_model("mlp_tiny")
    rebasin.PermutationCoordinateDescent(wa, wb, torch.randn(2, 1, 28, 28)).rebasin(5)

    sd_a, sd_b = load_file(job["a"]), load_file(job["b"])
    results = []
    for seed in job["seeds"]:
        torch.manual_seed(seed)  # rebasin draws its group order from torch's global generator
        model_a = create_model(job["model"], **job["kwargs"])
        model_b = create_model(job["model"], **job["kwargs"])
        model_a.load_state_dict(sd_a)
        model_b.load_state_dict(sd_b)
        model_a.eval()
        model_b.eval()
        x = torch.randn(*job["input_shape"])
        sweeps = 0
        t0 = time.perf_counter()
        pcd = rebasin.PermutationCoordinateDescent(model_a, model_b, x)
        t1 = time.perf_counter()
        pcd.calculate_permutations(max_iterations=job["max_iter"])
        t2 = time.perf_counter()
        pcd.apply_permutations()
        t3 = time.perf_counter()
        out = job["out"].replace(".safetensors", f"_seed{seed}.safetensors")
        save_file({k: v.detach().contiguous() for k, v in model_b.state_dict().items()}, out)
        results.append(
            {
                "seed": seed,
                "seconds": t3 - t0,
                "init_seconds": t1 - t0,
                "descent_seconds": t2 - t1,
                "apply_seconds": t3 - t2,
                "sweeps": sweeps,
                "out": out,
            }
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
