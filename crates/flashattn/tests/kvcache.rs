//! KV-cache attention on the CPU: the append (with rotary), paging, batch index and left padding are checked
//! against an independent model of the cache, and the attention against the f64 oracle run on the dense
//! keys that model says are visible. Outputs are NaN-poisoned before each call (`Tuning::poison_outputs`).
//! Values come from a cache of their own, or (MLA, `Values::KeyPrefix`) from the first `d_v` columns of the keys.
#![allow(clippy::needless_range_loop)] // index arithmetic mirrors the spec's formulas

mod common;
use common::*;
use flashattn::accuracy::{compare, compare_lse};
use flashattn::problem::{validate, Problem, RowMap, MAX_HEAD_DIM};
use flashattn::reference::{forward_f64, naive_forward};
use flashattn::{kvcache_forward, AttnOptions, CacheSeqlens, DType, KvCache, Mask, Rotary, Tensor, Values, VarLen};
use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Debug, Clone, Copy)]
struct KvCase {
    /// The cache's dtype (and q's, k_new's, v_new's unless the cache is FP8).
    dtype: DType,
    /// With an FP8 (e4m3) cache: q's dtype (e4m3, f16 or bf16) and the appended rows' (e4m3: stored as they
    /// are; 16-bit: quantized with the descale).
    fp8: Option<(DType, DType)>,
    d: usize,
    /// The value head dim (v_cache's, v_new's and o's last dim).
    d_v: usize,
    sq: usize,
    s_new: usize,
    page: Option<usize>,
    rot: Rot,
    interleaved: bool,
    leftpad: bool,
    batch_idx: bool,
    causal: bool,
    /// Query and key/value heads `(h, hk)`.
    heads: (usize, usize),
    /// The values are the first `d_v` columns of the key cache (`Values::KeyPrefix`, MLA): no v_cache, no v_new.
    key_prefix: bool,
}

impl KvCase {
    /// Case `i` of a sweep's row: left padding on the odd cases and a batch index from the third on, both only in
    /// an unpaged cache; a cache of `dtype` (not FP8), no rotary, causal.
    fn nth(i: usize, dtype: DType, (d, d_v): (usize, usize), (sq, s_new): (usize, usize), page: Option<usize>) -> Self {
        let unpaged = page.is_none();
        let (leftpad, batch_idx) = (unpaged && i % 2 == 1, unpaged && i >= 2);
        KvCase {
            dtype,
            fp8: None,
            d,
            d_v,
            sq,
            s_new,
            page,
            rot: Rot::None,
            interleaved: false,
            leftpad,
            batch_idx,
            causal: true,
            heads: (6, 2),
            key_prefix: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rot {
    None,
    Half,
    Full,
}

fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x1, x2) = (x[a], x[b]);
        x[a] = x1 * cos[i] - x2 * sin[i];
        x[b] = x1 * sin[i] + x2 * cos[i];
    }
}

