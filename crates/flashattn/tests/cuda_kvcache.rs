//! GPU tests of the device-native KV-cache path (`kernels/kvcache.cu`): the spec's KV-cache sweep (paged
//! with pages of 1, 16 and 256 rows and unpaged; rotary none/half/full, interleaved or not; leftpad; batch
//! index; every mask, ALiBi and softcap; GQA/MQA folding; split-KV; appends that fill the cache exactly),
//! overflowing appends refused with the cache untouched (host and device forms), and the device form
//! captured in a CUDA graph and replayed with new data; refused split-KV calls followed by valid ones on the same
//! workspace (the split merge's arrival counters). Each result is checked against the f64 oracle
//! with the spec's rule, and the appended cache bit for bit against the host append.
//!
//! Without a usable GPU each test prints a visible SKIP line and passes (`FLASHATTN_REQUIRE_GPU=1`: fails).
#![cfg(feature = "cuda")]
#![allow(clippy::needless_range_loop)]

mod common;
use common::*;
use flashattn::cuda::{self, DeviceKvCache, DeviceRotary, DeviceTensorRef, KvWorkspace};
use flashattn::kvcache::prepare;
use flashattn::reference::{forward_f64, naive_forward};
use flashattn::tensor::CpuStorage;
use flashattn::{AttnOptions, CacheSeqlens, DType, Device, KvCache, Rotary, Tensor};
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Feat {
    Plain,
    Causal,
    Window,
    Alibi,
    Softcap,
}

#[derive(Debug, Clone, Copy)]
struct KvCase {
    dtype: DType,
    d: usize,
    h: usize,
    hk: usize,
    sq: usize,
    s_new: usize,
    cap: usize,
    page: Option<usize>,
    /// 0 none, 1 half (rot = d/2), 2 full (rot = d)
    rot: usize,
    interleaved: bool,
    leftpad: bool,
    batch_idx: bool,
    feat: Feat,
    /// Sequence 0 fills the cache exactly.
    exact_fill: bool,
    /// e4m3 caches (q and the new rows stay `dtype`) with random key/value descales in [0.5, 2].
    fp8: bool,
}

impl KvCase {
    /// A bf16 case without paging, rotary, left padding, batch index or score features, whose sequence 0 fills
    /// the cache exactly.
    fn bf16(d: usize, h: usize, hk: usize, sq: usize, s_new: usize, cap: usize) -> Self {
        KvCase {
            dtype: DType::BF16,
            d,
            h,
            hk,
            sq,
            s_new,
            cap,
            page: None,
            rot: 0,
            interleaved: false,
            leftpad: false,
            batch_idx: false,
            feat: Feat::Plain,
            exact_fill: true,
            fp8: false,
        }
    }
}

/// Host inputs of one case.
struct Setup {
    c: KvCase,
    b: usize,
    q: Tensor,
    kc0: Tensor,
    vc0: Tensor,
    kn: Tensor,
    vn: Tensor,
    seqlens: Vec<i32>,
    table: Option<Tensor>,
    leftpad: Option<Vec<i32>>,
    batch_idx: Option<Vec<i32>>,
    cos: Option<Tensor>,
    sin: Option<Tensor>,
    opts: AttnOptions,
}

