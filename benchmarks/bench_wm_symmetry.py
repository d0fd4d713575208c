"""Generalised (orthogonal) WM time per sweep against its floor, beside permutation WM's (issue 29).

The floor of a generalised sweep is its unavoidable work timed alone: for every unit (a group, or a head
structure as one) the cost products ``A^(a) T(B)^(a)T`` of its terms and the exact step of its class --
the Procrustes SVD (orthogonal), the LAP (permutation, signed), or the ``H^2`` per-head SVDs/LAPs and the
head LAP (:func:`lmckit.perm.symmetry.head_step`). lmckit's time per sweep is
``extra["sweep_seconds"] / sweeps`` of :func:`lmckit.match.symmetric.weight_matching_sym` (a fixed number
of sweeps, set-up excluded), best of ``--repeats``. Permutation WM's sweep and floor
(:func:`lmckit.match.weight.matching_floor_seconds`) are measured in the same run. Target: generalised
WM no slower per sweep than 2x its floor.

    PYTHONPATH=src nice -n 10 python benchmarks/bench_wm_symmetry.py [--width 32] [--depth 1] [--norm none]

A pair is two random initialisations (seeds 0, 1) of the zoo ViT (timing depends on shapes only).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--norm", default="none")
    p.add_argument("--sweeps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    from lmckit.match import weight_matching
    from lmckit.match.symmetric import _cost_full, _lap_max, _matricize, _units, weight_matching_sym
    from lmckit.match.weight import matching_floor_seconds
    from lmckit.models import create_model
    from lmckit.perm import spec_for
    from lmckit.perm.symmetry import derive_symmetry, fold_norms, head_step, identity_transform, step

    torch.set_num_threads(1)
    kw = dict(width=args.width, depth=args.depth, heads=args.heads, norm=args.norm)
    torch.manual_seed(0)
    a = fold_norms(create_model("vit", **kw))[0]
    torch.manual_seed(1)
    b = fold_norms(create_model("vit", **kw))[0]
    spec = spec_for(a)
    sd_a = {k: v.double() for k, v in a.state_dict().items()}
    sd_b = {k: v.double() for k, v in b.state_dict().items()}

    gen_sweep = min(
        (lambda r: r.extra["sweep_seconds"] / r.sweeps)(
            weight_matching_sym(spec, sd_a, sd_b, "orthogonal", model=a, max_iter=args.sweeps, tol=-1.0)
        )
        for _ in range(args.repeats)
    )
    # floor: the same units' cost products and exact steps, nothing else
    sym = derive_symmetry(spec, sd_a, "orthogonal", model=a)
    terms = {g: [] for g in spec.sizes}
    from lmckit.perm.spec import entry_segments

    for key, ax in spec.axes.items():
        if not sd_a[key].is_floating_point():
            continue
        for i, e in enumerate(ax):
            if e is None:
                continue
            for sg, sn, inner, off in entry_segments(e, sd_a[key].shape[i], spec.sizes):
                if sg is not None and not (sym[sg].cls != "permutation" and key in sym[sg].norm_keys):
                    terms[sg].append((key, i, off, sn, inner))
    a_mats = {t: _matricize(sd_a[t[0]], *t[1:]) for ts in terms.values() for t in ts}
    heads_of = {g: int(h) for h, ms in spec.heads.values() for g in ms}
    ident = identity_transform(spec, sym)
    floor = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for u in _units(spec):
            costs = [(sym[g].cls, _cost_full(spec, a_mats, sd_b, g, terms[g])) for g in u]
            if u[0] in heads_of:
                head_step(heads_of[u[0]], costs, lap=_lap_max)
            else:
                step(costs[0][0], costs[0][1], fix_ones=sym[u[0]].fix_ones, lap=_lap_max)
        floor = min(floor, time.perf_counter() - t0)
    del ident

    sa, sb = a.state_dict(), b.state_dict()
    perm_sweep = min(
        (lambda r: r.extra["sweep_seconds"] / max(r.sweeps, 1))(weight_matching(spec, sa, sb, max_iter=args.sweeps))
        for _ in range(args.repeats)
    )
    perm_floor = matching_floor_seconds(spec, sa, sb, repeats=args.repeats)
    print(f"ViT {kw}: {len(spec.sizes)} groups, {len(spec.heads)} head structures")
    print(f"{'class':12s} {'sweep (ms)':>11s} {'floor (ms)':>11s} {'ratio':>7s}")
    print(f"{'permutation':12s} {1e3 * perm_sweep:11.2f} {1e3 * perm_floor:11.2f} {perm_sweep / perm_floor:7.2f}")
    print(f"{'orthogonal':12s} {1e3 * gen_sweep:11.2f} {1e3 * floor:11.2f} {gen_sweep / floor:7.2f}  (target <= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
