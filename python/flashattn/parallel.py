"""Context parallelism: ring attention over the ranks of a ``torch.distributed`` process group.

Each of the ``N`` ranks holds a *zig-zag* shard of the sequence (of q, k and v alike): the ``L`` rows are cut
into ``2N`` chunks, chunk ``c`` being rows ``c*L // (2N)`` to ``(c+1)*L // (2N)`` (so chunk sizes differ by at
most one row and any ``L`` works), and rank ``r`` holds chunks ``r`` and ``2N-1-r``, in that order. With a
causal mask an early chunk sees few keys and its late partner many, so every rank does the same work.

In ``N`` steps the K/V shards travel round the ring (rank ``r`` sends to ``r+1`` and receives from ``r-1``,
point-to-point, overlapped with the attention of the current step). At each step a rank runs the flash kernels
on each (query chunk ``i``, key chunk ``j``) pair, indices global: ``j < i`` fully visible, ``j == i`` causal (a
chunk against itself: equal lengths, so the kernels' bottom-right causal mask is the global one), ``j > i``
skipped; without a mask every pair is full. Partial outputs merge through their log-sum-exps in float32. The
backward reuses the global output and lse: each pair's dq, dk, dv are exact partial sums (the kernels are told
that ``lse`` is the whole row's), written in float32, dq accumulates at home, dk/dv accumulate in float32 while
travelling round the ring and come home after the last hop.

The same code runs gloo on CPU tensors and NCCL on CUDA tensors. Supported: no mask or causal, any scale,
soft-capping, MQA/GQA, float16/bfloat16 (and float32 on CPU), deterministic backward. Refused: dropout, sliding
windows, ALiBi, variable-length batches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import _ops

__all__ = [
    "DistTransport",
    "ring_flash_attn_func",
    "zigzag_bounds",
    "zigzag_gather",
    "zigzag_shard",
    "zigzag_unshard",
]


# --- the zig-zag layout ---------------------------------------------------------------------------------------


def zigzag_bounds(seqlen: int, world_size: int) -> list[int]:
    """The ``2 * world_size + 1`` chunk boundaries of a ``seqlen``-row sequence: chunk ``c`` is rows
    ``bounds[c]:bounds[c+1]``, with ``bounds[c] = c * seqlen // (2 * world_size)``."""
    if world_size < 1:
        raise ValueError(f"invalid argument `world_size`: expected at least 1, got {world_size}")
    if seqlen < 0:
        raise ValueError(f"invalid argument `seqlen`: expected a length >= 0, got {seqlen}")
    chunks = 2 * world_size
    return [c * seqlen // chunks for c in range(chunks + 1)]


class _ZigZag:
    """Where every chunk of the sequence lives: rank ``r`` holds chunks ``r`` and ``2N-1-r``."""

    def __init__(self, seqlen: int, world_size: int):
        self.seqlen, self.n = seqlen, world_size
        self.bounds = zigzag_bounds(seqlen, world_size)

    def chunk_len(self, c: int) -> int:
        return self.bounds[c + 1] - self.bounds[c]

    def rank_chunks(self, r: int) -> tuple[int, int]:
        return r, 2 * self.n - 1 - r

    def rank_len(self, r: int) -> int:
        return sum(self.chunk_len(c) for c in self.rank_chunks(r))

    def local_rows(self, r: int) -> list[tuple[int, int, int]]:
        """Rank ``r``'s chunks as ``(global chunk, first row, end row)``, rows of its own shard."""
        a, b = self.rank_chunks(r)
        la = self.chunk_len(a)
        return [(a, 0, la), (b, la, la + self.chunk_len(b))]


def _check_dim(name: str, x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"invalid argument `{name}`: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"invalid argument `dim`: expected a dimension of a {x.dim()}-d tensor, got {dim}")
    return dim % x.dim()


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s zig-zag shard of ``x`` (the whole sequence along ``dim``, by default FlashAttention's
    ``(batch, seqlen, ...)``): chunks ``rank`` and ``2*world_size-1-rank`` of ``2*world_size``, concatenated (a
    new contiguous tensor)."""
    dim = _check_dim("x", x, dim)
    zz = _ZigZag(x.shape[dim], world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"invalid argument `rank`: expected 0 <= rank < world_size = {world_size}, got {rank}")
    return torch.cat([x.narrow(dim, lo, hi - lo) for _, lo, hi in _chunk_spans(zz, rank)], dim=dim)


def _chunk_spans(zz: _ZigZag, rank: int) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s chunks as ``(global chunk, first global row, end global row)``."""
    return [(c, zz.bounds[c], zz.bounds[c + 1]) for c in zz.rank_chunks(rank)]


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (``shards[r]`` is rank ``r``'s, as :func:`zigzag_shard` cut
    it): the inverse of sharding, on one process."""
    if len(shards) == 0:
        raise ValueError("invalid argument `shards`: expected one shard per rank, got none")
    n = len(shards)
    dim = _check_dim("shards[0]", shards[0], dim)
    zz = _ZigZag(sum(s.shape[dim] for s in shards), n)
    pieces: list[Optional[torch.Tensor]] = [None] * (2 * n)
    for r, s in enumerate(shards):
        if s.shape[dim] != zz.rank_len(r):
            raise ValueError(
                f"invalid argument `shards`: expected shard {r} to have {zz.rank_len(r)} rows in dimension {dim} "
                f"(the zig-zag layout of {zz.seqlen} rows over {n} ranks), got shape {tuple(s.shape)}"
            )
        for c, lo, hi in zz.local_rows(r):
            pieces[c] = s.narrow(dim, lo, hi - lo)
    return torch.cat(pieces, dim=dim)


def zigzag_gather(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """Every rank's shard of the group gathered into the whole sequence, on every rank (a collective: every rank
    of ``group`` calls it). Not differentiable: for outputs and evaluation."""
    dim = _check_dim("x", x, dim)
    n = dist.get_world_size(group)
    lens = _gather_lengths(x.shape[dim], x.device, group)
    # all_gather moves equal shapes: shards of unequal length travel padded to the longest.
    longest = max(lens)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    xs = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()
    parts = [torch.empty_like(xs) for _ in range(n)]
    dist.all_gather(parts, xs, group=group)
    return zigzag_unshard([p.narrow(dim, 0, ln) for p, ln in zip(parts, lens)], dim=dim)


def _gather_lengths(n: int, device: torch.device, group) -> list[int]:
    """Every rank's ``n`` (one small all_gather on ``device``, the group's tensor device)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(x) for x in torch.cat(out).tolist()]