fn setup(c: KvCase, r: &mut Rng64) -> Setup {
    let b = 3usize;
    let (h, hk, d) = (c.h, c.hk, c.d);
    let b_cache = if c.batch_idx { b + 2 } else { b };
    let (kshape, table) = match c.page {
        None => (vec![b_cache, c.cap, hk, d], None),
        Some(ps) => {
            let maxp = c.cap.div_ceil(ps);
            let npages = b * maxp + 3;
            let mut perm: Vec<i32> = (0..npages as i32).collect();
            for i in (1..perm.len()).rev() {
                perm.swap(i, r.gen_range(0..=i));
            }
            (vec![npages, ps, hk, d], Some(Tensor::from_i32(perm[..b * maxp].to_vec(), &[b, maxp]).unwrap()))
        }
    };
    // The capacity of a paged sequence is max_pages * page_size (>= cap).
    let capacity = match c.page {
        Some(ps) => c.cap.div_ceil(ps) * ps,
        None => c.cap,
    };
    let mut seqlens: Vec<i32> = (0..b).map(|_| r.gen_range(0..=(capacity - c.s_new)) as i32).collect();
    if c.exact_fill {
        seqlens[0] = (capacity - c.s_new) as i32;
    }
    let leftpad = c.leftpad.then(|| seqlens.iter().map(|&n| r.gen_range(0..=n.min(37))).collect::<Vec<i32>>());
    let batch_idx = c.batch_idx.then(|| {
        let mut v: Vec<i32> = (0..b_cache as i32).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, r.gen_range(0..=i));
        }
        v[..b].to_vec()
    });
    let half = [0, d / 4, d / 2][c.rot];
    let (cos, sin) = if half > 0 {
        let ro = capacity + c.sq + 4;
        let ang: Vec<f32> = (0..ro * half).map(|i| (i / half) as f32 * 0.013 * (1 + i % 5) as f32).collect();
        (
            Some(Tensor::from_f32(&ang.iter().map(|a| a.cos()).collect::<Vec<_>>(), &[ro, half], DType::F32).unwrap()),
            Some(Tensor::from_f32(&ang.iter().map(|a| a.sin()).collect::<Vec<_>>(), &[ro, half], DType::F32).unwrap()),
        )
    } else {
        (None, None)
    };
    let mut opts = AttnOptions::default();
    let mut qscale = 1.0;
    match c.feat {
        Feat::Plain => {}
        Feat::Causal => opts.causal = true,
        Feat::Window => opts.window = (r.gen_range(0..200) as i64, r.gen_range(0..3) as i64),
        Feat::Alibi => {
            let sl: Vec<f32> = (0..b * h).map(|_| r.gen::<f32>() * 0.3).collect();
            opts.alibi_slopes = Some(Tensor::from_f32(&sl, &[b, h], DType::F32).unwrap());
            opts.causal = true;
        }
        Feat::Softcap => {
            opts.softcap = 50.0;
            qscale = 8.0;
        }
    }
    let cache_dtype = if c.fp8 { DType::E4M3 } else { c.dtype };
    if c.fp8 {
        let mut ds = || {
            Tensor::from_f32(&(0..b * hk).map(|_| r.gen_range(0.5f32..=2.0)).collect::<Vec<_>>(), &[b, hk], DType::F32)
                .unwrap()
        };
        let (kd, vd) = (ds(), ds());
        opts = opts.descale(None, Some(kd), Some(vd));
    }
    Setup {
        c,
        b,
        q: randn_tensor(r, &[b, c.sq, h, d], c.dtype, qscale),
        kc0: randn_tensor(r, &kshape, cache_dtype, 1.0),
        vc0: randn_tensor(r, &kshape, cache_dtype, 1.0),
        kn: randn_tensor(r, &[b, c.s_new, hk, d], c.dtype, 1.0),
        vn: randn_tensor(r, &[b, c.s_new, hk, d], c.dtype, 1.0),
        seqlens,
        table,
        leftpad,
        batch_idx,
        cos,
        sin,
        opts,
    }
}

/// Runs the host API on `device` over copies of the cache: (result, k cache, v cache, plan from the host
/// append when `device` is the CPU).
fn run_host(
    s: &Setup,
    device: Device,
) -> (flashattn::Result<flashattn::ForwardOutput>, Tensor, Tensor, Option<flashattn::kvcache::KvPlan>) {
    let (mut kc, mut vc) = (s.kc0.clone(), s.vc0.clone());
    let (res, plan) = {
        let mut cache = KvCache::new(kc.view_mut(), vc.view_mut(), CacheSeqlens::PerSeq(s.seqlens.clone()));
        if s.c.s_new > 0 {
            cache.k_new = Some(s.kn.view());
            cache.v_new = Some(s.vn.view());
        }
        cache.block_table = s.table.clone();
        cache.cache_leftpad = s.leftpad.clone();
        cache.cache_batch_idx = s.batch_idx.clone();
        if let (Some(c), Some(sn)) = (&s.cos, &s.sin) {
            cache.rotary = Some(Rotary { cos: c.view(), sin: sn.view(), interleaved: s.c.interleaved });
        }
        match device {
            Device::Cpu => match prepare(&s.q.view(), &mut cache, &s.opts) {
                Ok(p) => (Ok(None), Some(p)),
                Err(e) => (Err(e), None),
            },
            dev => (flashattn::kvcache_forward_on(dev, &s.q.view(), &mut cache, &s.opts).map(Some), None),
        }
    };
    let res = res.and_then(|o| o.ok_or_else(|| flashattn::Error::Device("plan only".into())));
    (res, kc, vc, plan)
}

