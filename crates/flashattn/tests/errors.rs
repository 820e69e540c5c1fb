//! Every malformed input returns a typed error naming the argument; nothing panics and nothing is written.

use flashattn::{
    backward, forward, kvcache_forward, AttnOptions, BackwardInputs, CacheSeqlens, DType, Error, GradientsMut, KvCache,
    Layout, Rotary, Tensor, TensorView, Values, VarLen,
};

fn t(shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_f32(&(0..n).map(|i| (i % 7) as f32 * 0.1).collect::<Vec<_>>(), shape, dtype).unwrap()
}

fn arg_of(r: flashattn::Result<impl std::fmt::Debug>) -> &'static str {
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("expected") || matches!(e, Error::CacheOverflow { .. }), "{msg}");
            e.arg().unwrap_or("<none>")
        }
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn shapes_dtypes_heads_and_dims() {
    let q = t(&[2, 8, 4, 16], DType::F16);
    let k = t(&[2, 8, 2, 16], DType::F16);
    let o = AttnOptions::default();
    assert_eq!(arg_of(forward(&q, &t(&[2, 8, 2, 16], DType::BF16), &k, &o)), "k");
    assert_eq!(arg_of(forward(&q, &k, &t(&[2, 9, 2, 16], DType::F16), &o)), "v");
    assert_eq!(arg_of(forward(&q, &t(&[2, 8, 3, 16], DType::F16), &t(&[2, 8, 3, 16], DType::F16), &o)), "k");
    assert_eq!(arg_of(forward(&q, &t(&[3, 8, 2, 16], DType::F16), &t(&[3, 8, 2, 16], DType::F16), &o)), "k");
    assert_eq!(arg_of(forward(&q, &t(&[2, 8, 2, 8], DType::F16), &t(&[2, 8, 2, 8], DType::F16), &o)), "k");
    let big = t(&[1, 2, 1, 300], DType::F16);
    assert_eq!(arg_of(forward(&big, &big, &big, &o)), "q");
    let i = Tensor::from_i32(vec![0; 16], &[1, 1, 1, 16]).unwrap();
    assert_eq!(arg_of(forward(&i, &i, &i, &o)), "q");
    assert_eq!(arg_of(forward(&t(&[8, 4, 16], DType::F16), &k, &k, &o)), "q");
}

#[test]
fn options() {
    let q = t(&[2, 8, 4, 16], DType::F16);
    assert_eq!(arg_of(forward(&q, &q, &q, &AttnOptions::default().window(-3, 0))), "window");
    assert_eq!(arg_of(forward(&q, &q, &q, &AttnOptions::default().scale(f32::NAN))), "softmax_scale");
    assert_eq!(arg_of(forward(&q, &q, &q, &AttnOptions::default().scale(f32::INFINITY))), "softmax_scale");
    assert_eq!(arg_of(forward(&q, &q, &q, &AttnOptions::default().softcap(-1.0))), "softcap");
    let bad = t(&[3], DType::F32);
    assert_eq!(arg_of(forward(&q, &q, &q, &AttnOptions::default().alibi(bad))), "alibi_slopes");
    let bad = t(&[4], DType::F16);
    assert_eq!(arg_of(forward(&q, &q, &q, &AttnOptions::default().alibi(bad))), "alibi_slopes");
    let ok = t(&[2, 4], DType::F32);
    assert!(forward(&q, &q, &q, &AttnOptions::default().alibi(ok)).is_ok());
}

#[test]
fn varlen_arrays() {
    let q = t(&[10, 2, 16], DType::BF16);
    let k = t(&[12, 2, 16], DType::BF16);
    let vl = |cq: Vec<i32>, ck: Vec<i32>, used: Option<Vec<i32>>| {
        AttnOptions::default().varlen(VarLen { cu_seqlens_q: cq, cu_seqlens_k: ck, seqused_k: used })
    };
    assert!(forward(&q, &k, &k, &vl(vec![0, 4, 10], vec![0, 5, 12], None)).is_ok());
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![1, 4, 10], vec![0, 5, 12], None))), "cu_seqlens_q");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![0, 6, 4, 10], vec![0, 5, 6, 12], None))), "cu_seqlens_q");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![0, 4, 9], vec![0, 5, 12], None))), "cu_seqlens_q");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![0, 4, 10], vec![0, 5], None))), "cu_seqlens_k");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![0, 4, 10], vec![0, 5, 13], None))), "cu_seqlens_k");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![0, 4, 10], vec![0, 5, 12], Some(vec![6, 7])))), "seqused_k");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![0, 4, 10], vec![0, 5, 12], Some(vec![1])))), "seqused_k");
    assert_eq!(arg_of(forward(&q, &k, &k, &vl(vec![], vec![0], None))), "cu_seqlens_q");
}

