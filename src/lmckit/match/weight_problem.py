"""Weight matching's cost computation: the cost matrices of every group, kept current as B's permutations move.

:class:`_Problem` holds one WM problem on the tensors' device: A, B and the
entries some cost term reads permuted (``Bp``), and per group its cost
matrix ``C_g`` against B's original unit order, as a running float64 sum
updated by rank-s corrections when few units moved (rebuilt after
:data:`RANK_UPDATE_REFRESH` updates or when a neighbour moved more than
:data:`RANK_UPDATE_MAX_FRACTION` of its units), with per-term products held
in an LRU cache under a byte cap (:class:`_CostCache`). The helpers build
float64 sums in blocks of rows and hand freed heap pages back. The
mathematics and the memory budget are in :mod:`lmckit.match.weight`'s
docstring ("Speed"); the sweep that uses this is :mod:`lmckit.match.weight_sweep`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch

from ..perm.spec import (
    Perms,
    PermutationSpec,
    axis_index,
    entry_groups,
    entry_segments,
    is_segmented,
)

__all__: list[str] = []

#: (entry, axis) cost terms with at most this many inner entries (output layers, biases) are recomputed, not cached.
UNCACHED_MAX_INNER = 64
#: A group's cached cost sum is updated by rank-s corrections when each neighbour moved at most this fraction
#: of its units, and rebuilt otherwise (a correction costs at most one product, a rebuild all of the group's).
RANK_UPDATE_MAX_FRACTION = 0.5
#: After this many rank-s updates in a row a group's cost sum is rebuilt from scratch (bounds float rounding drift).
RANK_UPDATE_REFRESH = 16
#: Extra heap trims (at set-up's end, before a sum is rebuilt) only for problems whose largest float64 cost matrix
#: has at least this many bytes: below it the memory is small and a trim (0.1-2 ms) would slow repeated calls (STE).
TRIM_MIN_BYTES = 1 << 21


class _CostCache(OrderedDict):
    """Cached cost data of one descent (groups' running sums, per-term products) under a byte cap.

    A mapping like the plain ``dict`` it replaces: ``get`` marks an entry as
    used, storing an entry evicts the least recently used others until the
    held bytes fit ``cap`` (the entry just stored is never evicted). Every
    entry can be recomputed from scratch, so eviction costs time, never
    correctness: :meth:`_Problem.cost_original` rebuilds what it does not find.
    Entries are a group's sum ``[C, perms at build, updates]`` (bytes of ``C``)
    or a term ``(stamp, T)`` (bytes of ``T``).
    """

    def __init__(self, cap: float = float("inf")):
        super().__init__()
        self.cap = cap
        self.held = 0  # bytes of the cached tensors
        self.peak = 0
        self.evictions = 0

    @staticmethod
    def _nbytes(value: Any) -> int:
        t = value[0] if isinstance(value, list) else value[1]
        return t.numel() * t.element_size()

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            return default
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in self:
            self.pop(key)
        super().__setitem__(key, value)
        self.held += self._nbytes(value)
        while self.held > self.cap and len(self) > 1:
            old = next(iter(self))
            self.pop(old)
            self.evictions += 1
        self.peak = max(self.peak, self.held)

    def pop(self, key: Any, *default: Any) -> Any:
        if key not in self:
            return default[0] if default else super().pop(key)
        value = super().pop(key)
        self.held -= self._nbytes(value)
        return value


def _norm64(t: torch.Tensor) -> float:
    """Frobenius norm summed in float64, a block of rows at a time (no float64 copy of ``t``)."""
    if t.numel() == 0:
        return 0.0
    m = t.reshape(t.shape[0] if t.dim() else 1, -1)
    rows = max(1, (1 << 19) // max(1, m.shape[1]))
    return sum(float(torch.sum(_sq64(m[i : i + rows]))) for i in range(0, m.shape[0], rows)) ** 0.5


def _sq64(t: torch.Tensor) -> torch.Tensor:
    """``t.double() ** 2`` in one float64 buffer (the same values; no second float64 temporary)."""
    x = t.to(torch.float64, copy=True)
    return x.mul_(x)


def _segflat(t: torch.Tensor, axis: int, off: int, n: int, inner: int) -> torch.Tensor:
    """Segment ``[off, off + n*inner)`` of ``axis`` as an ``(n, inner*rest)`` matrix (unit runs as rows)."""
    return t.narrow(axis, off, n * inner).movedim(axis, 0).reshape(n, -1)


def _flat(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with ``axis`` first and the rest flattened: ``(n, m)`` (a view where possible)."""
    if t.dim() == 2 and axis == 1:
        return t.t()
    if axis == 0:
        return t.reshape(t.shape[0], -1)
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


class _Problem:
    """Precomputed, device-resident data of one WM problem (A fixed, B permuted incrementally)."""

    def __init__(
        self,
        spec: PermutationSpec,
        sd_a: Mapping[str, torch.Tensor],
        sd_b: Mapping[str, torch.Tensor],
        keys: list[str],
        device: torch.device,
    ):
        dtype = (
            torch.float64
            if any(sd_a[k].dtype == torch.float64 or sd_b[k].dtype == torch.float64 for k in keys)
            else torch.float32
        )
        self.spec = spec
        self.device = device
        self.counters = {"cost_terms_updated": 0, "cost_terms_recomputed": 0}  # rank-s updates / full products
        self.keys = keys
        self.A = {k: sd_a[k].detach().to(device=device, dtype=dtype) for k in keys}
        self.B = {k: sd_b[k].detach().to(device=device, dtype=dtype) for k in keys}
        self.axes = {k: spec.axes[k] for k in keys}
        members: dict[str, list[tuple[str, int]]] = {g: [] for g in spec.sizes}
        for k in keys:
            for a, g in enumerate(self.axes[k]):
                for x in entry_groups(g):
                    members[x].append((k, a))
        self.members = members
        self.groups = [g for g in spec.sizes if members[g]]  # groups that the objective can see
        self.unmatched = [g for g in spec.sizes if not members[g]]
        self.mats: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
        self.vec_keys: dict[str, list[str]] = {}
        self.vec_a: dict[str, torch.Tensor | None] = {}
        self.quad: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
        self.quad_keys: dict[str, list[str]] = {}
        self.neighbours: dict[str, set[str]] = {}
        self.scale: dict[str, float] = {}
        norms_a = {k: _norm64(self.A[k]) for k in keys}
        norms_b = {k: _norm64(self.B[k]) for k in keys}
        self.segs: dict[str, list[tuple[str, int, int, int, int, torch.Tensor, bool]]] = {}
        for g in self.groups:
            mats, vecs, quad, qkeys, nb, segs = [], [], [], [], set(), []
            for k, a in members[g]:
                per_axis = [entry_groups(x) for x in self.axes[k]]
                gs = [x for lst in per_axis for x in lst]
                nb.update(x for x in gs if x != g)
                is_quad = sum(1 for lst in per_axis if g in lst) > 1
                if is_segmented(self.axes[k][a]):
                    for sg, n, inner, off in entry_segments(self.axes[k][a], None, spec.sizes):
                        if sg == g:
                            segs.append(
                                (k, a, off, n, inner, _segflat(self.A[k], a, off, n, inner).contiguous(), is_quad)
                            )
                    if is_quad:
                        if k not in qkeys:
                            qkeys.append(k)
                        nb.add(g)
                    continue
                if is_quad:
                    quad.append((k, a, _flat(self.A[k], a).contiguous()))
                    if k not in qkeys:
                        qkeys.append(k)
                    nb.add(g)  # its own move changes its linearisation
                elif self.A[k].dim() == 1:
                    vecs.append(k)
                else:
                    am = self.A[k] if (self.A[k].dim() == 2 and a == 1) else _flat(self.A[k], a).contiguous()
                    mats.append((k, a, am))
            self.mats[g], self.vec_keys[g], self.quad[g], self.quad_keys[g] = mats, vecs, quad, qkeys
            self.segs[g] = segs
            self.vec_a[g] = torch.stack([self.A[k] for k in vecs], 1) if vecs else None
            self.neighbours[g] = nb
            self.scale[g] = sum(norms_a[k] * norms_b[k] for k in {k for k, _ in members[g]})

    def a64(self, k: str) -> torch.Tensor:
        """``A[k]`` in float64 (cached: the exact gain of a quadratic entry's move is summed in float64)."""
        cache = self.__dict__.setdefault("_a64", {})
        if k not in cache:
            cache[k] = self.A[k].double()
        return cache[k]

    # ------------------------------------------------------------------ state
    def permuted_b(self, perms: Perms, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """B permuted by ``perms`` on every axis, for ``keys`` (default every objective entry)."""
        return {k: self._permuted(k, perms) for k in (self.keys if keys is None else keys)}

    def _permuted(self, k: str, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = self.B[k]
        for a, g in enumerate(self.axes[k]):
            if g is not None:
                w = w.index_select(a, axis_index(g, perms, w.shape[a], w.device))
        return w

    @property
    def bp_keys(self) -> list[str]:
        """Entries some cost term reads permuted (conv kernels, block axes, quadratic entries), in ``keys`` order.

        Only these are kept permuted during the descent (``bp``); the other
        terms are computed from the unpermuted B, so a permuted copy of the
        whole of B is never held.
        """
        if "_bp_keys" not in self.__dict__:
            need = set()
            for g in self.groups:
                need.update(k for k, _a, _am in self._plan(g)[2])
                need.update(t[0] for t in self.segs[g])
                need.update(k for k, _a, _am in self.quad[g])
            self._bp_keys = [k for k in self.keys if k in need]
        return self._bp_keys

    def objective(self, bp: Mapping[str, torch.Tensor], keys: list[str] | None = None, start: float = 0.0) -> float:
        """``start + sum_k <A_k, bp_k>`` over ``keys`` (default all), products and sum in float64."""
        tot = start
        for k in self.keys if keys is None else keys:
            if self.A[k].numel() == 0:
                continue
            # float64 products, in blocks of rows (no float64 copy of a whole entry)
            a, b = self.A[k].reshape(self.A[k].shape[0] if self.A[k].dim() else 1, -1), bp[k]
            b = b.reshape(a.shape)
            rows = max(1, (1 << 19) // max(1, a.shape[1]))
            for i in range(0, a.shape[0], rows):
                # a.double() * b.double() in one float64 buffer: float32 -> float64 is exact, so the
                # in-place product with b's block rounds exactly as the product of two float64 copies
                x = a[i : i + rows].to(torch.float64, copy=True)
                tot += float(torch.sum(x.mul_(b[i : i + rows])))
        return tot

    # ------------------------------------------------------------------ cost
    def cost_full(self, g: str, bp: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(C_lin, C_quad)`` against ``bp``'s current unit order, float64 on the device."""
        n = self.spec.sizes[g]
        c = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for k, a, am in self.mats[g]:
            c += self.contribution(k, a, am, bp[k])
        if self.vec_a[g] is not None:
            bv = torch.stack([bp[k] for k in self.vec_keys[g]], 1)
            c += (self.vec_a[g] @ bv.t()).double()
        cq = None
        for k, a, off, m, inner, am, quad in self.segs[g]:
            if not quad:
                c += (am @ _segflat(bp[k], a, off, m, inner).t()).double()
        if self.quad[g] or any(t[6] for t in self.segs[g]):
            cq = torch.zeros(n, n, dtype=torch.float64, device=self.device)
            for k, a, am in self.quad[g]:
                cq += (am @ _flat(bp[k], a).t()).double()
            for k, a, off, m, inner, am, quad in self.segs[g]:
                if quad:
                    cq += (am @ _segflat(bp[k], a, off, m, inner).t()).double()
        return c, cq

    @staticmethod
    def contribution(k: str, a: int, am: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """One (entry, axis) term of a group's cost: ``<A slice i, B slice j>`` for all i, j."""
        if b.dim() == 2 and a == 1:
            return (am.t() @ b).double()  # (in x out) @ (out x in)
        return (am @ _flat(b, a).t()).double()

    def _other_group(self, k: str, a: int) -> str | None:
        """The plain group on the other axis of a 2-D entry (``None`` when the rank-s update does not apply)."""
        if self.A[k].dim() != 2:
            return None
        o = self.axes[k][1 - a]
        return o if isinstance(o, str) and not is_segmented(o) else None

    def _plan(self, g: str) -> tuple[list, list, list]:
        """Group ``g``'s matrix terms split into ``(constant, updatable, other)``.

        *constant*: no other axis carries a group (an input or output layer);
        *updatable*: a 2-D entry whose other axis carries one plain group ``h``
        (held in the group's running sum and updated by rank-s corrections);
        *other*: the rest (conv kernels, block axes), cached per term by stamps.
        """
        plans = self.__dict__.setdefault("_plans", {})
        if g not in plans:
            const, upd, other = [], [], []
            for k, a, am in self.mats[g]:
                if not any(entry_groups(e) for i, e in enumerate(self.axes[k]) if i != a):
                    const.append((k, a, am))
                elif self._other_group(k, a) is not None:
                    upd.append((k, a, am, self._other_group(k, a)))
                else:
                    other.append((k, a, am))
            plans[g] = (const, upd, other)
        return plans[g]

    @staticmethod
    def _operands(
        k: str, a: int, am: torch.Tensor, b: torch.Tensor, inv_g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` of one (entry, axis) term ``L @ R^T``.

        ``L = A^{(a)}``, ``R = pi(B)^{(a)}`` rows in B's order of ``g``.
        """
        if b.dim() == 2 and a == 1:
            return am.t(), b.index_select(1, inv_g).t()  # (in x out), (in x out)
        return am, _flat(b, a).index_select(0, inv_g)

    def _term(self, k: str, a: int, am: torch.Tensor, b: torch.Tensor, inv_g: torch.Tensor) -> torch.Tensor:
        """One (entry, axis) term in B's original unit order of its group, in the problem's dtype."""
        left, right = self._operands(k, a, am, b, inv_g)
        return left @ right.t()

    def _build_sum(self, g: str, perms: Mapping[str, torch.Tensor]) -> list:
        """Group ``g``'s running sum of constant and updatable terms, from scratch: ``[C, p_h at build, updates]``.

        Computed from the unpermuted B: an updatable term
        ``sum_c A^{(a)}[i, c] B^{(a)}[j, p_h[c]] = sum_c A^{(a)}[i, p_h^{-1}[c]] B^{(a)}[j, c]``
        is a product of A's rows (columns gathered, a block of rows at a time) with B
        as it is, so no permuted copy of an entry is made.
        """
        const, upd, _ = self._plan(g)
        n = self.spec.sizes[g]
        if 8 * n * n >= TRIM_MIN_BYTES:  # freed blocks (the sum this one replaces) back before n x n float64 more
            _trim_heap()
        s = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        rows = _rows_per_block(n)
        terms = [(k, a, None) for k, a, _ in const] + [(k, a, torch.argsort(perms[h])) for k, a, _, h in upd]
        # One work buffer for the gathered rows of A and one for the block product, reused by every
        # term and block: repeated allocations of these sizes fragment the C heap (measured: up to
        # three times the sum's own size held at 1024 units). ``out=`` runs the same kernels.
        dt = self.A[terms[0][0]].dtype if terms else torch.float32
        m_max = max((_flat(self.A[k], a).shape[1] for k, a, inv_h in terms if inv_h is not None), default=0)
        ws_left = torch.empty(min(rows, n) * m_max, dtype=dt, device=self.device) if m_max else None
        ws_prod = torch.empty(min(rows, n) * n, dtype=dt, device=self.device) if terms else None
        for k, a, inv_h in terms:
            af, bf = _flat(self.A[k], a), _flat(self.B[k], a)
            bt = bf.t()
            for i in range(0, n, rows):
                r = min(rows, n - i)
                left = af[i : i + r]
                if inv_h is not None:
                    left = torch.index_select(left, 1, inv_h, out=ws_left[: r * left.shape[1]].view(r, -1))
                prod = torch.mm(left, bt, out=ws_prod[: r * n].view(r, n))
                s[i : i + r] += prod
            self.counters["cost_terms_recomputed"] += 1
        del ws_left, ws_prod
        if self.vec_a[g] is not None:  # biases / norm vectors: only g moves them
            _add_product(s, self.vec_a[g], torch.stack([self.B[k] for k in self.vec_keys[g]], 1))
        return [s, {(k, a): perms[h] for k, a, _, h in upd}, 0]

    @property
    def needs_bp(self) -> bool:
        """Whether some cost term is computed from the permuted B (conv kernels, block axes, quadratic entries)."""
        return bool(self.bp_keys)

    def objective_of(self, perms: Mapping[str, torch.Tensor], bp: Mapping[str, torch.Tensor] | None = None) -> float:
        """``J(pi)`` permuting one entry at a time (no permuted copy of the whole model).

        With ``bp`` (B permuted for some entries) those entries are read from it
        and the sum runs on across entries, as :meth:`objective` over a whole
        permuted B does (the same float64 additions in the same order).
        """
        tot = 0.0
        for k in self.keys:
            if bp is None:
                tot += self.objective({k: self._permuted(k, perms)}, [k])
            else:
                tot = self.objective({k: bp[k] if k in bp else self._permuted(k, perms)}, [k], start=tot)
        return tot

    def _rank_update(
        self, s: torch.Tensor, k: str, a: int, moved: torch.Tensor, p_old: torch.Tensor, p_new: torch.Tensor
    ) -> None:
        """``s += A^{(a)}[:, S] (B^{(a)}[:, p_new[S]] - B^{(a)}[:, p_old[S]])^T`` for ``S = moved`` (B unpermuted).

        The change of the term ``T[i, j] = sum_c A^{(a)}[i, c] B^{(a)}[j, p_h[c]]``
        (position ``c`` of ``pi(B)`` on ``h``'s axis holds unit ``p_h[c]`` of B;
        rows ``j`` in B's original order of ``g``) when ``h`` moves from ``p_old``
        to ``p_new``: only the positions in ``S`` contribute, ``O(n^2 |S|)``.
        Products in the problem's dtype, summed into float64 ``s``, in blocks of
        positions so no ``n x |S|`` temporary outlives its block.
        """
        o = 1 - a
        A, B = self.A[k], self.B[k]
        blk = max(64, (1 << 20) // max(1, s.shape[0]))
        for j in range(0, moved.numel(), blk):
            idx = moved[j : j + blk]
            a_s = A.index_select(o, idx)
            d = B.index_select(o, p_new[idx]).sub_(B.index_select(o, p_old[idx]))  # in place: one temporary less
            if a == 0:  # (n, s) @ (s, n)
                _add_product(s, a_s, d)
            else:  # A^{(1)} = A^T: (s, n)^T @ (s, n)
                _add_product(s, a_s.t(), d.t())

    def cost_original(
        self,
        g: str,
        bp: Mapping[str, torch.Tensor],
        inv_g: torch.Tensor,
        stamps: Mapping[str, int],
        cache: dict,
        perms: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(C_lin, C_quad)`` against B's *original* unit order of ``g``.

        Every term, re-ordered to B's original units of ``g``, depends only on
        the permutations of the entry's *other* axes. Constant terms (input and
        output layers, biases) and the terms of 2-D entries with one plain group
        ``h`` on the other axis are held in one float64 running sum per group;
        when ``h`` has moved ``|S|`` units since, its term is brought up to date
        by a rank-``|S|`` correction (:meth:`_rank_update`), ``O(n^2 |S|)``
        instead of the ``O(n^2 m)`` product. The sum is rebuilt from scratch
        after :data:`RANK_UPDATE_REFRESH` updates (bounds the rounding drift to
        a few float32 roundings of a term) and when a neighbour moved more than
        :data:`RANK_UPDATE_MAX_FRACTION` of its units. Other terms (conv kernels,
        block axes) are cached per term and recomputed when one of their
        groups has moved (``stamps[h]`` counts the moves of group ``h``).

        The returned ``C_lin`` may be the cached sum itself: callers must not
        modify it (:func:`_lap` restores what it negates).
        """
        n = self.spec.sizes[g]
        const, upd, other = self._plan(g)
        ent = cache.get((g, "sum"))
        stale = []
        if ent is not None:
            for k, a, _am, h in upd:
                p_old, p_new = ent[1][(k, a)], perms[h]
                if p_old is p_new:
                    continue
                moved = torch.nonzero(p_old != p_new).flatten()
                if moved.numel():
                    stale.append((k, a, moved, p_old, p_new, h))
        if ent is None or (
            stale
            and (
                ent[2] >= RANK_UPDATE_REFRESH
                or any(t[2].numel() > RANK_UPDATE_MAX_FRACTION * t[3].numel() for t in stale)
            )
        ):
            if ent is not None:  # free the old sum before its replacement is built (one n x n float64 less at peak)
                cache.pop((g, "sum"), None)
                ent = None
            ent = self._build_sum(g, perms)
            cache[(g, "sum")] = ent
        elif stale:
            for k, a, moved, p_old, p_new, _h in stale:
                self._rank_update(ent[0], k, a, moved, p_old, p_new)
                ent[1][(k, a)] = p_new
                self.counters["cost_terms_updated"] += 1
            ent[2] += 1
        plain_segs = [t for t in self.segs[g] if not t[6]]
        if not other and not plain_segs:
            c = ent[0]
        else:
            c = ent[0].clone()
            for k, a, am in other:
                left, right = self._operands(k, a, am, bp[k], inv_g)
                if left.shape[1] <= UNCACHED_MAX_INNER:  # as cheap to recompute as to add: never held
                    _add_product(c, left, right)
                    continue
                stamp = tuple(stamps[h] for i, e in enumerate(self.axes[k]) if i != a for h in entry_groups(e))
                hit = cache.get((k, a))
                if hit is None or hit[0] != stamp:
                    hit = cache[(k, a)] = (stamp, left @ right.t())
                    self.counters["cost_terms_recomputed"] += 1
                _accumulate(c, hit[1])
            for k, a, off, m, inner, am, _quad in plain_segs:
                stamp = tuple(stamps[h] for j, e in enumerate(self.axes[k]) if j != a for h in entry_groups(e))
                hit = cache.get((k, a, "seg", off))
                if hit is None or hit[0] != stamp:
                    hit = (stamp, am @ _segflat(bp[k], a, off, m, inner).index_select(0, inv_g).t())
                    cache[(k, a, "seg", off)] = hit
                _accumulate(c, hit[1])
        cq = None
        if self.quad[g] or any(t[6] for t in self.segs[g]):
            cq = torch.zeros(n, n, dtype=torch.float64, device=self.device)
            for k, a, am in self.quad[g]:
                cq += (am @ _flat(bp[k], a).t()).double()
            for k, a, off, m, inner, am, quad in self.segs[g]:
                if quad:
                    cq += (am @ _segflat(bp[k], a, off, m, inner).t()).double()
            cq = cq[:, inv_g]
        return c, cq

    def reindex(
        self, g: str, q: torch.Tensor, bp: dict[str, torch.Tensor], keys: list[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """``bp`` with every axis of ``g`` re-indexed by positions ``q`` (returns the changed entries)."""
        changed = {}
        for k in keys if keys is not None else {k for k, _ in self.members[g]}:
            w = bp[k]
            for a, x in enumerate(self.axes[k]):
                if x == g:
                    w = w.index_select(a, q)
                elif is_segmented(x) and g in entry_groups(x):
                    pos = {
                        h: (q if h == g else torch.arange(self.spec.sizes[h], device=q.device)) for h in entry_groups(x)
                    }
                    w = w.index_select(a, axis_index(x, pos, w.shape[a], q.device))
            changed[k] = w
        return changed


_LIBC: Any = None


def _trim_heap() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    The cost terms' temporaries are ``n x n`` blocks freed right after use;
    glibc keeps such freed blocks in its heap once its dynamic mmap threshold
    has risen past their size, so without a trim the process's resident size
    grows by several cost matrices that hold nothing.
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _accumulate(c: torch.Tensor, t: torch.Tensor) -> None:
    """``c += t`` for a float64 ``c`` and a lower-precision ``t``, in blocks of rows (no float64 copy of ``t``)."""
    if t.dtype == c.dtype:
        c += t
        return
    rows = _rows_per_block(c.shape[1])
    for i in range(0, c.shape[0], rows):
        c[i : i + rows] += t[i : i + rows]


def _rows_per_block(n: int) -> int:
    """Rows of an ``(rows, n)`` block of about 1M elements (the size of the float32 temporaries)."""
    return max(1, (1 << 20) // max(1, n))


def _add_product(c: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``c += left @ right^T`` (float64 ``c``), in blocks of rows so no ``n x n`` temporary is made."""
    rows = _rows_per_block(c.shape[1])
    rt = right.t()
    for i in range(0, c.shape[0], rows):
        c[i : i + rows] += left[i : i + rows] @ rt
