"""`flash_attn_with_kvcache` against the float64 reference: unpaged and paged caches (odd page sizes), in-place
append, rotary in both layouts, leftpad, batch index, masks, ALiBi, softcap, GQA; and the cache it leaves."""

from __future__ import annotations

import pytest
import torch
from ref import attention_one, check, check_lse, rotate

from flashattn import flash_attn_with_kvcache


def make_case(
    device,
    dtype,
    *,
    b=3,
    h=6,
    hk=2,
    d=64,
    dv=None,
    sq=1,
    s_new=2,
    cap=70,
    page=None,
    rot=0,
    interleaved=True,
    leftpad=False,
    batch_idx=False,
):
    dv = d if dv is None else dv  # the value head dim (v_cache's, v_new's and out's)
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k_new = torch.randn(b, s_new, hk, d, device=device, dtype=dtype) if s_new else None
    v_new = torch.randn(b, s_new, hk, dv, device=device, dtype=dtype) if s_new else None
    seqlens = torch.randint(0, cap - s_new + 1, (b,), dtype=torch.int32)
    seqlens[0] = cap - s_new  # one sequence filled exactly to capacity
    b_cache = b + 2 if batch_idx else b
    bidx = torch.randperm(b_cache)[:b].to(torch.int32) if batch_idx else None
    lp = None
    if leftpad:
        lp = (torch.rand(b) * (seqlens.float() + 1)).floor().to(torch.int32).clamp(max=seqlens)
    table = None
    if page is None:
        k_cache = torch.randn(b_cache, cap, hk, d, device=device, dtype=dtype)
        v_cache = torch.randn(b_cache, cap, hk, dv, device=device, dtype=dtype)
    else:
        pages_per_seq = -(-cap // page)
        n_pages = b * pages_per_seq + 3
        table = torch.randperm(n_pages)[: b * pages_per_seq].reshape(b, pages_per_seq).to(torch.int32)
        k_cache = torch.randn(n_pages, page, hk, d, device=device, dtype=dtype)
        v_cache = torch.randn(n_pages, page, hk, dv, device=device, dtype=dtype)
    cos = sin = None
    if rot:
        s_ro = cap + sq
        ang = torch.rand(s_ro, rot // 2, dtype=torch.float64) * 6.3
        cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=k_new,
        v=v_new,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=seqlens.to(device),
        cache_batch_idx=None if bidx is None else bidx.to(device),
        cache_leftpad=None if lp is None else lp.to(device),
        block_table=None if table is None else table.to(device),
        rotary_interleaved=interleaved,
    )


def logical_rows(c, i):
    """The cache of sequence i as logical rows `[capacity, hk, d]` (k, v) and the capacity."""
    kc, vc, table = c["k_cache"].cpu(), c["v_cache"].cpu(), c["block_table"]
    if table is None:
        row = i if c["cache_batch_idx"] is None else int(c["cache_batch_idx"][i])
        return kc[row], vc[row]
    pages = table[i].cpu().long()
    return kc[pages].flatten(0, 1), vc[pages].flatten(0, 1)


def reference(c, causal, window, softcap, alibi, baseline):
    """(o, lse, expected cache rows appended per sequence) of the spec's KV-cache attention."""
    q = c["q"].cpu()
    b, sq, h, d = q.shape
    masked = causal or window != (-1, -1)
    outs, lses, appended = [], [], []
    for i in range(b):
        n = int(c["cache_seqlens"][i])
        lp = 0 if c["cache_leftpad"] is None else int(c["cache_leftpad"][i])
        kl, vl = logical_rows(c, i)
        kl, vl = kl.clone(), vl.clone()
        qi = q[i]
        if c["k"] is not None:
            kn, vn = c["k"][i].cpu(), c["v"][i].cpu()
            s_new = kn.shape[0]
            if c["rotary_cos"] is not None:
                pos = torch.arange(n, n + s_new)
                cos, sin = c["rotary_cos"].cpu()[pos][:, None], c["rotary_sin"].cpu()[pos][:, None]
                kn = rotate(kn, cos, sin, c["rotary_interleaved"]).to(q.dtype)
                qpos = torch.arange(n, n + sq) if masked else torch.full((sq,), n)
                qc, qs = c["rotary_cos"].cpu()[qpos][:, None], c["rotary_sin"].cpu()[qpos][:, None]
                # The rotated q is rounded to the input dtype, as the rotated keys are by the cache: the rotated
                # tensors are the attention's inputs.
                qi = rotate(qi, qc, qs, c["rotary_interleaved"]).to(q.dtype)
            kl[n : n + s_new], vl[n : n + s_new] = kn, vn
            appended.append((kn, vn))
            n += s_new
        if baseline:
            qi = qi.to(q.dtype)
        kk, vv = kl[lp:n], vl[lp:n]
        if not baseline:
            qi, kk, vv = qi.double(), kk.double(), vv.double()
        sl = None if alibi is None else (alibi.cpu() if alibi.dim() == 1 else alibi.cpu()[i])
        o, lse = attention_one(qi, kk, vv, 1 / d**0.5, causal, window, softcap, sl, baseline)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), appended