# --- transports -----------------------------------------------------------------------------------------------
# The ring needs three things of its transport: `rank` and `world_size`, `lengths(n, device)` (every rank's `n`:
# a collective), and `start(send, recv, tag)`, which sends the tensors `send` to rank `rank + 1` and receives
# into the buffers `recv` (same count, the sender's shapes and dtypes) from rank `rank - 1`, returning a handle
# whose `wait()` returns `recv` once it holds the data. Messages of one tag arrive in the order they were sent.
# `DistTransport` does it with torch.distributed; the tests add one that simulates the ranks in one process.

_TAGS = {"kv": 0, "dkv": 1}


class _Pending:
    """The requests of one exchange; holds the sent tensors until they are done with (their memory must not be
    reused before the send has read it)."""

    def __init__(self, reqs, send, recv):
        self._reqs, self._send, self._recv = reqs, send, recv

    def wait(self) -> list[torch.Tensor]:
        for r in self._reqs:
            r.wait()
        self._reqs, self._send = [], []
        return self._recv


class DistTransport:
    """The ring over a ``torch.distributed`` process group (``None``: the default group): ``batch_isend_irecv``
    of ``P2POp`` s to the next rank and from the previous one. Works with gloo (CPU tensors) and NCCL (CUDA)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ring attention needs torch.distributed: call torch.distributed.init_process_group first "
                "(torchrun --nproc-per-node N script.py sets up its environment)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # P2POp takes peers as global ranks.
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self._next = to_global((self.rank + 1) % self.world_size)
        self._prev = to_global((self.rank - 1) % self.world_size)

    def lengths(self, n: int, device: torch.device) -> list[int]:
        if self.world_size == 1:
            return [n]
        return _gather_lengths(n, device, self.group)

    def start(self, send: list[torch.Tensor], recv: list[torch.Tensor], tag: str) -> _Pending:
        t = _TAGS[tag]
        # Empty tensors move nothing; both ends know their sizes, so both leave them out.
        ops = [dist.P2POp(dist.isend, s, self._next, self.group, t) for s in send if s.numel() > 0]
        ops += [dist.P2POp(dist.irecv, r, self._prev, self.group, t) for r in recv if r.numel() > 0]
        reqs = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(reqs, send, recv)


# --- the ring -------------------------------------------------------------------------------------------------


def _pair_causal(causal: bool, qc: int, kc: int) -> Optional[bool]:
    """The mask of global query chunk ``qc`` against key chunk ``kc``: ``False`` full, ``True`` causal (the
    diagonal), ``None`` skipped (every key is after every query)."""
    if not causal or kc < qc:
        return False
    return True if kc == qc else None


class _Config:
    """What every step of one ring call needs to know."""

    def __init__(self, transport, zz: _ZigZag, scale: float, causal: bool, softcap: float, deterministic: bool):
        self.t, self.zz = transport, zz
        self.scale, self.causal, self.softcap, self.deterministic = scale, causal, softcap, deterministic

    def pairs(self, rank: int, src: int):
        """The visible pairs of rank ``rank`` meeting the K/V shard of rank ``src``: ``(query slot, q rows, k rows,
        causal)``, the slot being 0 or 1 (which of the rank's chunks), rows those of the two shards."""
        out = []
        for slot, (qc, q0, q1) in enumerate(self.zz.local_rows(rank)):
            for kc, k0, k1 in self.zz.local_rows(src):
                mask = _pair_causal(self.causal, qc, kc)
                if mask is not None and q1 > q0 and k1 > k0:
                    out.append((slot, (q0, q1), (k0, k1), mask))
        return out


def _merge(acc, o: torch.Tensor, lse: torch.Tensor):
    """Merges a part (``o`` ``(b, rows, h, dv)``, its ``lse`` ``(b, h, rows)``) into the running float32 result
    ``acc`` = (o, lse) or ``None``: ``lse = log(e^lse_a + e^lse_b)``, ``o = e^(lse_a - lse) o_a + e^(lse_b -
    lse) o_b``. A row that saw no key in both keeps ``o = 0``, ``lse = -inf``."""
    if acc is None:
        return o.float(), lse.clone()
    o_acc, lse_acc = acc
    new = torch.logaddexp(lse_acc, lse)
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # weights 0, not NaN, on empty rows
    wa = torch.exp(lse_acc - ref).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    return o_acc * wa + o.float() * wb, new


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision of the chunk pairs' kernel inputs. CUDA: the input dtype (its kernels take 16-bit only), with
    each pair's partial output and gradients written in float32 all the same (the kernels' f32 outputs), so that
    nothing is rounded before the merge; the backward reads ``D = rowsum(dO * O)`` from the merged output rounded
    once, as a single call's backward does. CPU: float32 (exact for 16-bit inputs, and the CPU kernels' working
    precision anyway), and ``D`` from the unrounded merged output. Partial outputs rounded to 16 bits before the
    merge exceed the spec's accuracy rule (f16 with softcap at 4 ranks: the merged output carries two roundings,
    and ``D``'s error returns in dS where ``dP - D`` cancels)."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


