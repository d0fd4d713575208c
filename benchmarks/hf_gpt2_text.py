"""Tiny GPT-2 language models (the Hugging Face class) on the King James Version: naive vs WM vs AM barriers.

A small stand-in for the ``gpt2-text`` recipe of issue 26 (not done): trains ``--models`` GPT2LMHeadModel of
width ``--width`` (2 layers, 4 heads, byte vocabulary 256, context 128) from different seeds on the ``kjv``
dataset (``lmckit.data.text``; Debian's bible-kjv) with AdamW, saves each as a Hugging Face folder, then for
the pairs (0, i): weight matching (WM) and activation matching (AM) by the library, and the loss barrier on
the held-out split, in nats per token, with the endpoints' and midpoint's perplexity, the L2 distance
reduction, and the planted check (the matched model's function equals B's). Everything in this process, on
the CPU; the numbers depend on the (small) training budget, so read them as a smoke test of the pipeline on
real text, not as a result about LMC of language models.

    python benchmarks/hf_gpt2_text.py --models 2 --steps 300 --width 64
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=512, help="test windows per barrier point (default 512)")
    ap.add_argument("--points", type=int, default=9)
    args = ap.parse_args()
    if args.models < 2 or args.steps < 1 or args.width < 4 or args.width % 4:
        ap.error("--models >= 2, --steps >= 1, --width a positive multiple of 4")
    import torch
    import transformers as T

    torch.set_num_threads(min(2, torch.get_num_threads()))  # a small model: more threads only contend
    from lmckit.data import load_dataset
    from lmckit.hf import adapt, load_checkpoints
    from lmckit.lmc.barrier import barrier_curve
    from lmckit.match import activation_matching, l2_distance, weight_matching
    from lmckit.perm import apply_permutation

    data = load_dataset("kjv")
    cfg = T.GPT2Config(
        n_embd=args.width, n_layer=2, n_head=4, vocab_size=256, n_positions=data.context, use_cache=False,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for seed in range(args.models):
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = T.GPT2LMHeadModel(cfg)
            opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
            gen = torch.Generator().manual_seed(seed)
            m.train()
            step = 0
            while step < args.steps:
                for x, y in data.batches("train", args.batch, shuffle=True, generator=gen, drop_last=True):
                    loss = torch.nn.functional.cross_entropy(m(x).logits.transpose(1, 2), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
                    if step >= args.steps:
                        break
            m.save_pretrained(f"{tmp}/m{seed}")
            folders.append(f"{tmp}/m{seed}")
            print(f"model {seed}: trained {args.steps} steps, last batch loss {loss.item():.3f} nats/token")
        t_train = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states, _, model, spec = load_checkpoints(folders, [f"model {i}" for i in range(args.models)])
        rows = []
        for i in range(1, args.models):
            sd_a, sd_b = states[0], states[i]
            mb = adapt(model.__class__(model.config))
            mb.load_state_dict(sd_b)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wm = weight_matching(spec, sd_a, sd_b, seed=0)
                am = activation_matching(model, mb, data, spec=spec, num_batches=4, batch_size=64)
            for label, perms in (("naive", None), ("WM", wm.perms), ("AM", am.perms)):
                sd = sd_b if perms is None else apply_permutation(spec, perms, sd_b)
                c = barrier_curve(model, sd_a, sd, data, points=args.points, limit=args.limit, progress=False)
                cur = c.curves["test"]
                rows.append(
                    (
                        f"0-{i}",
                        label,
                        cur.loss_barrier,
                        math.exp(cur.endpoint_loss[0]),
                        math.exp(cur.endpoint_loss[1]),
                        math.exp(cur.midpoint_loss),
                        1 - l2_distance(spec, sd_a, sd) / l2_distance(spec, sd_a, sd_b),
                    )
                )
    cov = spec.coverage()["hidden_coverage"]
    print(f"training {t_train:.0f} s; total {time.perf_counter() - t0:.0f} s; unit coverage {cov:.1%}")
    print("pair  path   loss barrier (nats/token)  ppl A   ppl B   ppl midpoint  L2 reduction")
    for r in rows:
        print(f"{r[0]:5} {r[1]:6} {r[2]:24.4f}  {r[3]:6.2f}  {r[4]:6.2f}  {r[5]:12.2f}  {r[6]:11.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