KV_CASES = [
    # (page, rot, interleaved, leftpad, batch_idx, feature, sq, s_new)
    (None, 0, True, False, False, "none", 1, 0),
    (None, 0, True, False, False, "causal", 1, 2),
    (None, 32, True, False, False, "causal", 3, 3),
    (None, 64, False, True, False, "none", 1, 1),
    (None, 16, False, False, True, "window", 2, 2),
    (1, 0, True, False, False, "causal", 1, 1),
    (3, 32, False, False, False, "causal", 2, 2),
    (16, 64, True, False, False, "alibi", 1, 1),
    (7, 0, True, False, False, "softcap", 4, 0),
    (None, 0, True, True, True, "causal", 1, 0),
]


@pytest.mark.parametrize("case", range(len(KV_CASES)))
def test_kvcache(device, case):
    page, rot, inter, lp, bidx, feat, sq, s_new = KV_CASES[case]
    dtype = [torch.float16, torch.bfloat16][case % 2]
    c = make_case(device, dtype, page=page, rot=rot, interleaved=inter, leftpad=lp, batch_idx=bidx, sq=sq, s_new=s_new)
    causal = feat == "causal"
    window = (20, 3) if feat == "window" else (-1, -1)
    softcap = 30.0 if feat == "softcap" else 0.0
    alibi = (torch.rand(6, device=device) * 0.3) if feat == "alibi" else None
    if softcap:
        c["q"] = c["q"] * 8
    before = {name: c[name].clone() for name in ("k_cache", "v_cache")}
    ref_o, ref_lse, appended = reference(c, causal, window, softcap, alibi, baseline=False)
    base_o, _, _ = reference(c, causal, window, softcap, alibi, baseline=True)
    out, lse = flash_attn_with_kvcache(
        **c, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi, return_softmax_lse=True
    )
    name = f"kvcache page={page} rot={rot}{'i' if inter else ''} lp={lp} bidx={bidx} {feat} sq={sq} new={s_new}"
    check(name, out.cpu(), base_o, ref_o, 3.0 if (softcap or alibi is not None) else 2.0)
    check_lse(name, lse.cpu(), ref_lse)
    # The cache: appended rows hold the (rotated) new keys and the new values; nothing else changed.
    for i in range(c["q"].shape[0]):
        n = int(c["cache_seqlens"][i])
        ck, cv = logical_rows(c, i)
        bk, bv = logical_rows(dict(c, **before), i)
        if s_new:
            kn, vn = appended[i]
            torch.testing.assert_close(ck[n : n + s_new].float(), kn.float(), rtol=1e-2, atol=1e-2)
            assert torch.equal(cv[n : n + s_new], vn)
            ck[n : n + s_new], cv[n : n + s_new] = bk[n : n + s_new], bv[n : n + s_new]
        assert torch.equal(ck, bk) and torch.equal(cv, bv), f"{name}: cache rows outside the append changed"


def test_kvcache_int_seqlens_and_default(device):
    dtype = torch.bfloat16
    c = make_case(device, dtype, s_new=0, cap=40)
    c["cache_seqlens"] = torch.full((3,), 25, dtype=torch.int32, device=device)
    expected = flash_attn_with_kvcache(**c)
    c["cache_seqlens"] = 25
    assert torch.equal(flash_attn_with_kvcache(**c), expected)
    # None: the whole cache.
    c["cache_seqlens"] = None
    full = flash_attn_with_kvcache(**c)
    c["cache_seqlens"] = 40
    assert torch.equal(flash_attn_with_kvcache(**c), full)


def test_kvcache_page_table_alias(device):
    c = make_case(device, torch.float16, page=5, s_new=0)
    table = c.pop("block_table")
    a = flash_attn_with_kvcache(**c, block_table=table)
    b = flash_attn_with_kvcache(**c, page_table=table)
    assert torch.equal(a, b)


@pytest.mark.parametrize("num_splits", [0, 1, 3, 16])
def test_kvcache_num_splits(device, num_splits):
    # A long cache, so that every split count leaves keys in each split (the CPU backend ignores the argument).
    c = make_case(device, torch.bfloat16, b=2, h=4, hk=1, sq=2, s_new=1, cap=900)
    ref_o, ref_lse, _ = reference(c, True, (-1, -1), 0.0, None, baseline=False)
    base_o, _, _ = reference(c, True, (-1, -1), 0.0, None, baseline=True)
    out, lse = flash_attn_with_kvcache(**c, causal=True, num_splits=num_splits, return_softmax_lse=True)
    check(f"kvcache num_splits={num_splits}", out.cpu(), base_o, ref_o, 2.0)
    check_lse(f"kvcache num_splits={num_splits}", lse.cpu(), ref_lse)