def _forward(q, k, v, cfg: _Config):
    """This rank's rows of the output (q's dtype) and lse (float32 ``(b, h, rows)``), and the output the
    backward reads (the merged float32 one on CPU, the rounded one on CUDA)."""
    t, zz = cfg.t, cfg.zz
    rank, n = t.rank, t.world_size
    b, _, h, _ = q.shape
    dv = v.shape[-1]
    work = _work_dtype(q)
    qw = q.to(work)
    acc = [None, None]
    kv = [k.contiguous(), v.contiguous()]  # what travels must be contiguous (gloo and NCCL send memory as is)
    for step in range(n):
        src = (rank - step) % n
        if step + 1 < n:
            # The next shard (rank - step - 1's) arrives while this one is computed.
            ln = zz.rank_len((rank - step - 1) % n)
            recv = [k.new_empty((b, ln) + tuple(k.shape[2:])), v.new_empty((b, ln) + tuple(v.shape[2:]))]
            pending = t.start(kv, recv, "kv")
        kw, vw = kv[0].to(work), kv[1].to(work)
        for slot, (q0, q1), (k0, k1), mask in cfg.pairs(rank, src):
            o, lse = _ops._fwd_impl(
                qw[:, q0:q1], kw[:, k0:k1], vw[:, k0:k1], None, None, None, None, 0, 0, cfg.scale, mask, -1, -1,
                cfg.softcap, False, None, None, None, None, torch.float32,
            )  # fmt: skip
            acc[slot] = _merge(acc[slot], o, lse)
        if step + 1 < n:
            kv = pending.wait()
    outs, lses = [], []
    for (_, q0, q1), a in zip(zz.local_rows(rank), acc):
        if a is None:  # an empty chunk (a sequence shorter than 2N)
            a = (
                q.new_zeros((b, q1 - q0, h, dv), dtype=torch.float32),
                q.new_zeros((b, h, q1 - q0), dtype=torch.float32),
            )
        outs.append(a[0])
        lses.append(a[1])
    out32 = torch.cat(outs, dim=1)
    out = out32.to(q.dtype)
    return out, torch.cat(lses, dim=2), (out32 if work == torch.float32 else out)