fn run(c: KvCase, seed: u64) {
    let mut r = rng(seed);
    let (b, (h, hk), d, dv) = (3usize, c.heads, c.d, c.d_v);
    let cap = 300usize;
    let dt = c.dtype;
    let (q_dt, new_dt) = c.fp8.unwrap_or((dt, dt));
    let fp8 = dt.is_fp8();
    // FP8: descales uniform in [0.5, 2], [b, hk] each (q's only with an e4m3 q).
    let mut descale =
        |on: bool| -> Option<Vec<f32>> { on.then(|| (0..b * hk).map(|_| r.gen_range(0.5f32..=2.0)).collect()) };
    // Key-prefix values are the key cache's elements: k's descale dequantizes them (v_descale is refused).
    let (qdesc, kdesc, vdesc) = (descale(fp8 && q_dt.is_fp8()), descale(fp8), descale(fp8 && !c.key_prefix));
    // Cache geometry: logical [b][cap] rows, stored unpaged ([b_cache, cap]) or paged.
    let b_cache = if c.batch_idx { b + 2 } else { b };
    let rows_of: Vec<usize> = if c.batch_idx {
        let mut v: Vec<usize> = (0..b_cache).collect();
        v.shuffle(&mut r);
        v[..b].to_vec()
    } else {
        (0..b).collect()
    };
    let (cache_shape, table) = match c.page {
        None => (vec![b_cache, cap, hk, d], None),
        Some(ps) => {
            let max_pages = cap.div_ceil(ps);
            let num_pages = b * max_pages + 3;
            let mut pages: Vec<i32> = (0..num_pages as i32).collect();
            pages.shuffle(&mut r);
            (vec![num_pages, ps, hk, d], Some((pages[..b * max_pages].to_vec(), max_pages, ps)))
        }
    };
    let mut seqlens: Vec<usize> = (0..b).map(|_| r.gen_range(0..=cap - c.s_new)).collect();
    seqlens[0] = cap - c.s_new; // fills the cache exactly
    let leftpad: Vec<usize> =
        if c.leftpad { seqlens.iter().map(|&n| r.gen_range(0..=n.min(40))).collect() } else { vec![0; b] };
    let kc0 = randn_tensor(&mut r, &cache_shape, dt, 1.0);
    let v_shape = [&cache_shape[..3], &[dv]].concat();
    // Key-prefix values: no value cache (`vc0` is None), the model's values are the keys' first `dv` columns.
    let vc0 = (!c.key_prefix).then(|| randn_tensor(&mut r, &v_shape, dt, 1.0));
    let q = randn_tensor(&mut r, &[b, c.sq, h, d], q_dt, 1.0);
    let kn = randn_tensor(&mut r, &[b, c.s_new, hk, d], new_dt, 1.0);
    let vn = randn_tensor(&mut r, &[b, c.s_new, hk, dv], new_dt, 1.0);
    let rot = match c.rot {
        Rot::None => 0,
        Rot::Half => (d / 2) & !1,
        Rot::Full => d & !1,
    };
    let s_ro = cap;
    let angles: Vec<f32> =
        (0..s_ro * (rot / 2)).map(|i| (i / (rot / 2).max(1)) as f32 * 0.01 * (1 + i % 7) as f32).collect();
    let cos_t =
        Tensor::from_f32(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), &[s_ro, rot / 2], DType::F32).unwrap();
    let sin_t =
        Tensor::from_f32(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), &[s_ro, rot / 2], DType::F32).unwrap();
    let (cos, sin) = (cos_t.to_f32_vec(), sin_t.to_f32_vec());
    let bt = table.as_ref().map(|(t, mp, _)| Tensor::from_i32(t.clone(), &[b, *mp]).unwrap());
    let as_t = |x: &Option<Vec<f32>>| x.as_ref().map(|x| Tensor::from_f32(x, &[b, hk], DType::F32).unwrap());
    let mut opts =
        AttnOptions { causal: c.causal, ..Default::default() }.descale(as_t(&qdesc), as_t(&kdesc), as_t(&vdesc));
    opts.tuning.poison_outputs = true;
    // What an appended row is divided by before it is stored: a 16-bit row into an FP8 cache, its descale.
    let div = |ds: &Option<Vec<f32>>, i: usize, kh: usize| match ds {
        Some(ds) if !new_dt.is_fp8() => ds[i * hk + kh],
        _ => 1.0,
    };

    // The independent model: expected cache contents after the append.
    let mut ek = kc0.to_f32_vec();
    let mut ev = vc0.as_ref().map(|t| t.to_f32_vec()).unwrap_or_default();
    // The cache row of (sequence, position, key head), counted in rows of the head dim (d for k, d_v for v).
    let row_index = |seq: usize, pos: usize, kh: usize| -> usize {
        match &table {
            None => (rows_of[seq] * cap + pos) * hk + kh,
            Some((t, mp, ps)) => (t[seq * mp + pos / ps] as usize * ps + pos % ps) * hk + kh,
        }
    };
    let (knv, vnv) = (kn.to_f32_vec(), vn.to_f32_vec());
    for i in 0..b {
        for t in 0..c.s_new {
            let pos = seqlens[i] + t;
            for kh in 0..hk {
                let src = ((i * c.s_new + t) * hk + kh) * d;
                let mut krow = knv[src..src + d].to_vec();
                let vsrc = ((i * c.s_new + t) * hk + kh) * dv;
                if rot > 0 {
                    rotate(
                        &mut krow,
                        &cos[pos * rot / 2..(pos + 1) * rot / 2],
                        &sin[pos * rot / 2..(pos + 1) * rot / 2],
                        c.interleaved,
                    );
                }
                let row = row_index(i, pos, kh);
                let (kdiv, vdiv) = (div(&kdesc, i, kh), div(&vdesc, i, kh));
                for x in 0..d {
                    ek[row * d + x] = dt.round(krow[x] / kdiv);
                }
                // Values are appended as given (rotary applies to keys and queries only); key-prefix values come
                // with the keys (below).
                if !c.key_prefix {
                    for x in 0..dv {
                        ev[row * dv + x] = dt.round(vnv[vsrc + x] / vdiv);
                    }
                }
            }
        }
    }

    if c.key_prefix {
        // v[.., j, kh, :dv] = k_cache[.., j, kh, :dv] after the append: every cache row's first dv columns.
        ev = ek.chunks(d).flat_map(|row| row[..dv].to_vec()).collect();
    }

    // The call under test: a cache over `kc` and the values `vc` (`None`: the first dv columns of `kc`) with this
    // case's appended rows, page table, rotary tables, batch index and left padding.
    macro_rules! cache_of {
        ($kc:expr, $vc:expr) => {{
            let values = match $vc {
                Some(v) => Values::Separate(v),
                None => Values::KeyPrefix { d_v: dv },
            };
            let seqlens = CacheSeqlens::PerSeq(seqlens.iter().map(|&x| x as i32).collect());
            let mut cache = KvCache::with_values($kc, values, seqlens);
            if c.s_new > 0 {
                cache.k_new = Some(kn.view());
                cache.v_new = (!c.key_prefix).then(|| vn.view());
            }
            cache.block_table = bt.clone();
            if rot > 0 {
                cache.rotary = Some(Rotary { cos: cos_t.view(), sin: sin_t.view(), interleaved: c.interleaved });
            }
            if c.batch_idx {
                cache.cache_batch_idx = Some(rows_of.iter().map(|&x| x as i32).collect());
            }
            if c.leftpad {
                cache.cache_leftpad = Some(leftpad.iter().map(|&x| x as i32).collect());
            }
            cache
        }};
    }

    // Run the library.
    let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
    let out = {
        let mut cache = cache_of!(kc.view_mut(), vc.as_mut().map(|t| t.view_mut()));
        kvcache_forward(&q.view(), &mut cache, &opts).unwrap_or_else(|e| panic!("{c:?} seed {seed}: {e}"))
    };
    let tol = match dt {
        DType::F32 => 1e-6,
        // FP8: the stored bytes must be exactly the model's (one e4m3 step is 6% or more).
        DType::E4M3 => 0.0,
        _ => 1e-2,
    };
    // Key-prefix values live in k_cache: comparing it compares them.
    let vc_now = vc.as_ref().map(|t| t.to_f32_vec()).unwrap_or_else(|| ev.clone());
    for (name, got, want) in [("k_cache", kc.to_f32_vec(), &ek), ("v_cache", vc_now, &ev)] {
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{c:?} seed {seed}: {name}[{i}] = {g}, model says {w}");
        }
    }

    // Oracle: dense varlen attention over the visible keys of the model cache, with q rotated by the model.
    let sk: Vec<usize> = (0..b).map(|i| seqlens[i] + c.s_new - leftpad[i]).collect();
    let total_k: usize = sk.iter().sum();
    // FP8: the oracle's inputs are the dequantized values (`f32`: exact but for the last bits of x * descale).
    let (mut kd, mut vd) = (Vec::with_capacity(total_k * hk * d), Vec::with_capacity(total_k * hk * dv));
    let scale_of = |ds: &Option<Vec<f32>>, i: usize, kh: usize| ds.as_ref().map_or(1.0, |ds| ds[i * hk + kh]);
    for i in 0..b {
        for j in 0..sk[i] {
            for kh in 0..hk {
                let row = row_index(i, leftpad[i] + j, kh);
                let (km, vm) = (scale_of(&kdesc, i, kh), scale_of(if c.key_prefix { &kdesc } else { &vdesc }, i, kh));
                kd.extend(ek[row * d..(row + 1) * d].iter().map(|x| x * km));
                vd.extend(ev[row * dv..(row + 1) * dv].iter().map(|x| x * vm));
            }
        }
    }
    let mut qv = q.to_f32_vec();
    for i in 0..b {
        for t in 0..c.sq {
            for hh in 0..h {
                let m = scale_of(&qdesc, i, hh / (h / hk));
                let o = ((i * c.sq + t) * h + hh) * d;
                qv[o..o + d].iter_mut().for_each(|x| *x *= m);
            }
        }
    }
    if rot > 0 {
        for i in 0..b {
            for t in 0..c.sq {
                let pos = if c.causal { seqlens[i] + t } else { seqlens[i] };
                for hh in 0..h {
                    let o = ((i * c.sq + t) * h + hh) * d;
                    rotate(
                        &mut qv[o..o + d],
                        &cos[pos * rot / 2..(pos + 1) * rot / 2],
                        &sin[pos * rot / 2..(pos + 1) * rot / 2],
                        c.interleaved,
                    );
                }
            }
        }
    }
    // A rotated 16-bit q is stored in its dtype; an FP8 q is rotated after its descale, in f32.
    let (q_ref_dt, kv_ref_dt) =
        if fp8 { (if q_dt.is_fp8() { DType::F32 } else { q_dt }, DType::F32) } else { (dt, dt) };
    let qd = Tensor::from_f32(&qv, &[b * c.sq, h, d], q_ref_dt).unwrap().to_dtype(kv_ref_dt);
    let kdt = Tensor::from_f32(&kd, &[total_k, hk, d], kv_ref_dt).unwrap();
    let vdt = Tensor::from_f32(&vd, &[total_k, hk, dv], kv_ref_dt).unwrap();
    let mut cu_k = vec![0i32];
    for &s in &sk {
        cu_k.push(cu_k.last().unwrap() + s as i32);
    }
    // The oracle's inputs are already dequantized: no descales.
    let mut vopts = opts.clone().descale(None, None, None);
    vopts.varlen = Some(VarLen {
        cu_seqlens_q: (0..=b).map(|i| (i * c.sq) as i32).collect(),
        cu_seqlens_k: cu_k,
        seqused_k: None,
    });
    let p = oracle_problem(&qd, &kdt, &vdt, c.sq, &sk, &vopts);
    let reference = forward_f64(&p, qd.view().data, kdt.view().data, vdt.view().data);
    if c.key_prefix {
        // The oracle runs the key-prefix form itself too: over the library's plan of the call (the values read from
        // the key cache through k's row map) it agrees with the oracle of the model's dense keys and values.
        let (mut kc1, mut vc1) = (kc0.clone(), vc0.clone());
        let mut cache = cache_of!(kc1.view_mut(), vc1.as_mut().map(|t| t.view_mut()));
        let plan = flashattn::kvcache::prepare(&q.view(), &mut cache, &opts).unwrap();
        let qp = plan.q_rotated.as_ref().map(|t| t.view()).unwrap_or_else(|| q.view());
        let (kv, vv) = (cache.k_cache.as_view(), cache.v_view().unwrap());
        let own = forward_f64(&plan.problem, qp.data, kv.data, vv.data);
        let scale = 1.0 + reference.o.iter().fold(0f64, |m, x| m.max(x.abs()));
        let diff = own.o.iter().zip(&reference.o).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale, "{c:?} seed {seed}: the oracle over the key-prefix plan differs by {diff}");
    }
    let base = if fp8 {
        // The FP8 baseline (e4m3 probabilities) over the library's plan of the same call, on copies of the
        // cache as it was (its append is the model's, checked above), with the model's key and value descales
        // (so that a wrong descale in the plan cannot loosen the bound).
        let (mut kc1, mut vc1) = (kc0.clone(), vc0.clone());
        let mut cache = cache_of!(kc1.view_mut(), vc1.as_mut().map(|t| t.view_mut()));
        let mut plan = flashattn::kvcache::prepare(&q.view(), &mut cache, &opts).unwrap();
        let ds = plan.problem.descale.as_mut().expect("FP8 descales");
        let ones = vec![1.0; b * hk];
        ds.k = kdesc.clone().unwrap_or_else(|| ones.clone());
        ds.v = if c.key_prefix { ds.k.clone() } else { vdesc.clone().unwrap_or(ones) };
        let qp = plan.q_rotated.as_ref().map(|t| t.view()).unwrap_or_else(|| q.view());
        let (kv, vv) = (cache.k_cache.as_view(), cache.v_view().unwrap());
        naive_forward(&plan.problem, qp.data, kv.data, vv.data).0
    } else {
        naive_forward(&p, qd.view().data, kdt.view().data, vdt.view().data).0
    };
    assert_eq!(out.o.shape(), &[b, c.sq, h, dv], "{c:?}: o takes v's head dim");
    let want_o = if fp8 { opts.out_dtype.unwrap_or(if q_dt.is_fp8() { DType::BF16 } else { q_dt }) } else { dt };
    assert_eq!(out.o.dtype(), want_o, "{c:?}: o's dtype");
    let vo = compare("o", &out.o.to_f32_vec(), &reference.o, &base.to_f32_vec(), dt, 2.0);
    assert!(vo.pass, "{c:?} seed {seed}: {vo}");
    // lse: ours is [b, h, sq], the varlen oracle's is [h, b * sq].
    let lse = out.lse.to_f32_vec();
    let mut lse_ref = vec![0f64; lse.len()];
    for i in 0..b {
        for hh in 0..h {
            for t in 0..c.sq {
                lse_ref[(i * h + hh) * c.sq + t] = reference.lse[hh * b * c.sq + i * c.sq + t];
            }
        }
    }
    let vl = compare_lse(&lse, &lse_ref);
    assert!(vl.pass, "{c:?} seed {seed}: {vl}");
}