#[test]
fn layouts() {
    let q = t(&[1, 4, 2, 8], DType::F32);
    // A non-contiguous last dim.
    let strided =
        TensorView::new(q.view().data, Layout { shape: vec![1, 4, 2, 4], strides: vec![64, 16, 8, 2], offset: 0 })
            .unwrap();
    let err = flashattn::problem::validate(&strided, &strided, &strided, &AttnOptions::default()).unwrap_err();
    assert_eq!(err.arg(), Some("q"));
    // A view whose layout escapes its buffer (fields set by hand, bypassing the constructor).
    let mut escaping = q.view();
    escaping.layout.offset = 10;
    let err = flashattn::problem::validate(&escaping, &q.view(), &q.view(), &AttnOptions::default()).unwrap_err();
    assert_eq!(err.arg(), Some("q"));
    // Outputs that overlap themselves are refused.
    let mut o_buf = vec![0f32; 64];
    let mut lse = Tensor::zeros(&[1, 2, 4], DType::F32);
    let mut o = flashattn::TensorViewMut::new(
        flashattn::CpuSliceMut::F32(&mut o_buf),
        Layout { shape: vec![1, 4, 2, 8], strides: vec![0, 8, 0, 1], offset: 0 },
    )
    .unwrap();
    let err =
        flashattn::forward_into(&q.view(), &q.view(), &q.view(), &mut o, &mut lse.view_mut(), &AttnOptions::default())
            .unwrap_err();
    assert_eq!(err.arg(), Some("o"));
}

#[test]
fn backward_arguments() {
    let q = t(&[1, 4, 2, 8], DType::F16);
    let o = AttnOptions::default();
    let f = forward(&q, &q, &q, &o).unwrap();
    let x = BackwardInputs { q: &q, k: &q, v: &q, o: &f.o, lse: &f.lse, dout: &f.o };
    assert_eq!(arg_of(backward(&BackwardInputs { dout: &t(&[1, 4, 2, 4], DType::F16), ..x }, &o)), "dout");
    assert_eq!(arg_of(backward(&BackwardInputs { o: &f.o.to_dtype(DType::BF16), ..x }, &o)), "o");
    assert_eq!(arg_of(backward(&BackwardInputs { lse: &t(&[1, 2, 5], DType::F32), ..x }, &o)), "lse");
}

fn cache(b: usize, s: usize) -> (Tensor, Tensor) {
    (t(&[b, s, 1, 8], DType::F16), t(&[b, s, 1, 8], DType::F16))
}

/// Appends `kn` to the cache as both the new keys and the new values.
fn append<'a>(c: &mut KvCache<'a>, kn: &'a Tensor) {
    c.k_new = Some(kn.view());
    c.v_new = Some(kn.view());
}

/// `kvcache_forward` with the default options of `q` over the cache `kc`, `vc` (`seqlens` rows filled), appending
/// `kn` as both the new keys and the new values.
fn append_and_attend(
    q: &Tensor,
    kc: &mut Tensor,
    vc: &mut Tensor,
    seqlens: CacheSeqlens,
    kn: &Tensor,
) -> flashattn::Result<flashattn::ForwardOutput> {
    let mut c = KvCache::new(kc.view_mut(), vc.view_mut(), seqlens);
    append(&mut c, kn);
    kvcache_forward(&q.view(), &mut c, &AttnOptions::default())
}

#[test]
fn kvcache_overflow_is_refused_and_nothing_written() {
    let q = t(&[2, 3, 2, 8], DType::F16);
    let (mut kc, mut vc) = cache(2, 10);
    let before = kc.clone();
    let kn = t(&[2, 3, 1, 8], DType::F16);
    let err = append_and_attend(&q, &mut kc, &mut vc, CacheSeqlens::PerSeq(vec![7, 8]), &kn).unwrap_err();
    assert_eq!(err, Error::CacheOverflow { seq: 1, needed: 11, capacity: 10 });
    assert_eq!(kc, before, "a refused append must not write");
    // Filling the cache exactly is fine.
    assert!(append_and_attend(&q, &mut kc, &mut vc, CacheSeqlens::PerSeq(vec![7, 7]), &kn).is_ok());
}

#[test]
fn kvcache_arguments() {
    let q = t(&[2, 1, 2, 8], DType::F16);
    let kn = t(&[2, 1, 1, 8], DType::F16);
    macro_rules! run {
        ($c:ident => $body:expr) => {{
            let (mut kc, mut vc) = cache(3, 8);
            let mut $c = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(2));
            $body;
            arg_of(kvcache_forward(&q.view(), &mut $c, &AttnOptions::default()))
        }};
    }
    assert_eq!(run!(c => c.cache_seqlens = CacheSeqlens::PerSeq(vec![1])), "cache_seqlens");
    assert_eq!(run!(c => c.cache_seqlens = CacheSeqlens::All(-1)), "cache_seqlens");
    assert_eq!(run!(c => c.cache_batch_idx = Some(vec![0, 3])), "cache_batch_idx");
    assert_eq!(run!(c => c.cache_leftpad = Some(vec![0, 3])), "cache_leftpad");
    assert_eq!(run!(c => c.k_new = Some(kn.view())), "v_new");
    assert_eq!(
        run!(c => {
            append(&mut c, &kn);
            c.cache_batch_idx = Some(vec![1, 1]);
        }),
        "cache_batch_idx"
    );
    let bt = Tensor::from_i32(vec![0, 1, 2, 9], &[2, 2]).unwrap();
    assert_eq!(
        run!(c => {
            c.block_table = Some(bt.clone());
            c.cache_seqlens = CacheSeqlens::All(9); // needs page [1][1] = 9: out of range
        }),
        "block_table"
    );
    let bt_shape = Tensor::from_i32(vec![0, 1, 2], &[3, 1]).unwrap();
    assert_eq!(run!(c => c.block_table = Some(bt_shape.clone())), "block_table");
    // An appending call with rotary tables.
    let appending_with_rotary = |cos: &Tensor, sin: &Tensor, interleaved: bool| {
        run!(c => {
            append(&mut c, &kn);
            c.rotary = Some(flashattn::Rotary { cos: cos.view(), sin: sin.view(), interleaved });
        })
    };
    let cos = t(&[8, 4], DType::F32);
    let sin = t(&[8, 5], DType::F32);
    assert_eq!(appending_with_rotary(&cos, &sin, false), "rotary_sin");
    assert_eq!(
        run!(c => c.rotary = Some(flashattn::Rotary { cos: cos.view(), sin: cos.view(), interleaved: false })),
        "rotary_cos"
    );
    let short = t(&[2, 4], DType::F32);
    assert_eq!(appending_with_rotary(&short, &short, true), "rotary_cos");
}