def _backward(dout, q, k, v, out, lse, cfg: _Config):
    """This rank's dq, dk, dv (in q's, k's, v's dtypes) given the global ``out`` (as :func:`_forward` returned it
    for the backward) and ``lse`` of its rows."""
    t, zz = cfg.t, cfg.zz
    rank, n = t.rank, t.world_size
    b = q.shape[0]
    work = _work_dtype(q)
    qw, dout, out = q.to(work), dout.to(work), out.to(work)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    # The kernels read lse contiguous: one copy per query chunk, made once.
    lse_rows = [lse[:, :, q0:q1].contiguous() for _, q0, q1 in zz.local_rows(rank)]
    kv = [k.contiguous(), v.contiguous()]
    kv_pending = dkv_pending = None
    for step in range(n):
        src = (rank - step) % n
        if step + 1 < n:
            ln = zz.rank_len((rank - step - 1) % n)
            recv = [k.new_empty((b, ln) + tuple(k.shape[2:])), v.new_empty((b, ln) + tuple(v.shape[2:]))]
            kv_pending = t.start(kv, recv, "kv")
        kw, vw = kv[0].to(work), kv[1].to(work)
        # This shard's dK/dV from this rank's queries, in float32 (what the ranks before added joins below).
        dk = torch.zeros(kw.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(vw.shape, dtype=torch.float32, device=q.device)
        for slot, (q0, q1), (k0, k1), mask in cfg.pairs(rank, src):
            kc, vc = kw[:, k0:k1], vw[:, k0:k1]
            # The pair's partial gradients in float32 on every backend: summed over the ring's pairs before one
            # rounding (one 16-bit rounding per pair fewer on CUDA).
            f32 = torch.float32
            g = (qw.new_empty((b, q1 - q0) + tuple(q.shape[2:]), dtype=f32), kc.new_empty(kc.shape, dtype=f32),
                 vc.new_empty(vc.shape, dtype=f32))  # fmt: skip
            # whole_rows=False: out and lse are the whole rows', this pair holds some of their keys.
            _ops._bwd_into(
                g, dout[:, q0:q1], qw[:, q0:q1], kc, vc, out[:, q0:q1], lse_rows[slot], None, None, None, None, 0, 0,
                cfg.scale, mask, -1, -1, cfg.softcap, cfg.deterministic, whole_rows=False,
            )  # fmt: skip
            dq[:, q0:q1] += g[0]
            dk[:, k0:k1] += g[1]
            dv[:, k0:k1] += g[2]
        if dkv_pending is not None:
            # What the ranks before this one added to the same shard.
            before = dkv_pending.wait()
            dk += before[0]
            dv += before[1]
        if n > 1:
            # On to the next rank (the last hop takes each shard home); receive the shard rank - 1 held.
            ln = zz.rank_len((rank - step - 1) % n)
            recv = [dk.new_empty((b, ln) + tuple(dk.shape[2:])), dv.new_empty((b, ln) + tuple(dv.shape[2:]))]
            dkv_pending = t.start([dk, dv], recv, "dkv")
        if step + 1 < n:
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dk, dv = dkv_pending.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        out, lse, out_bwd = _forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out_bwd, lse)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.cfg)
        return dq, dk, dv, None


_LAYOUT = "(batch, seqlen_local, nheads, headdim)"