/// The oracle's problem: varlen attention of contiguous `q` `[b * sq, h, d]` over `k` `[total_k, hk, d]` and `v`
/// `[total_k, hk, d_v]`, `sk[i]` keys for sequence `i`, with `opts`' mask (the only option these cases set).
/// Built field by field because `validate` takes head dims up to 256 and the KV-cache path goes to 576 (MLA);
/// where `validate` takes the dims, the two must agree.
fn oracle_problem(q: &Tensor, k: &Tensor, v: &Tensor, sq: usize, sk: &[usize], opts: &AttnOptions) -> Problem {
    let (&[total_q, h, d], &[total_k, hk, _], &[_, _, d_v]) = (q.shape(), k.shape(), v.shape()) else {
        panic!("rank-3 oracle inputs expected")
    };
    let b = sk.len();
    let q_start: Vec<usize> = (0..b).map(|i| i * sq).collect();
    let k_start: Vec<usize> = sk.iter().scan(0, |acc, &n| Some(std::mem::replace(acc, *acc + n))).collect();
    let map = |starts: &[usize], heads: usize, dim: usize| RowMap {
        base: starts.iter().map(|&s| s * heads * dim).collect(),
        row_stride: heads * dim,
        head_stride: dim,
        paged: None,
    };
    let cu = |starts: &[usize], total: usize| starts.iter().chain([&total]).map(|&x| x as i32).collect::<Vec<i32>>();
    let p = Problem {
        dtype: q.dtype(),
        out_dtype: q.dtype(),
        descale: None,
        batch: b,
        h,
        hk,
        d,
        d_v,
        seqlen_q: vec![sq; b],
        seqlen_k: sk.to_vec(),
        q: map(&q_start, h, d),
        k: map(&k_start, hk, d),
        v: map(&k_start, hk, d_v),
        cu_seqlens: Some((cu(&q_start, total_q), cu(&k_start, total_k))),
        q_start,
        k_start,
        total_q,
        dense_sq: 0,
        total_k,
        varlen: true,
        scale: 1.0 / (d as f32).sqrt(),
        softcap: 0.0,
        alibi: None,
        mask: Mask::new(opts.causal, opts.window).unwrap(),
        seqused_k: None,
        sink: None,
        tuning: opts.tuning.clone(),
    };
    if d <= MAX_HEAD_DIM && d_v <= MAX_HEAD_DIM {
        assert_eq!(validate(&q.view(), &k.view(), &v.view(), opts).unwrap(), p, "the oracle's problem");
    }
    p
}