// Regressions found by the `fuzz/` target `validate` (see fuzz/README.md).

#[test]
fn fuzz_overflowing_shapes_are_refused() {
    let huge = 1usize << 33;
    // Shape arithmetic overflowed (a panic with overflow checks; a wrapped element count without them).
    let err = Tensor::from_storage(flashattn::CpuStorage::F32(vec![]), &[huge, huge, huge]).unwrap_err();
    assert_eq!(err.arg(), Some("storage"));
    assert_eq!(arg_of(Tensor::from_f32(&[], &[huge, huge], DType::F32)), "values");
    // An empty tensor may have huge dims (its strides are never used).
    assert_eq!(Tensor::from_i32(vec![], &[0, huge, huge]).unwrap().shape(), &[0, huge, huge]);
    // A broadcast view (stride 0) whose element count overflows usize.
    let buf = vec![0f32; 8];
    let q = TensorView {
        data: flashattn::CpuSlice::F32(&buf),
        layout: Layout { shape: vec![huge, huge, 1, 8], strides: vec![0, 0, 8, 1], offset: 0 },
    };
    let err = flashattn::problem::validate(&q, &q, &q, &AttnOptions::default()).unwrap_err();
    assert_eq!(err.arg(), Some("q"));
}

#[test]
fn fuzz_empty_tensors_with_huge_batch_or_wild_strides() {
    // An empty q with a batch past i32: refused rather than allocating per-sequence metadata.
    let buf = vec![0f32; 8];
    let q = TensorView::new(flashattn::CpuSlice::F32(&buf), Layout::contiguous(&[1 << 40, 0, 1, 8])).unwrap();
    assert_eq!(flashattn::problem::validate(&q, &q, &q, &AttnOptions::default()).unwrap_err().arg(), Some("q"));
    // An empty q's strides and offset are unconstrained: row bases must not overflow.
    let q = TensorView {
        data: flashattn::CpuSlice::F32(&buf),
        layout: Layout { shape: vec![3, 0, 1, 8], strides: vec![usize::MAX / 2, 8, 8, 1], offset: usize::MAX - 4 },
    };
    let k = t(&[3, 2, 1, 8], DType::F32);
    let out = flashattn::problem::validate(&q, &k.view(), &k.view(), &AttnOptions::default()).unwrap();
    assert_eq!(out.total_q, 0);
}

#[test]
fn fuzz_kvcache_empty_caches_with_huge_dims() {
    let huge = 1usize << 40;
    let q = Tensor::zeros(&[0, 1, 1, 8], DType::F32);
    // A paged cache of 0 pages of a huge page size, with a huge block-table width: capacity overflowed.
    let (mut kc, mut vc) = (Tensor::zeros(&[0, huge, 1, 8], DType::F32), Tensor::zeros(&[0, huge, 1, 8], DType::F32));
    let mut c = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(0));
    c.block_table = Some(Tensor::from_i32(vec![], &[0, huge]).unwrap());
    assert!(kvcache_forward(&q.view(), &mut c, &AttnOptions::default()).is_ok());
    // An empty cache of huge row count, appended to by an empty batch: the row table was `b_cache` long.
    let (mut kc, mut vc) = (Tensor::zeros(&[huge, 0, 1, 8], DType::F32), Tensor::zeros(&[huge, 0, 1, 8], DType::F32));
    let kn = Tensor::zeros(&[0, 3, 1, 8], DType::F32);
    assert!(append_and_attend(&q, &mut kc, &mut vc, CacheSeqlens::All(0), &kn).is_ok());
}

#[test]
fn fuzz_kvcache_rotary_table_covers_query_positions() {
    // 4 queries, 1 new key, causal: q is rotated at positions 2..6, beyond the 3 rows the keys need
    // (it read past the tables).
    let q = t(&[1, 4, 1, 8], DType::F32);
    let (mut kc, mut vc) = (t(&[1, 8, 1, 8], DType::F32), t(&[1, 8, 1, 8], DType::F32));
    let kn = t(&[1, 1, 1, 8], DType::F32);
    let run = |rows: usize, kc: &mut Tensor, vc: &mut Tensor| {
        let cos = t(&[rows, 2], DType::F32);
        let mut c = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(2));
        append(&mut c, &kn);
        c.rotary = Some(flashattn::Rotary { cos: cos.view(), sin: cos.view(), interleaved: false });
        kvcache_forward(&q.view(), &mut c, &AttnOptions::default().causal()).map(|o| o.o.shape().to_vec())
    };
    assert_eq!(arg_of(run(3, &mut kc, &mut vc)), "rotary_cos");
    assert_eq!(run(6, &mut kc, &mut vc).unwrap(), vec![1, 4, 1, 8]);
}