/// Checks o/lse against the oracle over the host-appended cache, and the device caches bit for bit.
fn verify(s: &Setup, o: &[f32], lse: &[f32], kc: &Tensor, vc: &Tensor) -> Result<(), String> {
    let (_, kc_ref, vc_ref, plan) = run_host(s, Device::Cpu);
    let plan = plan.ok_or("host prepare failed")?;
    if kc != &kc_ref {
        return Err("appended k cache differs from the host append".into());
    }
    if vc != &vc_ref {
        return Err("appended v cache differs from the host append".into());
    }
    let p = &plan.problem;
    let qv = plan.q_rotated.as_ref().map(|t| t.view()).unwrap_or_else(|| s.q.view());
    let reference = forward_f64(p, qv.data, kc_ref.view().data, vc_ref.view().data);
    let (base, _) = naive_forward(p, qv.data, kc_ref.view().data, vc_ref.view().data);
    let factor = if matches!(s.c.feat, Feat::Alibi | Feat::Softcap) { 3.0 } else { 2.0 };
    // e4m3 caches: the FP8 rule (its baseline rounds the probabilities to e4m3).
    let rule = if s.c.fp8 { DType::E4M3 } else { s.c.dtype };
    let vo = flashattn::accuracy::compare("o", o, &reference.o, &base.to_f32_vec(), rule, factor);
    let vl = flashattn::accuracy::compare_lse(lse, &reference.lse);
    if vo.pass && vl.pass {
        Ok(())
    } else {
        Err(format!("{vo}; {vl}"))
    }
}

fn sweep_cases() -> Vec<KvCase> {
    let mut out = Vec::new();
    let feats = [Feat::Plain, Feat::Causal, Feat::Window, Feat::Alibi, Feat::Softcap];
    let shapes = [(1usize, 1usize), (4, 4), (3, 0), (7, 2), (1, 0), (40, 40)];
    let heads = [(6usize, 2usize), (6, 1), (6, 6), (8, 2)];
    let dims = [64usize, 59, 128, 256, 96];
    let mut i = 0usize;
    for dtype in [DType::F16, DType::BF16] {
        for page in [None, Some(1usize), Some(16), Some(256)] {
            for rot in 0..3 {
                for interleaved in [false, true] {
                    if rot == 0 && interleaved {
                        continue;
                    }
                    i += 1;
                    let (mut sq, mut s_new) = shapes[i % shapes.len()];
                    if rot > 0 && s_new == 0 {
                        s_new = 3;
                        sq = sq.max(2);
                    }
                    let (h, hk) = heads[i % heads.len()];
                    let unpaged = page.is_none();
                    out.push(KvCase {
                        dtype,
                        d: dims[i % dims.len()],
                        h,
                        hk,
                        sq,
                        s_new,
                        cap: if i % 3 == 0 { 1100 } else { 300 },
                        page,
                        rot,
                        interleaved,
                        leftpad: unpaged && i % 2 == 1,
                        batch_idx: unpaged && i % 4 >= 2,
                        feat: feats[i % feats.len()],
                        exact_fill: i % 2 == 0,
                        fp8: false,
                    });
                }
            }
        }
    }
    out
}