/// Runs every case (each with a fresh seed) and says how many passed.
fn run_all(what: &str, cases: Vec<KvCase>) {
    let n = cases.len();
    for c in cases {
        run(c, seed());
    }
    println!("{what}: {n} passed, 0 failed");
}

#[test]
fn kvcache_sweep() {
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for page in [None, Some(1), Some(16), Some(256)] {
            for rot in [Rot::None, Rot::Half, Rot::Full] {
                for interleaved in [false, true] {
                    if rot == Rot::None && interleaved {
                        continue;
                    }
                    for (i, &(sq, s_new)) in [(1, 1), (4, 4), (3, 0), (2, 5)].iter().enumerate() {
                        if rot != Rot::None && s_new == 0 {
                            continue;
                        }
                        let d = if i % 2 == 0 { 64 } else { 59 };
                        cases.push(KvCase {
                            rot,
                            interleaved,
                            causal: i % 3 != 2,
                            ..KvCase::nth(i, dtype, (d, d), (sq, s_new), page)
                        });
                    }
                }
            }
        }
    }
    run_all("kvcache sweep", cases);
}

/// A value head dim different from `d` on the KV-cache path: v_cache, v_new and o take `d_v`, rotary applies
/// to keys and queries only (its angles sized by `d`); paged and unpaged, with left padding and batch index,
/// every dtype, against the independent cache model and the f64 oracle.
#[test]
fn kvcache_value_head_dim() {
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (i, &(d, d_v)) in VALUE_DIMS.iter().chain(&[(59, 24)]).enumerate() {
            for page in [None, Some(16)] {
                cases.push(KvCase {
                    rot: if i == 1 { Rot::None } else { [Rot::Half, Rot::Full][i % 2] },
                    interleaved: i % 2 == 0,
                    causal: i != 1,
                    ..KvCase::nth(i, dtype, (d, d_v), ([1, 3, 4, 2][i], [1, 0, 4, 5][i]), page)
                });
            }
        }
    }
    run_all("kvcache value head dims", cases);
}