/// An empty dense batch keeps q's sequence length in the output shapes (`o` is shaped like q).
#[test]
fn empty_dense_batch_keeps_shapes() {
    let q = Tensor::zeros(&[0, 5, 2, 8], DType::F16);
    let out = forward(&q, &q, &q, &AttnOptions::default()).unwrap();
    assert_eq!(out.o.shape(), &[0, 5, 2, 8]);
    assert_eq!(out.lse.shape(), &[0, 2, 5]);
    let mut o = Tensor::zeros(&[0, 5, 2, 8], DType::F16);
    let mut lse = Tensor::zeros(&[0, 2, 5], DType::F32);
    flashattn::forward_into(
        &q.view(),
        &q.view(),
        &q.view(),
        &mut o.view_mut(),
        &mut lse.view_mut(),
        &AttnOptions::default(),
    )
    .unwrap();
}

// Issue 17: sizes are validated before anything proportional to them is allocated.

#[test]
fn empty_tensors_with_a_huge_batch_are_refused_before_allocating() {
    for b in [(1usize << 31) - 1, 1 << 28, flashattn::problem::MAX_BATCH + 1] {
        let q = Tensor::from_f32(&[], &[b, 0, 1, 64], DType::F16).unwrap();
        let t0 = std::time::Instant::now();
        let err = forward(&q, &q, &q, &AttnOptions::default()).unwrap_err();
        assert_eq!(err.arg(), Some("q"), "{err}");
        assert!(err.to_string().contains("at most"), "{err}");
        assert!(t0.elapsed().as_secs_f64() < 1.0, "refused only after {:?}", t0.elapsed());
    }
    let q = Tensor::from_f32(&[], &[flashattn::problem::MAX_BATCH, 0, 1, 64], DType::F16).unwrap();
    assert_eq!(forward(&q, &q, &q, &AttnOptions::default()).unwrap().o.shape()[0], flashattn::problem::MAX_BATCH);
    // The KV-cache path: same bound on q's batch.
    let q = Tensor::from_f32(&[], &[1 << 28, 0, 1, 8], DType::F32).unwrap();
    let (mut kc, mut vc) = cache(1, 8);
    let mut c = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(0));
    assert_eq!(arg_of(kvcache_forward(&q.view(), &mut c, &AttnOptions::default())), "q");
}

#[test]
fn tensor_constructors_check_their_sizes() {
    // Element counts or byte sizes past isize: an error naming `shape` and the bytes, not a panic or abort.
    let err = Tensor::try_nan(&[1 << 32, 1 << 32], DType::F32).unwrap_err();
    assert_eq!(err.arg(), Some("shape"));
    assert!(err.to_string().contains("73786976294838206464 bytes"), "{err}");
    assert_eq!(Tensor::try_zeros(&[usize::MAX, 3], DType::F16).unwrap_err().arg(), Some("shape"));
    assert_eq!(Tensor::try_zeros(&[1 << 62, 2], DType::F16).unwrap_err().arg(), Some("shape"));
    assert_eq!(flashattn::tensor::checked_len(&[usize::MAX, usize::MAX, 0], DType::F32), Ok(0));
    // An allocation the system refuses (more than any machine has, less than isize::MAX).
    let err = Tensor::try_nan(&[1 << 60], DType::F32).unwrap_err();
    assert_eq!(err.arg(), Some("shape"));
    assert!(err.to_string().contains("could not be allocated"), "{err}");
    let t = Tensor::try_nan(&[2, 3], DType::BF16).unwrap();
    assert!(t.to_f32_vec().iter().all(|x| x.is_nan()) && t.shape() == [2, 3]);
    assert_eq!(Tensor::try_zeros(&[2, 3], DType::I32).unwrap(), Tensor::zeros(&[2, 3], DType::I32));
    let r = std::panic::catch_unwind(|| Tensor::nan(&[usize::MAX, 2], DType::F32));
    assert!(r.is_err(), "the infallible constructor documents a panic, never a wrapped count");
}

#[test]
fn head_errors_name_the_right_argument() {
    // 0 query heads: q is at fault, not k.
    let q = t(&[1, 2, 0, 8], DType::F32);
    let k = t(&[1, 2, 1, 8], DType::F32);
    assert_eq!(arg_of(forward(&q, &k, &k, &AttnOptions::default())), "q");
    // KV-cache with a head count not dividing q's: k_cache is at fault.
    let q = t(&[1, 1, 3, 8], DType::F32);
    let (mut kc, mut vc) = (t(&[1, 4, 2, 8], DType::F32), t(&[1, 4, 2, 8], DType::F32));
    let mut c = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(1));
    assert_eq!(arg_of(kvcache_forward(&q.view(), &mut c, &AttnOptions::default())), "k_cache");
}