/// The spec's KV-cache sweep through `kvcache_forward_on(Device::Cuda(0))` (device append and attention).
#[test]
fn kvcache_sweep_device() {
    if !gpu("kvcache_sweep_device") {
        return;
    }
    // Compile every 16-bit KV-cache variant up front, in parallel (else each new variant waits for NVRTC).
    let arch = cuda::device_arch(0).unwrap();
    let kv: Vec<_> = flashattn::cuda::compile::all_variants()
        .into_iter()
        .filter(|v| v.pass == cuda::Pass::KvCache && !v.kv_fp8)
        .collect();
    let t0 = std::time::Instant::now();
    cuda::precompile_variants(&[arch], &kv).unwrap();
    say(&format!("kv variants ready: {} in {:.1} s", kv.len(), t0.elapsed().as_secs_f64()));
    let stride = if sweep_level() == "quick" { 4 } else { 1 };
    run_device_cases("cuda kvcache sweep (device-native path)", seed(), stride, |c| c);
}

/// Runs every `stride`-th case of the KV sweep (after `map`) through `kvcache_forward_on(Device::Cuda(0))`, case
/// k with seed `base_seed + k`, checks each with [`verify`], and fails with every failing case listed.
fn run_device_cases(label: &str, base_seed: u64, stride: usize, map: impl Fn(KvCase) -> KvCase) {
    let mut tally = Outcome::default();
    for (k, c) in sweep_cases().into_iter().enumerate().step_by(stride) {
        let c = map(c);
        let sd = base_seed.wrapping_add(k as u64);
        let s = setup(c, &mut rng(sd));
        let (out, kc, vc, _) = run_host(&s, Device::Cuda(0));
        let res = out
            .map_err(|e| format!("error: {e}"))
            .and_then(|o| verify(&s, &o.o.to_f32_vec(), &o.lse.to_f32_vec(), &kc, &vc));
        tally.record(res.map_err(|e| format!("FAIL {c:?} seed {sd}: {e}")));
    }
    tally.report(label);
}

/// Decoding from e4m3 caches (`KV_FP8` kernels: 1-byte rows widened in shared memory, descales in the score
/// scale and on O) with 16-bit q and new rows quantized on append: half of the KV sweep's cases (every layout,
/// rotary form, feature, head dim including the element-wise-load 59 and 96) with e4m3 caches, checked
/// against the f64 oracle of the dequantized cache under the FP8 rule, and the appended bytes against the
/// host's quantization.
#[test]
fn kvcache_fp8_device() {
    if !gpu("kvcache_fp8_device") {
        return;
    }
    // The e4m3 kernels build for sm_89 and newer only (the variant's own rule).
    let arch = cuda::device_arch(0).unwrap();
    let fp8 =
        cuda::Variant { kv_fp8: true, ..flashattn::cuda::compile::kv_variant(128, true, false, false, false, true) };
    if !fp8.builds_for(&arch) {
        say(&format!("SKIP kvcache_fp8_device: {arch} has no e4m3 conversions (sm_89 or newer)"));
        return;
    }
    run_device_cases("cuda kvcache fp8 (e4m3 caches)", seed() ^ 0xf8, 2, |c| KvCase { fp8: true, ..c });
}

/// An append that would overflow is refused before anything is written: host form (typed error, cache
/// untouched) and device form (status word set, device cache untouched).
#[test]
fn kvcache_overflow_refused() {
    let Some(mut r) = gpu_rng("kvcache_overflow_refused") else { return };
    for page in [None, Some(16usize)] {
        let c = KvCase { page, rot: 1, feat: Feat::Causal, ..KvCase::bf16(64, 6, 2, 2, 2, 64) };
        let mut s = setup(c, &mut r);
        s.seqlens[2] = 63; // 63 + 2 > 64
        let (res, kc, vc, _) = run_host(&s, Device::Cuda(0));
        match res {
            Err(flashattn::Error::CacheOverflow { seq: 2, needed: 65, capacity: 64 }) => {}
            other => panic!("page {page:?}: expected CacheOverflow for sequence 2, got {:?}", other.map(|_| ())),
        }
        assert!(kc == s.kc0 && vc == s.vc0, "page {page:?}: the host cache was written");
        // Device form: the same call on device buffers sets the status word and writes nothing.
        let dev = DevCase::upload(&s);
        let ws = KvWorkspace::new(0, dev.plan(&s).workspace_bytes).unwrap();
        dev.run(&s, &ws, dev.stream.cu_stream() as *mut _).expect("shapes are valid");
        let st = ws.status().unwrap();
        assert_eq!(st & 1, 1, "page {page:?}: status {st}, expected the overflow bit");
        let (kc_d, vc_d) = dev.caches(&s);
        assert!(kc_d == s.kc0 && vc_d == s.vc0, "page {page:?}: the device cache was written");
        ws.clear_status().unwrap();
        assert_eq!(ws.status().unwrap(), 0);
    }
    say("cuda kvcache overflow: refused with the cache untouched (host error, device status), unpaged and paged");
}