/// An FP8 (e4m3) KV cache: with an e4m3 q (and descale) or a 16-bit q, appending e4m3 rows (stored as they are)
/// or 16-bit rows (stored as `round_e4m3(x / descale)`), paged and unpaged, rotary, left padding and batch
/// index: the cache's bytes equal the independent model's exactly, and the output (bf16, or q's dtype) passes
/// the FP8 rule against the f64 oracle of the dequantized keys and values.
#[test]
fn kvcache_fp8() {
    let mut cases = Vec::new();
    let kinds = [
        (DType::E4M3, DType::E4M3),
        (DType::E4M3, DType::BF16),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
        (DType::BF16, DType::E4M3),
    ];
    for (ki, &kind) in kinds.iter().enumerate() {
        for page in [None, Some(1), Some(16)] {
            for (i, &(sq, s_new)) in [(1, 1), (4, 4), (3, 0), (2, 5)].iter().enumerate() {
                let rot = if s_new == 0 { Rot::None } else { [Rot::None, Rot::Half, Rot::Full][(ki + i) % 3] };
                let d = [64, 128, 59][(ki + i) % 3];
                cases.push(KvCase {
                    fp8: Some(kind),
                    rot,
                    interleaved: i % 2 == 0,
                    causal: i % 3 != 2,
                    ..KvCase::nth(i, DType::E4M3, (d, d), (sq, s_new), page)
                });
            }
        }
    }
    run_all("kvcache fp8", cases);
}