def test_kvcache_num_splits_refused(device):
    c = make_case(device, torch.float16, s_new=0)
    for bad in (-1, 2.0, "4"):
        with pytest.raises(ValueError, match="num_splits"):
            flash_attn_with_kvcache(**c, num_splits=bad)


@pytest.mark.parametrize("d,dv,page,rot", [(192, 128, None, 64), (128, 64, 16, 128), (64, 128, None, 0)])
def test_kvcache_value_head_dim(device, d, dv, page, rot):
    """v_cache and v of their own head dim (out takes it; rotary turns q and k only): CPU tensors against the
    float64 reference; the CUDA kernels refuse it (NotImplementedError) until they take it."""
    dtype = torch.bfloat16
    c = make_case(device, dtype, d=d, dv=dv, page=page, rot=rot, sq=2, s_new=2, leftpad=page is None)
    if device == "cuda":
        with pytest.raises(NotImplementedError, match="value head dim"):
            flash_attn_with_kvcache(**c, causal=True)
        return
    ref_o, ref_lse, appended = reference(c, True, (-1, -1), 0.0, None, baseline=False)
    base_o, _, _ = reference(c, True, (-1, -1), 0.0, None, baseline=True)
    out, lse = flash_attn_with_kvcache(**c, causal=True, return_softmax_lse=True)
    assert out.shape == (*c["q"].shape[:-1], dv)
    name = f"kvcache d={d} dv={dv} page={page} rot={rot}"
    check(name, out, base_o, ref_o)
    check_lse(name, lse, ref_lse)
    for i in range(c["q"].shape[0]):
        n = int(c["cache_seqlens"][i])
        assert torch.equal(logical_rows(c, i)[1][n : n + 2], appended[i][1]), f"{name}: v rows not appended"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the kept workspaces are the CUDA path's")
def test_kept_workspaces_across_streams_shapes_and_threads():
    """Eager CUDA calls keep their workspace per stream for the next call (flashattn.release_workspaces() drops
    them): calls interleaved on two streams with shapes whose workspaces grow and shrink (the split count follows
    the batch and the cache length), the same calls from two threads at once on one stream, and rotary appends
    (whose rotated q lives in the workspace) give, bit for bit, what each call gives alone after a release."""
    import threading

    import flashattn

    dev = "cuda"
    shapes = [(1, 4096), (8, 512), (2, 2048), (1, 300), (4, 4096)]
    cases = []
    for i, (b, sk) in enumerate(shapes):
        q = torch.randn(b, 1, 8, 128, device=dev, dtype=torch.bfloat16)
        kc = torch.randn(b, sk, 2, 128, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        seqlens = torch.full((b,), sk - 1, dtype=torch.int32, device=dev)
        kn, vn = (torch.randn(b, 1, 2, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
        cos, sin = (torch.randn(sk, 32, device=dev) for _ in range(2))
        cases.append((q, kc, vc, seqlens, kn, vn, cos, sin, i % 2 == 0))

    def call(c):
        q, kc, vc, seqlens, kn, vn, cos, sin, rot = c
        # Each call appends at the same place into its own copy of the cache: the inputs stay the same.
        k2, v2 = kc.clone(), vc.clone()
        kw = dict(k=kn, v=vn, rotary_cos=cos, rotary_sin=sin) if rot else {}
        return flash_attn_with_kvcache(q, k2, v2, cache_seqlens=seqlens, return_softmax_lse=True, **kw)

    flashattn.release_workspaces()
    alone = []
    for c in cases:
        alone.append(call(c))
        torch.cuda.synchronize()
        flashattn.release_workspaces()

    def same(got, want, what):
        for g, w, name in zip(got, want, ("out", "lse")):
            assert torch.equal(g, w), f"{what}: {name} differs from the call alone"

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for rnd in range(3):
        outs = []
        for i, c in enumerate(cases * 2):
            with torch.cuda.stream(streams[(i + rnd) % 2]):
                outs.append(call(c))
        torch.cuda.synchronize()
        for i, o in enumerate(outs):
            same(o, alone[i % len(cases)], f"round {rnd}, call {i} on stream {(i + rnd) % 2}")

    results, errors = {}, []

    orders = [list(range(len(cases))) * 3, list(range(len(cases)))[::-1] * 3]

    def worker(t):
        try:
            results[t] = [call(cases[i]) for i in orders[t]]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    assert not errors, errors
    for t, outs in results.items():
        for o, i in zip(outs, orders[t]):
            same(o, alone[i], f"thread {t}, case {i}")
    flashattn.release_workspaces()