/// Device buffers of one [`Setup`] (cudarc allocations on the crate's device 0).
struct DevCase {
    stream: std::sync::Arc<cuda::cudarc::driver::CudaStream>,
    q: cuda::cudarc::driver::CudaSlice<u16>,
    kc: cuda::cudarc::driver::CudaSlice<u16>,
    vc: cuda::cudarc::driver::CudaSlice<u16>,
    kn: cuda::cudarc::driver::CudaSlice<u16>,
    vn: cuda::cudarc::driver::CudaSlice<u16>,
    seqlens: cuda::cudarc::driver::CudaSlice<i32>,
    table: Option<cuda::cudarc::driver::CudaSlice<i32>>,
    cos: Option<cuda::cudarc::driver::CudaSlice<f32>>,
    sin: Option<cuda::cudarc::driver::CudaSlice<f32>>,
    o: cuda::cudarc::driver::CudaSlice<u16>,
    lse: cuda::cudarc::driver::CudaSlice<f32>,
}

fn bits16(t: &Tensor) -> Vec<u16> {
    match t.storage() {
        CpuStorage::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
        CpuStorage::F16(v) => v.iter().map(|x| x.to_bits()).collect(),
        _ => unreachable!("16-bit tensors only"),
    }
}

fn from_bits16(v: &[u16], shape: &[usize], dtype: DType) -> Tensor {
    let st = match dtype {
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| flashattn::bf16::from_bits(x)).collect()),
        _ => CpuStorage::F16(v.iter().map(|&x| flashattn::f16::from_bits(x)).collect()),
    };
    Tensor::from_storage(st, shape).unwrap()
}

impl DevCase {
    fn upload(s: &Setup) -> DevCase {
        use cuda::cudarc::driver::CudaContext;
        let ctx = CudaContext::new(0).unwrap();
        // One stream orders everything here; without this, cudarc would make each buffer access wait on
        // events recorded outside the graph capture (which invalidates the capture).
        // SAFETY: every buffer of this context is used on this one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().unwrap();
        let up16 = |t: &Tensor| stream.clone_htod(&bits16(t)).unwrap();
        let (b, c) = (s.b, s.c);
        DevCase {
            q: up16(&s.q),
            kc: up16(&s.kc0),
            vc: up16(&s.vc0),
            kn: up16(&s.kn),
            vn: up16(&s.vn),
            seqlens: stream.clone_htod(&s.seqlens).unwrap(),
            table: s.table.as_ref().map(|t| stream.clone_htod(&t.view().to_i32_vec().unwrap()).unwrap()),
            cos: s.cos.as_ref().map(|t| stream.clone_htod(&t.to_f32_vec()).unwrap()),
            sin: s.sin.as_ref().map(|t| stream.clone_htod(&t.to_f32_vec()).unwrap()),
            o: stream.alloc_zeros::<u16>(b * c.sq * c.h * c.d).unwrap(),
            lse: stream.alloc_zeros::<f32>(b * c.h * c.sq).unwrap(),
            stream,
        }
    }