/// The spec's `(576, 512)` row with `v` a view into `k` (multi-head latent attention, `Values::KeyPrefix`): the
/// values are the first 512 columns of the key cache and come with every appended key. Paged (page sizes 1, 16,
/// 256) and unpaged (left padding, batch index), appends of 0..5 rows, MQA (8 query heads over one latent head,
/// as MLA) and GQA, causal or not, every dtype, plus e4m3 caches (with a bf16 or an e4m3 q; the key descale
/// dequantizes the values): the cache against the independent model (its first 512 columns are the values) and
/// the output against the f64 oracle run on the model's dense keys and values.
#[test]
fn kvcache_mla_key_prefix_values() {
    let mut cases = Vec::new();
    let pages = [None, Some(1), Some(16), Some(256)];
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (pi, &page) in pages.iter().enumerate() {
            for (i, &(sq, s_new)) in [(1, 1), (4, 4), (3, 0), (2, 5)].iter().enumerate() {
                cases.push(KvCase {
                    causal: i % 3 != 2,
                    heads: [(8, 1), (6, 2)][(pi + i) % 2],
                    key_prefix: true,
                    ..KvCase::nth(i, dtype, (576, 512), (sq, s_new), page)
                });
            }
        }
    }
    for (i, kind) in [(DType::BF16, DType::BF16), (DType::E4M3, DType::E4M3)].into_iter().enumerate() {
        for page in [None, Some(16)] {
            cases.push(KvCase {
                fp8: Some(kind),
                heads: (8, 1),
                key_prefix: true,
                ..KvCase::nth(i + 1, DType::E4M3, (576, 512), (2, 3), page)
            });
        }
    }
    run_all("kvcache MLA (576, 512), values a view into the keys", cases);
}