/// A value head dim different from `d` is valid (o takes it); a v, o, dout, dv or v_cache whose head dim does
/// not fit is refused naming that argument, with the expected and the given shape.
#[test]
fn value_head_dim_mismatches() {
    let o = AttnOptions::default();
    let q = t(&[1, 4, 2, 16], DType::F16);
    let k = t(&[1, 6, 2, 16], DType::F16);
    let v = t(&[1, 6, 2, 24], DType::F16);
    let f = forward(&q, &k, &v, &o).unwrap();
    assert_eq!(f.o.shape(), &[1, 4, 2, 24]);
    // The default scale is 1/sqrt(d) (d = 16), not 1/sqrt(d_v).
    assert_eq!(f.o, forward(&q, &k, &v, &AttnOptions::default().scale(0.25)).unwrap().o);
    assert_ne!(f.o, forward(&q, &k, &v, &AttnOptions::default().scale(1.0 / 24f32.sqrt())).unwrap().o);
    // v must match k but for its last dim, which must be in 1..=256.
    assert_eq!(arg_of(forward(&q, &k, &t(&[1, 5, 2, 24], DType::F16), &o)), "v");
    assert_eq!(arg_of(forward(&q, &k, &t(&[1, 6, 1, 24], DType::F16), &o)), "v");
    assert_eq!(arg_of(forward(&q, &k, &t(&[1, 6, 2, 300], DType::F16), &o)), "v");
    assert_eq!(arg_of(forward(&q, &k, &t(&[1, 6, 2, 0], DType::F16), &o)), "v");
    let err = forward(&q, &k, &t(&[1, 6, 2, 300], DType::F16), &o).unwrap_err().to_string();
    assert!(err.contains("1..=256") && err.contains("300"), "{err}");
    // o and dout take v's head dim, not q's.
    let g = t(&[1, 4, 2, 24], DType::F16);
    let x = BackwardInputs { q: &q, k: &k, v: &v, o: &f.o, lse: &f.lse, dout: &g };
    assert!(backward(&x, &o).is_ok());
    let wrong = t(&[1, 4, 2, 16], DType::F16);
    assert_eq!(arg_of(backward(&BackwardInputs { o: &wrong, ..x }, &o)), "o");
    assert_eq!(arg_of(backward(&BackwardInputs { dout: &wrong, ..x }, &o)), "dout");
    let err = backward(&BackwardInputs { o: &wrong, ..x }, &o).unwrap_err().to_string();
    assert!(err.contains("[1, 4, 2, 24]") && err.contains("[1, 4, 2, 16]"), "{err}");
    // Caller-provided outputs: o with q's head dim, dv with k's.
    let (mut o16, mut lse) = (t(&[1, 4, 2, 16], DType::F16), t(&[1, 2, 4], DType::F32));
    let r = flashattn::forward_into(&q.view(), &k.view(), &v.view(), &mut o16.view_mut(), &mut lse.view_mut(), &o);
    assert_eq!(arg_of(r), "o");
    let (mut dq, mut dk, mut dv16) =
        (t(&[1, 4, 2, 16], DType::F16), t(&[1, 6, 2, 16], DType::F16), t(&[1, 6, 2, 16], DType::F16));
    let grads = GradientsMut { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv16.view_mut() };
    let r = flashattn::backward_into(&x.views(), grads, &o);
    assert_eq!(arg_of(r), "dv");
    // KV cache: v_cache shaped as k_cache but for the head dim; v_new as k_new with v_cache's head dim.
    let qc = t(&[2, 1, 2, 8], DType::F16);
    let kn = t(&[2, 1, 1, 8], DType::F16);
    let vn = t(&[2, 1, 1, 12], DType::F16);
    let run = |v_shape: &[usize], v_new: Option<&Tensor>| {
        let (mut kc, mut vc) = (t(&[3, 8, 1, 8], DType::F16), t(v_shape, DType::F16));
        let mut c = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(2));
        if let Some(v_new) = v_new {
            c.k_new = Some(kn.view());
            c.v_new = Some(v_new.view());
        }
        kvcache_forward(&qc.view(), &mut c, &o).map(|f| f.o.shape().to_vec())
    };
    assert_eq!(run(&[3, 8, 1, 12], Some(&vn)).unwrap(), vec![2, 1, 2, 12]);
    assert_eq!(arg_of(run(&[3, 7, 1, 12], None)), "v_cache");
    // The KV-cache path takes value head dims up to 576 (MLA's 512 among them), not more.
    assert_eq!(run(&[3, 8, 1, 300], None).unwrap(), vec![2, 1, 2, 300]);
    assert_eq!(arg_of(run(&[3, 8, 1, 577], None)), "v_cache");
    assert_eq!(arg_of(run(&[3, 8, 1, 12], Some(&kn))), "v_new");
    assert_eq!(arg_of(run(&[3, 8, 1, 8], Some(&vn))), "v_new");
}

