"""The tracer's last step: from the union-find of streams to a :class:`~lmckit.perm.spec.PermutationSpec`.

After the walk (:class:`lmckit.perm.trace_core.TracerCore`), block refinements are made consistent per class
(a fixpoint over cat/pad/flatten/slice pieces, fused q/k/v stacks and head-split streams), every class of the
union-find that holds a producer and is not pinned becomes one group named after its first producer, every
state-dict axis gets its group (or its block segments), head structures and the ops each group passes
through (``spec.ops``) are collected, and one warning is written per stream that was pinned.
"""

from __future__ import annotations

from typing import Any

from ..errors import LmcError
from .spec import PermutationSpec
from .spec import entry_groups as _entry_groups
from .symmetry_classes import is_linear_label
from .trace_core import _PINNED, TracerCore, TraceResult, _UnionFind

__all__ = ["Tracer"]


class Tracer(TracerCore):
    """The fx tracer: the walk of :class:`~lmckit.perm.trace_core.TracerCore` and the spec building step.

    Notes
    -----
    :func:`lmckit.perm.trace.trace_streams` runs it (``run()``, then ``build()``); the torch.export tracer
    (:mod:`lmckit.perm.export_trace`) subclasses it and overrides the dispatch and some building steps.
    """

    def _group_ops(self, root_group: dict[int, str], heads: dict[str, tuple[int, tuple[str, ...]]]) -> dict:
        """``spec.ops``: per group the labels of the ops its units (or its head-split axes) pass through.

        Ops on head-split axes are attributed through the head joints; ops on streams that belong
        to no group but not known to be linear are attributed to every head-structured group
        (conservative: a symmetry beyond permutations is then refused there, never wrongly granted).
        """
        uf = self.uf
        via: dict[int, set[str]] = {}
        for r, g in root_group.items():
            via.setdefault(r, set()).add(g)
        head_axes: set[int] = set()
        for f, _H, _d, h, w in self.joints:
            g = root_group.get(uf.find(f))
            if g is not None:
                head_axes.add(uf.find(h))  # the head axis carries head permutations only: ops there move whole heads
                via.setdefault(uf.find(w), set()).add(g)
        in_heads = {g for _, members in heads.values() for g in members}
        ops: dict[str, list[str]] = {g: [] for g in root_group.values()}
        pinned = uf.find(_PINNED)
        for label, ins, outs, reduction in self.op_records:
            out_roots = {uf.find(o) for o in outs}
            for e in ins:
                r = uf.find(e)
                if r == pinned or (r in head_axes and r not in via):
                    continue
                lab = label + "/units" if reduction and r not in out_roots else label
                targets = via.get(r)
                if targets is None:
                    if is_linear_label(lab):
                        continue
                    targets = in_heads
                for g in targets:
                    if lab not in ops[g]:
                        ops[g].append(lab)
        for e, lab in self.elem_ops:
            g = root_group.get(uf.find(e))
            if g is not None and lab not in ops[g]:
                ops[g].append(lab)
        for name, _h, elems in self.heads:  # nn.MultiheadAttention's own Q/K and V/O groups
            for x in elems:
                g = root_group.get(uf.find(x))
                if g is not None and f"MultiheadAttention:{name}" not in ops[g]:
                    ops[g].append(f"MultiheadAttention:{name}")
        return ops

    # ---------------------------------------------------------------- block permutations
    def _class_size(self, r: int) -> int | None:
        for e, n in self.extra_sizes.items():
            if self.uf.find(e) == r:
                return n
        for (k, ax), e in self.key_elem.items():
            if self.uf.find(e) == r:
                return int(self.state[k].shape[ax])
        return None

    def _resolve_blocks(self) -> None:
        """Make refinements consistent per class (fixpoint): equal structures join piece by piece,
        slices become refinements, conflicts and pinned refined streams pin their pieces."""
        uf = self.uf
        for _ in range(1000):
            before = (tuple(uf.find(i) for i in range(len(uf.parent))), len(self.refines))
            full: dict[int, list[tuple[list, str]]] = {}
            for e, pieces, where in self.refines:
                full.setdefault(uf.find(e), []).append((pieces, where))
            sl: dict[int, list[tuple[int, int, int, str]]] = {}
            for e, a, b, p, where in self.slices:
                sl.setdefault(uf.find(e), []).append((a, b, p, where))
            pinned = uf.find(_PINNED)
            for r, lst in full.items():
                all_pieces = [x for pieces, _ in lst for x, _, _ in pieces if x is not None]
                if r == pinned:
                    for x in all_pieces:
                        if uf.find(x) != pinned:
                            self.pin(x, f"{lst[0][1]}: the combined stream is left unpermuted")
                    for _, _, p, where in sl.get(r, []):
                        if uf.find(p) != pinned:
                            self.pin(p, f"{where}: the sliced stream is left unpermuted")
                    continue
                ref, where0 = lst[0]
                struct = [(n, inner) for _, n, inner in ref]
                for other, where in lst[1:]:
                    if [(n, inner) for _, n, inner in other] != struct:
                        self.pin(r, f"{where} and {where0} split one stream into different blocks")
                        break
                    for (x, _, _), (y, _, _) in zip(ref, other):
                        if x is not None and y is not None:
                            uf.union(x, y)
                        elif x is not None or y is not None:
                            self.pin(x if x is not None else y, f"{where}: these units meet fixed units of {where0}")
                offs, off = [], 0
                for x, n, inner in ref:
                    offs.append((off, off + n * inner, x, inner))
                    off += n * inner
                for a, b, p, where in sl.get(r, []):
                    hit = next((x for o0, o1, x, inner in offs if o0 == a and o1 == b and inner == 1), "miss")
                    if hit == "miss":
                        self.pin(r, f"{where} cuts a block of {where0} (its cuts must fall between blocks)")
                    elif hit is None:
                        self.pin(p, f"{where} reads fixed units")
                    else:
                        uf.union(p, hit)
            for r, lst in sl.items():
                if r in full:
                    continue
                if r == pinned:
                    for _, _, p, where in lst:
                        if uf.find(p) != pinned:
                            self.pin(p, f"{where}: the sliced stream is left unpermuted")
                    continue
                n = self._class_size(r)
                ivs: dict[tuple[int, int], int] = {}
                for a, b, p, _ in lst:
                    if (a, b) in ivs:
                        uf.union(ivs[(a, b)], p)
                    else:
                        ivs[(a, b)] = p
                order = sorted(ivs)
                overlap = any(order[i][1] > order[i + 1][0] for i in range(len(order) - 1))
                if n is None or overlap:
                    self.pin(r, f"{lst[0][3]}: overlapping slices of one stream")
                    continue
                pieces: list[tuple[int | None, int, int]] = []
                pos = 0
                for a, b in order:
                    if a > pos:
                        pieces.append((None, a - pos, 1))
                    pieces.append((ivs[(a, b)], b - a, 1))
                    pos = b
                if pos < n:
                    pieces.append((None, n - pos, 1))
                e = self.uf.make()
                self.uf.union(e, r)
                self.refines.append((e, pieces, lst[0][3]))
            self._check_stacks()
            self._resolve_joints(full)
            for name, _, elems in self.heads:
                roots = {uf.find(x) for x in elems}
                if pinned in roots or roots & set(full) or len(roots) < len(elems):
                    for x in elems:
                        if uf.find(x) != pinned:
                            self.pin(x, f"attention heads of {name!r} cannot be permuted")
            after = (tuple(uf.find(i) for i in range(len(uf.parent))), len(self.refines))
            if after == before:
                return

    def _check_stacks(self) -> None:
        """A fused (projections, heads, head dim) tensor may only be permuted/unbound: if its placeholder
        axes met anything else, its projections' streams are pinned."""
        uf = self.uf
        if not self.stacks:
            return
        count: dict[int, int] = {}
        for i in range(1, len(uf.parent)):
            r = uf.find(i)
            count[r] = count.get(r, 0) + 1
        for st, (ph, pw, pairs) in self.stacks.items():
            if any(count.get(uf.find(x), 0) != 1 or uf.find(x) == uf.find(_PINNED) for x in (st, ph, pw)):
                src = self.stack_src[st]
                if uf.find(src) != uf.find(_PINNED):
                    self.pin(
                        src,
                        "its (projections, heads, head dim) view is used other than by unbind/indexing "
                        "(which would keep Q, K and V apart)",
                    )
                for h, w in pairs:
                    for x in (h, w):
                        if uf.find(x) != uf.find(_PINNED):
                            self.pin(x, "a fused q/k/v tensor split into heads is used other than by unbind/indexing")

    def _joint_axes(self) -> set[int]:
        """The head and within-head elements of the joints: what a head family may touch (a subclass adds
        its own head axes, as the export tracer does for heads whose features are pinned)."""
        return {x for _, _, _, h, w in self.joints for x in (h, w)}

    def _resolve_joints(self, full: dict[int, Any]) -> None:
        """Head-split streams: joints sharing head and within-head axes are one flat stream; a family of
        flat streams sharing one head axis becomes a head structure. Anything else touching the head or
        within-head axes (parameters, plain streams, pinning) pins the whole family."""
        if not self.joints:
            return
        uf = self.uf
        pinned = uf.find(_PINNED)
        by_hw: dict[tuple[int, int], list[int]] = {}
        for f, _H, _d, h, w in self.joints:
            by_hw.setdefault((uf.find(h), uf.find(w)), []).append(f)
        for fs in by_hw.values():
            for f in fs[1:]:
                uf.union(fs[0], f)
        allowed = self._joint_axes()
        key_roots = {uf.find(e) for e in self.key_elem.values()}
        other_roots = {uf.find(i) for i in range(1, len(uf.parent)) if i not in allowed}
        fam: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for j in self.joints:
            fam.setdefault(uf.find(j[3]), []).append(j)
        for hr, js in fam.items():
            bad = None
            w_roots = {uf.find(j[4]) for j in js}
            flat_roots = {uf.find(j[0]) for j in js}
            if hr == pinned or pinned in w_roots or pinned in flat_roots:
                bad = "the heads or their features are left unpermuted"
            elif hr in other_roots or w_roots & other_roots or hr in key_roots:
                bad = "the head axis or a head's feature axis meets other streams or parameters"
            elif len({j[1] for j in js}) != 1:
                bad = "different head counts"
            elif flat_roots & set(full):
                bad = "a head-split stream is itself split into blocks"
            if bad is None:
                for fr in flat_roots:
                    if len({uf.find(j[4]) for j in js if uf.find(j[0]) == fr}) > 1:
                        bad = "one stream is split into heads in two different ways"
            if bad is not None:
                for _, _, _, h, w in js:
                    for x in (h, w):
                        if uf.find(x) != pinned:
                            self.pin(x, f"attention heads: {bad}")
                for f, *_ in js:
                    if uf.find(f) != pinned:
                        self.pin(f, f"attention heads: {bad}")

    def _expand(
        self, r: int, refined: dict[int, list], stack: tuple[int, ...] = ()
    ) -> list[tuple[int | None, int, int]] | None:
        """Segments (root or None, n, inner) of refined class ``r``, flattened; ``None`` on a cycle."""
        pinned = self.uf.find(_PINNED)
        out: list[tuple[int | None, int, int]] = []
        for x, n, inner in refined[r]:
            rx = self.uf.find(x) if x is not None else None
            if rx is None or rx == pinned:
                out.append((None, n, inner))
            elif rx in refined:
                if rx in stack or rx == r:
                    return None
                sub = self._expand(rx, refined, stack + (r,))
                if sub is None:
                    return None
                out += [(y, m, k * inner) for y, m, k in sub]
            else:
                out.append((rx, n, inner))
        merged: list[tuple[int | None, int, int]] = []  # adjacent fixed runs become one
        for y, m, k in out:
            if y is None and merged and merged[-1][0] is None:
                merged[-1] = (None, merged[-1][1] * merged[-1][2] + m * k, 1)
            elif y is None:
                merged.append((None, m * k, 1))
            else:
                merged.append((y, m, k))
        return merged

    def build(self) -> TraceResult:
        """The spec from the traced streams: name the groups, fill every state axis, collect head structures."""
        self._resolve_blocks()
        uf = self.uf
        pinned_root = uf.find(_PINNED)
        members: dict[int, list[tuple[str, int]]] = {}  # stream root -> the state axes it moves
        for (k, ax), e in self.key_elem.items():
            members.setdefault(uf.find(e), []).append((k, ax))
        producers: dict[int, list[str]] = {}  # stream root -> names of the modules producing it
        for p in self.producer_order:
            r = uf.find(p)
            producers.setdefault(r, [])
            if self.producer_name[p] not in producers[r]:
                producers[r].append(self.producer_name[p])
        msgs = self._pin_messages()
        refined: dict[int, list] = {}
        for e, pieces, _ in self.refines:
            refined.setdefault(uf.find(e), pieces)
        refined.pop(pinned_root, None)
        seg_of, used_in_segments = self._segments(refined, members, producers, msgs)
        root_group, sizes = self._name_groups(members, refined, used_in_segments, pinned_root, msgs)
        axes: dict[str, list[Any]] = {k: [None] * v.dim() for k, v in self.state.items()}
        for r, g in root_group.items():
            for k, ax in members.get(r, []):
                axes[k][ax] = g
        for r, segs in seg_of.items():
            entry = tuple((root_group.get(y) if y is not None else None, n, inner) for y, n, inner in segs)
            if all(g is None for g, _, _ in entry):
                continue
            for k, ax in members[r]:
                axes[k][ax] = entry[0][0] if (len(entry) == 1 and entry[0][2] == 1) else entry
        heads = self._head_structures(root_group, pinned_root)
        used = {g for ax in axes.values() for e in ax for g in _entry_groups(e)}
        for g in [g for g in sizes if g not in used]:  # a stream whose every axis ended in fixed blocks
            del sizes[g]
        heads = {n: hv for n, hv in heads.items() if all(g in sizes for g in hv[1])}
        ops = self._group_ops(root_group, heads)
        spec = PermutationSpec(
            axes={k: tuple(v) for k, v in axes.items()},
            sizes=sizes,
            shapes={k: tuple(v.shape) for k, v in self.state.items()},
            heads=heads,
            ops={g: tuple(v) for g, v in ops.items() if g in sizes},
        )
        spec.validate()
        if self.strict and msgs:
            raise LmcError(
                "cannot build a complete permutation spec: " + "; ".join(msgs),
                "write a permutation_spec() method for this model, or trace with strict=False to "
                "leave those units unpermuted",
            )
        res = TraceResult(spec=spec, warnings=msgs, producers={root_group[r]: producers.get(r, []) for r in root_group})
        res.sites = self._sites(root_group)
        res.opaque = list(dict.fromkeys(self.opaque_ops))
        return res

    def _pin_messages(self) -> list[str]:
        """One warning per stream that had producers with >1 unit and was pinned for a reason.

        (Pinning by the model output is expected and silent.)
        """
        why_by_label: dict[str, list[str]] = {}
        for e, why, warn in self.pin_reasons:
            if not warn:
                continue
            size = self._size(e)
            if (size is not None and size <= 1) or not any(self._same_before_pin(p, e) for p in self.producer_order):
                continue  # single units, or parameter axes that never were a unit space
            lst = why_by_label.setdefault(self._label(e), [])
            if why not in lst:
                lst.append(why)
        return [f"{label} left unpermuted: {'; '.join(whys)}" for label, whys in why_by_label.items()]

    def _segments(
        self,
        refined: dict[int, list],
        members: dict[int, list[tuple[str, int]]],
        producers: dict[int, list[str]],
        msgs: list[str],
    ) -> tuple[dict[int, list[tuple[int | None, int, int]]], dict[int, str]]:
        """Block structure of each refined stream with state axes: ``(segments by stream, piece -> owner name)``.

        A stream whose blocks do not add up to its axes' size is left unpermuted (a message in ``msgs``).
        """
        seg_of: dict[int, list[tuple[int | None, int, int]]] = {}  # refined class with state axes -> segments
        used_in_segments: dict[int, str] = {}  # piece root -> name of the refined class (for naming)
        for r in refined:
            if r not in members:
                continue
            segs = self._expand(r, refined)
            total = sum(n * inner for _, n, inner in segs) if segs is not None else -1
            sizes_k = {int(self.state[k].shape[ax]) for k, ax in members[r]}
            if segs is None or sizes_k != {total}:
                msgs.append(
                    f"entries {', '.join(f'{k}[{ax}]' for k, ax in members[r][:3])} left unpermuted: "
                    f"inconsistent block structure"
                )
                continue
            seg_of[r] = segs
            owner = (producers.get(r) or [members[r][0][0].rsplit(".", 1)[0]])[0]
            for y, _, _ in segs:
                if y is not None:
                    used_in_segments.setdefault(y, owner)
        return seg_of, used_in_segments

    def _name_groups(
        self,
        members: dict[int, list[tuple[str, int]]],
        refined: dict[int, list],
        used_in_segments: dict[int, str],
        pinned_root: int,
        msgs: list[str],
    ) -> tuple[dict[int, str], dict[str, int]]:
        """Name each permutable stream after its first producer (``#2``... on clashes), pieces of blocks after
        their owner (``owner.0``...): ``(stream root -> group, group -> size)``.

        Raises :class:`LmcError` in strict mode when the tracer joined axes of different sizes.
        """
        sizes: dict[str, int] = {}
        root_group: dict[int, str] = {}
        for p in self.producer_order:
            r = self.uf.find(p)
            if r == pinned_root or r in root_group or r in refined or (r not in members and r not in used_in_segments):
                continue
            if r not in members:
                size = self._class_size(r)
            else:
                size_set = {int(self.state[k].shape[ax]) for k, ax in members[r]}
                if len(size_set) != 1:
                    msg = (
                        f"units of {self.producer_name[p]!r} left unpermuted: the tracer joined axes of different "
                        f"sizes {sorted(size_set)} ({', '.join(f'{k}[{ax}]' for k, ax in members[r][:4])})"
                    )
                    if self.strict:
                        raise LmcError("cannot build a permutation spec: " + msg)
                    msgs.append(msg)
                    continue
                size = size_set.pop()
            g = self.producer_name[p]
            base, i = g, 2
            while g in sizes:
                g, i = f"{base}#{i}", i + 1
            root_group[r] = g
            sizes[g] = size
        for r, owner in used_in_segments.items():  # pieces without a producer of their own
            if r in root_group or r == pinned_root:
                continue
            size = self._class_size(r)
            sz_members = {int(self.state[k].shape[ax]) for k, ax in members.get(r, [])}
            if size is None or (sz_members and sz_members != {size}):
                continue
            g, i = f"{owner}.{0}", 0
            while g in sizes:
                i += 1
                g = f"{owner}.{i}"
            root_group[r] = g
            sizes[g] = size
        return root_group, sizes

    def _head_structures(self, root_group: dict[int, str], pinned_root: int) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Attention-head constraints: groups whose units move in whole heads together (joints and declared heads)."""
        uf = self.uf
        heads: dict[str, tuple[int, tuple[str, ...]]] = {}
        fam: dict[int, tuple[int, list[str]]] = {}
        for f, H, _d, h, _w in self.joints:
            g = root_group.get(uf.find(f))
            if g is None or uf.find(h) == pinned_root:
                continue
            entry = fam.setdefault(uf.find(h), (H, []))
            if g not in entry[1]:
                entry[1].append(g)
        for H, gs in fam.values():
            heads[f"{gs[0]}.heads"] = (H, tuple(gs))
        for name, h, elems in self.heads:
            gs = [root_group.get(uf.find(x)) for x in elems]
            if all(g is not None for g in gs):
                heads[name] = (h, tuple(gs))
        return heads

    def _label(self, e: int) -> str:
        """Readable name for the stream of element ``e`` at the time it was pinned: its producers."""
        names = [self.producer_name[p] for p in self.producer_order if self._same_before_pin(p, e)]
        if names:
            return "units of " + ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        keys = [f"{k}[{ax}]" for (k, ax), x in self.key_elem.items() if self._same_before_pin(x, e)]
        return "entries " + ", ".join(keys[:3]) if keys else f"stream #{e}"

    def _same_before_pin(self, a: int, b: int) -> bool:
        return self._unpinned_root(a) == self._unpinned_root(b)

    def _unpinned_root(self, e: int) -> int:
        if not hasattr(self, "_shadow"):
            self._shadow = self._shadow_uf()
        return self._shadow.find(e)

    def _shadow_uf(self) -> _UnionFind:
        """The union-find replayed without any pinning (unions through PINNED dropped)."""
        sh = _UnionFind()
        sh.parent = list(range(len(self.uf.parent)))
        for a, b in self._unions:
            if a != _PINNED and b != _PINNED:
                sh.union(a, b)
        return sh

    def _size(self, e: int) -> int | None:
        for (k, ax), x in self.key_elem.items():
            if self._same_before_pin(x, e):
                return int(self.state[k].shape[ax])
        return None

    def _sites(self, root_group: dict[int, str]) -> dict[str, list[str]]:
        rank = {"act": 0, "norm": 1, "producer": 2}
        best: dict[str, tuple[int, list[str]]] = {}
        for node, kind in self.site_nodes:
            name = str(node.target)
            if self.module_calls.get(name, 0) != 1:
                continue  # a module called twice cannot be hooked unambiguously
            inf = self.info.get(node)
            if not isinstance(inf, dict) or 1 not in inf:
                continue
            g = root_group.get(self.uf.find(inf[1]))
            if g is None:
                continue
            r = rank[kind]
            cur = best.get(g)
            if cur is None or r < cur[0]:
                best[g] = (r, [name])
            elif r == cur[0] and name not in cur[1]:
                cur[1].append(name)
        return {g: list(best[g][1]) if g in best else [] for g in root_group.values()}