def _check_shards(q, k, v) -> None:
    """Shapes and devices of one rank's shards (before any communication)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"invalid argument `{name}`: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"invalid argument `{name}`: expected rank 4 {_LAYOUT} (variable-length batches are not "
                f"supported by ring attention), got shape {tuple(x.shape)}"
            )
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise RuntimeError(
                f"invalid argument `{name}`: expected a tensor on {q.device} (as q), got one on {x.device}"
            )
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != q.shape[0] or x.shape[1] != q.shape[1]:
            raise ValueError(
                f"invalid argument `{name}`: expected the rows of q's shard, {tuple(q.shape[:2])} in its first "
                f"two dims (each rank holds the same rows of q, k and v), got shape {tuple(x.shape)}"
            )


def _setup(q, k, v, transport, softmax_scale, causal, softcap, deterministic, seqlen) -> tuple:
    """Checks the shards and finds the whole sequence's length; returns the shards (last dim contiguous) and
    the ring's configuration."""
    _check_shards(q, k, v)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    rank, n = transport.rank, transport.world_size
    if seqlen is None:
        lens = transport.lengths(q.shape[1], q.device)
        zz = _ZigZag(sum(lens), n)
        bad = [r for r in range(n) if lens[r] != zz.rank_len(r)]
        if bad:
            # Every rank sees the same lengths, so every rank raises (none is left waiting for the others).
            raise ValueError(
                f"invalid argument `q`: expected zig-zag shards of one {zz.seqlen}-row sequence over {n} ranks "
                f"(rows per rank {[zz.rank_len(r) for r in range(n)]}), got {lens} (see zigzag_shard)"
            )
    else:
        zz = _ZigZag(int(seqlen), n)
        if q.shape[1] != zz.rank_len(rank):
            raise ValueError(
                f"invalid argument `seqlen`: rank {rank} of {n} holds {zz.rank_len(rank)} rows of a {zz.seqlen}-row "
                f"sequence (zig-zag), but q has {q.shape[1]} (shape {tuple(q.shape)})"
            )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return q, k, v, _Config(transport, zz, scale, bool(causal), float(softcap), bool(deterministic))


def _ring_attention(
    q, k, v, transport, softmax_scale=None, causal=False, softcap=0.0, deterministic=False, seqlen=None
):
    """Ring attention over any transport (see the transports' comment): ``(out, lse)`` of this rank's rows,
    differentiable in q, k, v."""
    q, k, v, cfg = _setup(q, k, v, transport, softmax_scale, causal, softcap, deterministic, seqlen)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _RingAttention.apply(q, k, v, cfg)
    return _forward(q, k, v, cfg)[:2]


def _unsupported(name: str, expected: str, given) -> NotImplementedError:
    return NotImplementedError(
        f"ring attention does not support `{name}` yet: expected {name}={expected}, got {given!r}"
    )


def ring_flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    group=None,
    seqlen=None,
):
    """Attention over a sequence sharded across the ranks of ``group`` (``None``: the default process group),
    with :func:`flashattn.flash_attn_func`'s arguments and result; every rank of the group calls it.

    ``q`` ``(batch, seqlen_local, nheads, headdim)``, ``k``, ``v`` ``(batch, seqlen_local, nheads_k, headdim)``
    are this rank's zig-zag shards (:func:`zigzag_shard`) of the whole sequence's q, k, v; the result is this
    rank's rows of the output (``return_attn_probs=True``: ``(out, softmax_lse, None)``, ``softmax_lse`` float32
    ``(batch, nheads, seqlen_local)``). Differentiable in q, k, v. ``causal`` applies to the whole sequence.

    ``seqlen``: the whole sequence's length, if known; without it the ranks exchange their shard lengths (one
    small collective) to find it and check that the shards fit together. Every rank must pass it or none.

    Not supported (``NotImplementedError``): ``dropout_p``, ``window_size``, ``alibi_slopes``.
    """
    if dropout_p != 0.0:
        raise _unsupported("dropout_p", "0.0", dropout_p)
    if tuple(window_size) != (-1, -1):
        raise _unsupported("window_size", "(-1, -1)", window_size)
    if alibi_slopes is not None:
        raise _unsupported("alibi_slopes", "None", type(alibi_slopes).__name__)
    _check_shards(q, k, v)
    out, lse = _ring_attention(q, k, v, DistTransport(group), softmax_scale, causal, softcap, deterministic, seqlen)
    if return_attn_probs:
        return out, lse, None
    return out
