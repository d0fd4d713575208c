"""Weight matching on Hugging Face GPT-2 folders shaped like GPT-2 small (124M at 12 layers), sharded on disk.

Two ``GPT2LMHeadModel`` of d_model 768, 12 heads, MLP 3072, vocabulary 50257, 1024 positions and ``--layers``
blocks (random weights, seeds 0 and 1; no download) are saved with ``save_pretrained(max_shard_size=...)`` as
sharded safetensors folders. In this process: ``lmckit.hf.load_checkpoints`` (shard by shard), the spec by
``torch.export`` tracing, then ``weight_matching(max_iter=100)``. Printed: times of each step, the spec's
coverage, and the peak RSS above the RSS before loading against the budget of the speed issue,
``3 x (two models' bytes + the largest float64 cost matrix, 3072 x 3072)`` (``benchmarks/_rss.py``). The
ratio peak / budget is the number to read (below 1 is within budget).

    python benchmarks/bench_hf_gpt2.py --layers 2
    python benchmarks/bench_hf_gpt2.py --layers 12     # GPT-2 small: minutes on a loaded 2-core machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shard", default="100MB", help="max_shard_size of save_pretrained (default 100MB)")
    args = ap.parse_args()
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    import torch
    import transformers as T
    from _rss import peak_mb, reset_peak, rss_mb, trim

    from lmckit.hf import load_checkpoints
    from lmckit.match import weight_matching

    cfg = T.GPT2Config(n_layer=args.layers, use_cache=False)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 1):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                T.GPT2LMHeadModel(cfg).save_pretrained(f"{tmp}/m{seed}", max_shard_size=args.shard)
        shards = len(list(Path(f"{tmp}/m0").glob("*.safetensors")))
        trim()
        reset_peak()
        start = rss_mb()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states, _, model, spec = load_checkpoints([f"{tmp}/m0", f"{tmp}/m1"], ["A", "B"])
        t_load = time.perf_counter() - t0
        n_params = sum(v.numel() for k, v in model.state_dict().items() if k != "lm_head.weight")
        model_bytes = sum(v.numel() * v.element_size() for k, v in states[0].items() if k != "lm_head.weight")
        del model
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = weight_matching(spec, states[0], states[1], seed=0, max_iter=100)
        t_wm = time.perf_counter() - t1
        peak = peak_mb() - start
    budget = 3 * (2 * model_bytes + 3072 * 3072 * 8) / 2**20
    cov = spec.coverage()
    print(f"GPT2LMHeadModel, {args.layers} layers, {n_params / 1e6:.1f}M parameters, {shards} shards per folder")
    print(f"load two folders + export trace: {t_load:.1f} s; weight matching: {t_wm:.1f} s, {res.sweeps} sweeps")
    print(
        f"spec: {cov['groups']} groups, {len(spec.heads)} head structures, unit coverage {cov['hidden_coverage']:.1%}"
    )
    print(f"objective {res.initial_objective:.6g} -> {res.final_objective:.6g}")
    print(f"peak RSS above start {peak:.0f} MiB; budget {budget:.0f} MiB; ratio {peak / budget:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