    /// New values for every input (same shapes), for a graph replay.
    fn refill(&mut self, s: &Setup) {
        let st = &self.stream;
        st.memcpy_htod(&bits16(&s.q), &mut self.q).unwrap();
        st.memcpy_htod(&bits16(&s.kc0), &mut self.kc).unwrap();
        st.memcpy_htod(&bits16(&s.vc0), &mut self.vc).unwrap();
        st.memcpy_htod(&bits16(&s.kn), &mut self.kn).unwrap();
        st.memcpy_htod(&bits16(&s.vn), &mut self.vn).unwrap();
        st.memcpy_htod(&s.seqlens, &mut self.seqlens).unwrap();
        if let (Some(t), Some(d)) = (&s.table, &mut self.table) {
            st.memcpy_htod(&t.view().to_i32_vec().unwrap(), d).unwrap();
        }
        st.synchronize().unwrap();
    }

    fn refs(&self, s: &Setup) -> (DeviceTensorRef, DeviceKvCache, DeviceTensorRef, DeviceTensorRef) {
        use cuda::cudarc::driver::DevicePtr;
        let st = &self.stream;
        let (b, c) = (s.b, s.c);
        let dt = c.dtype;
        let p16 = |x: &cuda::cudarc::driver::CudaSlice<u16>| x.device_ptr(st).0;
        let t = |ptr: u64, dtype: DType, shape: &[usize]| DeviceTensorRef::contiguous(ptr, dtype, shape);
        let cshape = s.kc0.shape().to_vec();
        let cache = DeviceKvCache {
            k_cache: t(p16(&self.kc), dt, &cshape),
            v_cache: t(p16(&self.vc), dt, &cshape),
            k_new: (c.s_new > 0).then(|| t(p16(&self.kn), dt, &[b, c.s_new, c.hk, c.d])),
            v_new: (c.s_new > 0).then(|| t(p16(&self.vn), dt, &[b, c.s_new, c.hk, c.d])),
            cache_seqlens: t(self.seqlens.device_ptr(st).0, DType::I32, &[b]),
            block_table: self
                .table
                .as_ref()
                .map(|x| t(x.device_ptr(st).0, DType::I32, s.table.as_ref().unwrap().shape())),
            cache_batch_idx: None,
            cache_leftpad: None,
            rotary: match (&self.cos, &self.sin) {
                (Some(co), Some(si)) => {
                    let sh = s.cos.as_ref().unwrap().shape().to_vec();
                    Some(DeviceRotary {
                        cos: t(co.device_ptr(st).0, DType::F32, &sh),
                        sin: t(si.device_ptr(st).0, DType::F32, &sh),
                        interleaved: c.interleaved,
                    })
                }
                _ => None,
            },
            alibi_slopes: None,
            sink: None,
            k_descale: None,
            v_descale: None,
        };
        let q = t(p16(&self.q), dt, &[b, c.sq, c.h, c.d]);
        let o = t(p16(&self.o), dt, &[b, c.sq, c.h, c.d]);
        let lse = t(self.lse.device_ptr(st).0, DType::F32, &[b, c.h, c.sq]);
        (q, cache, o, lse)
    }

    fn plan(&self, s: &Setup) -> cuda::KvCallPlan {
        let (q, cache, o, lse) = self.refs(s);
        cuda::kvcache_plan(0, &q, &cache, &o, &lse, &s.opts).unwrap()
    }

    fn run(&self, s: &Setup, ws: &KvWorkspace, stream: *mut std::ffi::c_void) -> flashattn::Result<()> {
        let (q, cache, o, lse) = self.refs(s);
        // SAFETY: every buffer belongs to device 0 and outlives the synchronisation that follows each call.
        unsafe { cuda::kvcache_forward_raw(0, stream, &q, &cache, &o, &lse, ws.as_device(), &s.opts, false) }
    }

    fn caches(&self, s: &Setup) -> (Tensor, Tensor) {
        let k: Vec<u16> = self.stream.clone_dtoh(&self.kc).unwrap();
        let v: Vec<u16> = self.stream.clone_dtoh(&self.vc).unwrap();
        self.stream.synchronize().unwrap();
        (from_bits16(&k, s.kc0.shape(), s.c.dtype), from_bits16(&v, s.kc0.shape(), s.c.dtype))
    }