/// Ring attention's shards and merges are written for one head dim: a different value head dim is refused
/// as unsupported, not mistaken for a malformed call.
#[test]
fn ring_refuses_a_different_value_head_dim() {
    let q = t(&[1, 8, 2, 16], DType::F16);
    let v = t(&[1, 8, 2, 8], DType::F16);
    match flashattn::ring::ring_forward(&q, &q, &v, &AttnOptions::default(), 2) {
        Err(Error::Unsupported { backend: "ring", what }) => assert!(what.contains("d_v = 8"), "{what}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// FP8 (e4m3) inputs: descales and `out_dtype` are checked (dtype, shape, values) and refused without FP8
/// inputs (but an f32 `out_dtype`); dense q/k/v are all FP8 or none; the backward pass refuses FP8 and writes nothing.
#[test]
fn fp8_arguments() {
    let e = DType::E4M3;
    let (q, k) = (t(&[2, 8, 4, 16], e), t(&[2, 8, 2, 16], e));
    let ds = |shape: &[usize], dt: DType| Some(t(shape, dt));
    let ok = AttnOptions::default().descale(ds(&[2, 2], DType::F32), ds(&[2, 2], DType::F32), None);
    let out = forward(&q, &k, &k, &ok).unwrap();
    assert_eq!(out.o.dtype(), DType::BF16);
    assert_eq!(forward(&q, &k, &k, &ok.clone().out_dtype(DType::F16)).unwrap().o.dtype(), DType::F16);
    assert_eq!(arg_of(forward(&q, &k, &k, &ok.clone().out_dtype(DType::F32))), "out_dtype");
    assert_eq!(arg_of(forward(&q, &k, &k, &ok.clone().out_dtype(DType::E4M3))), "out_dtype");
    let o = AttnOptions::default();
    assert_eq!(arg_of(forward(&q, &k, &k, &o.clone().descale(ds(&[2, 4], DType::F32), None, None))), "q_descale");
    assert_eq!(arg_of(forward(&q, &k, &k, &o.clone().descale(None, ds(&[2, 2], DType::BF16), None))), "k_descale");
    assert_eq!(arg_of(forward(&q, &k, &k, &o.clone().descale(None, None, ds(&[4], DType::F32)))), "v_descale");
    let nan = Tensor::from_f32(&[1.0, f32::NAN, 1.0, 1.0], &[2, 2], DType::F32).unwrap();
    assert_eq!(arg_of(forward(&q, &k, &k, &o.clone().descale(None, Some(nan), None))), "k_descale");
    // Not FP8: descales and a 16-bit out_dtype are refused ...
    let (qb, kb) = (t(&[2, 8, 4, 16], DType::BF16), t(&[2, 8, 2, 16], DType::BF16));
    assert_eq!(arg_of(forward(&qb, &kb, &kb, &ok)), "q_descale");
    assert_eq!(arg_of(forward(&qb, &kb, &kb, &o.clone().out_dtype(DType::BF16))), "out_dtype");
    // ... except f32, an unrounded output of 16-bit inputs (ring attention's partial outputs), which the ring
    // itself refuses (its output has the inputs' dtype).
    let f32_out = o.clone().out_dtype(DType::F32);
    assert_eq!(forward(&qb, &kb, &kb, &f32_out).unwrap().o.dtype(), DType::F32);
    match flashattn::ring::ring_forward(&qb, &kb, &kb, &f32_out, 2) {
        Err(Error::Unsupported { backend: "ring", what }) => assert!(what.contains("out_dtype"), "{what}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    // Dense: all FP8 or none.
    assert_eq!(arg_of(forward(&qb, &k, &k, &o)), "k");
    assert_eq!(arg_of(forward(&q, &kb, &kb, &o)), "k");
    assert_eq!(arg_of(forward(&q, &k, &kb, &o)), "v");
    // A bf16 o for an e4m3 call is right; an e4m3 one is not.
    let mut o8 = Tensor::nan(&[2, 8, 4, 16], DType::E4M3);
    let mut lse = Tensor::nan(&[2, 4, 8], DType::F32);
    let r = flashattn::forward_into(&q.view(), &k.view(), &k.view(), &mut o8.view_mut(), &mut lse.view_mut(), &o);
    assert_eq!(arg_of(r), "o");
    assert!(lse.to_f32_vec().iter().all(|x| x.is_nan()), "a refused call wrote lse");
    // Backward: refused with a typed error naming q, nothing written.
    let g = t(&[2, 8, 4, 16], DType::BF16);
    let x = BackwardInputs { q: &q, k: &k, v: &k, o: &out.o, lse: &out.lse, dout: &g };
    let err = backward(&x, &ok).unwrap_err();
    assert!(err.to_string().contains("forward-only"), "{err}");
    assert_eq!(err.arg(), Some("q"));
    let (mut dq, mut dk, mut dv) = (Tensor::nan(q.shape(), e), Tensor::nan(k.shape(), e), Tensor::nan(k.shape(), e));
    let grads = GradientsMut { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
    let r = flashattn::backward_into(&x.views(), grads, &ok);
    assert_eq!(arg_of(r), "q");
    for x in [&dq, &dk, &dv] {
        assert!(x.to_f32_vec().iter().all(|x| x.is_nan()), "a refused backward wrote a gradient");
    }
}

/// FP8 on the KV-cache path: a 16-bit q with an e4m3 cache is accepted (no q_descale then), f32 q is not, the
/// two caches must agree, and a refused call appends nothing.
#[test]
fn fp8_kvcache_arguments() {
    let e = DType::E4M3;
    let q = t(&[1, 2, 4, 16], DType::BF16);
    let kn = t(&[1, 2, 2, 16], DType::F16);
    let run = |q: &Tensor, kc_dt: DType, vc_dt: DType, opts: &AttnOptions| {
        let (mut kc, mut vc) = (t(&[1, 8, 2, 16], kc_dt), t(&[1, 8, 2, 16], vc_dt));
        let before = (kc.clone(), vc.clone());
        let r = {
            let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(3));
            cache.k_new = Some(kn.view());
            cache.v_new = Some(kn.view());
            kvcache_forward(&q.view(), &mut cache, opts).map(|o| o.o.dtype())
        };
        if r.is_err() {
            assert!(kc == before.0 && vc == before.1, "a refused call appended");
        }
        r
    };
    let o = AttnOptions::default();
    assert_eq!(run(&q, e, e, &o).unwrap(), DType::BF16);
    assert_eq!(run(&q, e, e, &o.clone().out_dtype(DType::F16)).unwrap(), DType::F16);
    // An f32 output is the forward's (ring attention's partial outputs), not the KV-cache path's.
    let (mut kc, mut vc) = (t(&[1, 8, 2, 16], DType::BF16), t(&[1, 8, 2, 16], DType::BF16));
    let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(3));
    assert_eq!(arg_of(kvcache_forward(&q.view(), &mut cache, &o.clone().out_dtype(DType::F32))), "out_dtype");
    assert_eq!(run(&t(&[1, 2, 4, 16], e), e, e, &o).unwrap(), DType::BF16);
    let qd = Some(t(&[1, 2], DType::F32));
    assert_eq!(arg_of(run(&q, e, e, &o.clone().descale(qd.clone(), None, None))), "q_descale");
    assert_eq!(arg_of(run(&q, e, e, &o.clone().descale(None, Some(t(&[2, 2], DType::F32)), None))), "k_descale");
    assert_eq!(arg_of(run(&t(&[1, 2, 4, 16], DType::F32), e, e, &o)), "q");
    assert_eq!(arg_of(run(&q, e, DType::BF16, &o)), "v_cache");
    assert_eq!(arg_of(run(&q, DType::BF16, e, &o)), "v_cache");
    assert_eq!(arg_of(run(&t(&[1, 2, 4, 16], e), DType::BF16, DType::BF16, &o)), "k_cache");
}

#[test]
fn fuzz_zero_size_calls_cost_nothing_whatever_the_batch_and_heads() {
    // No query row and no key, with a batch and a head count whose product is ~2^36: the fuzzer found the CPU
    // backend walking every (sequence, head) pair of such a call. Both passes return at once, writing nothing.
    let (b, h) = (1usize << 24, 1usize << 12);
    let q = Tensor::zeros(&[b, 0, h, 8], DType::BF16);
    let k = Tensor::zeros(&[b, 0, 1, 8], DType::BF16);
    let t0 = std::time::Instant::now();
    let out = flashattn::forward(&q, &k, &k, &AttnOptions::default()).unwrap();
    assert_eq!(out.o.shape(), &[b, 0, h, 8]);
    let x = BackwardInputs { q: &q, k: &k, v: &k, o: &out.o, lse: &out.lse, dout: &out.o };
    let g = flashattn::backward(&x, &AttnOptions::default()).unwrap();
    assert_eq!(g.dk.shape(), &[b, 0, 1, 8]);
    assert!(t0.elapsed().as_secs_f64() < 5.0, "a zero-size call took {:?}", t0.elapsed());
}

/// Key-prefix values (`Values::KeyPrefix`, MLA's `v_cache = k_cache[..., :d_v]`): a v_new, a `d_v` outside
/// `1..=d`, rotary, a v_descale, a head dim above 576 and an overflowing append are refused naming the argument
/// (each call has a `k_new` to append), and nothing is written; the same call without the fault appends.
#[test]
fn key_prefix_values_refusals_write_nothing() {
    let (d, d_v) = (24, 16);
    let q = t(&[2, 1, 4, 24], DType::BF16);
    let kn = t(&[2, 1, 2, d], DType::BF16);
    let vn = t(&[2, 1, 2, d_v], DType::BF16);
    let (cos, sin) = (t(&[8, 4], DType::F32), t(&[8, 4], DType::F32));
    // The fault a call adds to an otherwise valid key-prefix call that appends one row.
    #[derive(Clone, Copy)]
    enum Fault {
        None,
        VNew,
        Rotary,
        Overflow,
    }
    let run = |d_v: usize, fault: Fault| {
        let mut kc = t(&[2, 8, 2, d], DType::BF16);
        let before = kc.clone();
        let r = {
            let mut cache = KvCache::key_prefix_values(kc.view_mut(), d_v, CacheSeqlens::All(3));
            cache.k_new = Some(kn.view());
            match fault {
                Fault::None => {}
                Fault::VNew => cache.v_new = Some(vn.view()),
                Fault::Rotary => cache.rotary = Some(Rotary { cos: cos.view(), sin: sin.view(), interleaved: true }),
                Fault::Overflow => cache.cache_seqlens = CacheSeqlens::PerSeq(vec![3, 8]),
            }
            kvcache_forward(&q.view(), &mut cache, &AttnOptions::default()).map(|o| o.o.shape().to_vec())
        };
        assert_eq!(r.is_err(), kc == before, "written iff the call ran: {r:?}");
        r
    };
    assert_eq!(run(d_v, Fault::None).unwrap(), vec![2, 1, 4, d_v]);
    assert_eq!(run(d, Fault::None).unwrap(), vec![2, 1, 4, d], "d_v = d: the values are the keys");
    assert_eq!(arg_of(run(d_v, Fault::VNew)), "v_new");
    let err = run(d_v, Fault::VNew).unwrap_err().to_string();
    assert!(err.contains("key-prefix") && err.contains("[2, 1, 2, 16]"), "{err}");
    assert_eq!(arg_of(run(d + 1, Fault::None)), "v_cache");
    let err = run(d + 1, Fault::None).unwrap_err().to_string();
    assert!(err.contains("1..=24") && err.contains("d_v = 25"), "{err}");
    assert_eq!(arg_of(run(0, Fault::None)), "v_cache");
    assert_eq!(arg_of(run(d_v, Fault::Rotary)), "rotary_cos");
    assert!(matches!(run(d_v, Fault::Overflow), Err(Error::CacheOverflow { seq: 1, needed: 9, capacity: 8 })));
    let (o, shape) = (AttnOptions::default(), [2, 8, 2, d]);
    // Head dims: up to 576 on the KV-cache path.
    let (q577, kn577) = (t(&[1, 1, 1, 577], DType::BF16), t(&[1, 1, 1, 577], DType::BF16));
    let mut kc = t(&[1, 4, 1, 577], DType::BF16);
    let before = kc.clone();
    let mut cache = KvCache::key_prefix_values(kc.view_mut(), 512, CacheSeqlens::All(1));
    cache.k_new = Some(kn577.view());
    let err = kvcache_forward(&q577.view(), &mut cache, &o).unwrap_err();
    assert_eq!(err.arg(), Some("q"));
    assert!(err.to_string().contains("1..=576"), "{err}");
    drop(cache);
    assert_eq!(kc, before);
    // An e4m3 cache: the values are dequantized with k_descale; a v_descale is refused.
    let e = DType::E4M3;
    let mut kc = t(&shape, e);
    let before = kc.clone();
    let mut cache = KvCache::key_prefix_values(kc.view_mut(), d_v, CacheSeqlens::All(3));
    cache.k_new = Some(kn.view());
    let vd = o.clone().descale(None, None, Some(t(&[2, 2], DType::F32)));
    assert_eq!(arg_of(kvcache_forward(&q.view(), &mut cache, &vd)), "v_descale");
    drop(cache);
    assert_eq!(kc, before);
    // The values as a view of k_cache's first d_v columns; a d_v beyond the keys' is refused there too.
    let mut kc = t(&shape, DType::BF16);
    let want: Vec<f32> = kc.to_f32_vec().chunks(d).flat_map(|r| r[..d_v].to_vec()).collect();
    let cache = KvCache::key_prefix_values(kc.view_mut(), d_v, CacheSeqlens::All(3));
    assert!(cache.key_prefix());
    assert_eq!(cache.v_view().unwrap().shape(), &[2, 8, 2, d_v]);
    assert_eq!(cache.v_view().unwrap().to_f32_vec(), want);
    let cache = KvCache { v_cache: Values::KeyPrefix { d_v: d + 1 }, ..cache };
    assert_eq!(arg_of(cache.v_view()), "v_cache");
}

/// The CUDA KV-cache kernels refuse what only the CPU backends run on this path, before any device work (so this
/// runs without a GPU): key-prefix values (MLA) and head dims above 256, as `Unsupported` naming them; nothing is
/// written.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kvcache_refuses_key_prefix_values_and_wide_heads() {
    let unsupported = |r: flashattn::Result<flashattn::ForwardOutput>| match r {
        Err(Error::Unsupported { backend: "cuda", what }) => what,
        other => panic!("expected Unsupported on cuda, got {other:?}"),
    };
    let o = AttnOptions::default().causal();
    let (q, kn) = (t(&[2, 1, 8, 576], DType::BF16), t(&[2, 1, 1, 576], DType::BF16));
    let mut kc = t(&[2, 16, 1, 576], DType::BF16);
    let before = kc.clone();
    let mut cache = KvCache::key_prefix_values(kc.view_mut(), 512, CacheSeqlens::All(4));
    cache.k_new = Some(kn.view());
    let what = unsupported(flashattn::kvcache_forward_on(flashattn::Device::Cuda(0), &q.view(), &mut cache, &o));
    assert!(what.contains("key cache") && what.contains("(576, 512)"), "{what}");
    drop(cache);
    assert_eq!(kc, before);
    // d = d_v = 320 with a value cache of its own: the CPU runs it, the CUDA kernels stop at 256.
    let (q, kn) = (t(&[1, 1, 2, 320], DType::F16), t(&[1, 1, 1, 320], DType::F16));
    let (mut kc, mut vc) = (t(&[1, 8, 1, 320], DType::F16), t(&[1, 8, 1, 320], DType::F16));
    let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::All(2));
    cache.k_new = Some(kn.view());
    cache.v_new = Some(kn.view());
    let what = unsupported(flashattn::kvcache_forward_on(flashattn::Device::Cuda(0), &q.view(), &mut cache, &o));
    assert!(what.contains("head dim d = 320"), "{what}");
    assert!(flashattn::kvcache_forward_on(flashattn::Device::Cpu, &q.view(), &mut cache, &o).is_ok());
}