    fn outputs(&self, s: &Setup) -> (Vec<f32>, Vec<f32>) {
        let o: Vec<u16> = self.stream.clone_dtoh(&self.o).unwrap();
        let lse: Vec<f32> = self.stream.clone_dtoh(&self.lse).unwrap();
        self.stream.synchronize().unwrap();
        let c = s.c;
        (from_bits16(&o, &[s.b, c.sq, c.h, c.d], c.dtype).to_f32_vec(), lse)
    }
}

/// The device form captured in a CUDA graph (global capture mode: any allocation or synchronisation inside
/// the call would break the capture), then replayed twice with new inputs written into the same buffers;
/// each replay is checked against the oracle and the host append.
#[test]
fn kvcache_cuda_graph_replay() {
    if !gpu("kvcache_cuda_graph_replay") {
        return;
    }
    use cuda::cudarc::driver::sys;
    let base = seed();
    let c = KvCase { page: Some(16), rot: 1, feat: Feat::Causal, ..KvCase::bf16(128, 32, 8, 1, 1, 4096) };
    let s0 = setup(c, &mut rng(base));
    let mut dev = DevCase::upload(&s0);
    let plan = dev.plan(&s0);
    let (ws, splits) = (KvWorkspace::new(0, plan.workspace_bytes).unwrap(), plan.splits);
    // Warm-up call outside the capture: loads the kernel module.
    dev.run(&s0, &ws, dev.stream.cu_stream() as *mut _).unwrap();
    dev.stream.synchronize().unwrap();
    assert_eq!(ws.status().unwrap(), 0);
    dev.refill(&s0);
    // Capture (outputs are not poisoned inside the graph: poisoning is a test hook of eager calls; the
    // outputs are poisoned by hand before each replay instead).
    cuda::set_poison_outputs(false);
    let st = dev.stream.cu_stream();
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    // SAFETY: a valid stream of the current context; graph handles are written by the driver.
    unsafe {
        assert_eq!(
            sys::cuStreamBeginCapture_v2(st, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL),
            sys::CUresult::CUDA_SUCCESS
        );
        let r = dev.run(&s0, &ws, st as *mut _);
        assert_eq!(sys::cuStreamEndCapture(st, &mut graph), sys::CUresult::CUDA_SUCCESS);
        r.expect("the call inside the capture");
        assert_eq!(sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0), sys::CUresult::CUDA_SUCCESS);
    }
    cuda::set_poison_outputs(true);
    for round in 0..3u64 {
        let s = if round == 0 { setup(c, &mut rng(base)) } else { setup(c, &mut rng(base.wrapping_add(round * 7919))) };
        dev.refill(&s);
        // SAFETY: as above; the graph's buffers are all alive.
        unsafe {
            use cuda::cudarc::driver::{result::memset_d8_async, DevicePtr};
            memset_d8_async(dev.o.device_ptr(&dev.stream).0, 0xFF, dev.o.len() * 2, st).unwrap();
            memset_d8_async(dev.lse.device_ptr(&dev.stream).0, 0xFF, dev.lse.len() * 4, st).unwrap();
            assert_eq!(sys::cuGraphLaunch(exec, st), sys::CUresult::CUDA_SUCCESS);
        }
        dev.stream.synchronize().unwrap();
        assert_eq!(ws.status().unwrap(), 0, "round {round}: status");
        let (o, lse) = dev.outputs(&s);
        let (kc, vc) = dev.caches(&s);
        verify(&s, &o, &lse, &kc, &vc).unwrap_or_else(|e| panic!("graph replay {round}: {e}"));
    }
    // SAFETY: created above, destroyed once.
    unsafe {
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
    }
    say(&format!(
        "cuda kvcache graph: captured (global mode) and replayed 3x with new data, all match the oracle ({splits} key splits, paged 16, rotary, b 3, h 32/8, cache 4096)"
    ));
}

/// Split-KV calls are merged by the last split of each query tile to finish, which counts the arrivals in the
/// workspace. A refused call, whether the append refuses it (every split sees the status word) or the attention
/// kernel itself while other tiles run (no append: `kv_attn` checks the cache lengths), must leave those counters
/// at zero: the next calls on the same workspace are checked against the oracle, eight rounds each. Whether a
/// CTA sees another's refusal depends on timing: run it under compute-sanitizer racecheck too (its slower,
/// serialised CTAs made an early form of the kernel fail here: a refused sequence's CTAs arrived only when
/// they had seen the status word already set).
#[test]
fn kvcache_split_counters_after_refusal() {
    let Some(mut r) = gpu_rng("kvcache_split_counters_after_refusal") else { return };
    let mut splits_seen = Vec::new();
    for s_new in [2usize, 0] {
        let c = KvCase::bf16(128, 8, 2, 1, s_new, 2048);
        let s = setup(c, &mut r);
        let mut dev = DevCase::upload(&s);
        let plan = dev.plan(&s);
        let (ws, splits) = (KvWorkspace::new(0, plan.workspace_bytes).unwrap(), plan.splits);
        assert!(splits > 1, "s_new {s_new}: the case must split the keys, got {splits} split");
        splits_seen.push(splits);
        // Sequence 1 past its capacity: an overflowing append, or (no append) a cache length out of range.
        let mut bad = s.seqlens.clone();
        bad[1] = (c.cap - s_new + 1) as i32;
        for round in 0..8 {
            dev.stream.memcpy_htod(&bad, &mut dev.seqlens).unwrap();
            dev.run(&s, &ws, dev.stream.cu_stream() as *mut _).expect("shapes are valid");
            let st = ws.status().unwrap();
            assert_eq!(st & 1, 1, "s_new {s_new} round {round}: status {st}, expected the refusal bit");
            ws.clear_status().unwrap();
            dev.refill(&s);
            dev.run(&s, &ws, dev.stream.cu_stream() as *mut _).expect("shapes are valid");
            assert_eq!(ws.status().unwrap(), 0, "s_new {s_new} round {round}: status after the valid call");
            let (o, lse) = dev.outputs(&s);
            let (kc, vc) = dev.caches(&s);
            verify(&s, &o, &lse, &kc, &vc).unwrap_or_else(|e| panic!("s_new {s_new} round {round}: {e}"));
            dev.refill(&s);
        }
    }
    say(&format!(
        "cuda kvcache split counters: refused calls (by the append, by the attention kernel) then valid ones, 8 rounds each, all match the oracle ({splits_seen:?} key splits)"
    ));
}

/// The KV-cache kernels compile with NVRTC for sm_80 and sm_90a (no GPU needed) without register spills
/// and without static shared memory (the loader raises every kernel's dynamic shared-memory limit to the
/// device maximum, which a kernel with static shared memory would exceed).
#[test]
fn kv_kernels_compile_without_spills() {
    if !flashattn::cuda::compile::nvrtc_present() {
        say("SKIP kv_kernels_compile_without_spills: libnvrtc not found on the loader path");
        return;
    }
    use flashattn::cuda::compile::kv_variant;
    // Every padded head dim (swizzled rows for multiples of 64, padded rows otherwise), with and without a
    // mask, 16-byte aligned; plus the all-features and element-wise-load forms at d 128.
    let mut vs: Vec<_> =
        (1..=8).flat_map(|k| [false, true].map(|mask| kv_variant(32 * k, true, mask, false, false, true))).collect();
    vs.push(kv_variant(256, false, true, false, false, true));
    vs.push(kv_variant(128, false, true, true, true, false));
    // The e4m3-cache forms (sm_90a only: they need sm_89 or newer).
    let fp8: Vec<_> = vs.iter().map(|&v| flashattn::cuda::Variant { kv_fp8: true, ..v }).collect();
    vs.extend(fp8);
    let archs = ["sm_80".to_string(), "sm_90a".to_string()];
    let reps = cuda::compile_reports(&archs, &vs).unwrap_or_else(|e| panic!("{e}"));
    for r in &reps {
        assert!(r.usage.len() >= 3, "no ptxas report for {r}");
        for u in &r.usage {
            assert!(!u.spills(), "{r}: {} spills", u.kernel);
            assert_eq!(u.smem, 0, "{r}: {} uses static shared memory", u.kernel);
        }
    }
    say(&format!("nvrtc: {} KV-cache variant compiles, no spills, no static shared memory", reps.len()));
}
