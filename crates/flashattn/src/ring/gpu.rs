//! Ring attention with the ranks simulated by streams of one GPU (feature `cuda`): each rank has its own
//! stream, shards and accumulators in device memory; per chunk pair it runs the CUDA flash kernels on strided
//! device views ([`crate::cuda::forward_raw`]/[`crate::cuda::backward_raw`], the local mask from
//! [`PairMask`]) and a small merge (forward) or accumulate (backward) kernel. What this checks: the device
//! kernels on chunk pairs (truncated keys, shifted diagonals, global `o`/`lse` in the backward) and the
//! device merge, against the single-GPU result. What it does not: K/V do not move (a rank reads the source
//! shard where it lies; the hop between ranks is an event wait for the dK/dV accumulators), and timings are
//! not scaling figures (every rank shares one GPU).
//!
//! Partial outputs come out of the forward kernel in the input dtype and are merged into `f32`
//! accumulators; partial gradients likewise (as FlashAttention-based ring implementations do).

use super::host::{local_opts, ring_plan, ring_plan_backward, RankStats, RingBackward, RingForward};
use super::schedule::{LocalPair, PairWork, RingSchedule};
use crate::api::{BackwardInputs, ForwardOutput, Gradients};
use crate::cuda::bwd::Softmax;
use crate::cuda::runtime::{self, dev_err};
use crate::cuda::{backward_raw_of, forward_raw, BackwardTensors, DeviceTensorRef, ForwardTensors};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::options::AttnOptions;
use crate::tensor::Tensor;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::time::Instant;

const KERNELS: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float load_h(const unsigned short* p, long long i, int is_bf16) {
    unsigned short x = p[i];
    if (is_bf16) return __uint_as_float(((unsigned int)x) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
// One block per row (bi, i, hh) of a query chunk: o_acc [b, cq, h, d] f32, lse [b, h, cq] f32.
extern "C" __global__ void ring_merge(float* o_acc, float* lse_acc, const unsigned short* o_part,
                                      const float* lse_part, int cq, int h, int d, int is_bf16) {
    long long row = blockIdx.x;
    int hh = (int)(row % h);
    long long t = row / h;
    int i = (int)(t % cq);
    long long bi = t / cq;
    long long li = (bi * h + hh) * cq + i;
    float la = lse_acc[li], lp = lse_part[li];
    __syncthreads();
    if (lp == NEG_INF) return;
    float wa = 0.f, wb = 1.f, lse = lp;
    if (la != NEG_INF) {
        float m = fmaxf(la, lp);
        float ea = expf(la - m), eb = expf(lp - m), s = ea + eb;
        wa = ea / s;
        wb = eb / s;
        lse = m + logf(s);
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        long long e = row * d + c;
        o_acc[e] = wa * o_acc[e] + wb * load_h(o_part, e, is_bf16);
    }
    if (threadIdx.x == 0) lse_acc[li] = lse;
}
// acc[bi * acc_bs + e] += part[bi * part_bs + e] for e < n, bi < b.
extern "C" __global__ void ring_add(float* acc, long long acc_bs, const unsigned short* part, long long part_bs,
                                    long long n, int b, int is_bf16) {
    long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= n * b) return;
    long long bi = idx / n, e = idx % n;
    acc[bi * acc_bs + e] += load_h(part, bi * part_bs + e, is_bf16);
}
"#;

fn d_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| dev_err(what, e)
}

/// Each shard's raw bits in device memory, copied on `stream`.
fn upload_shards(stream: &std::sync::Arc<CudaStream>, shards: &[Tensor]) -> Result<Vec<CudaSlice<u16>>> {
    shards.iter().map(|t| stream.clone_htod(&bits(t)).map_err(d_err("upload"))).collect()
}

/// The raw bits of an f16/bf16 tensor (row-major).
fn bits(t: &Tensor) -> Vec<u16> {
    let x = t.to_f32_vec();
    match t.dtype() {
        DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect(),
        _ => x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect(),
    }
}

fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

struct Kernels {
    merge: CudaFunction,
    add: CudaFunction,
}

/// The merge/accumulate kernels of each device, compiled once per process.
static LOADED: std::sync::Mutex<Vec<(usize, std::sync::Arc<Kernels>)>> = std::sync::Mutex::new(Vec::new());

fn kernels(n: usize, gpu: &runtime::Gpu) -> Result<std::sync::Arc<Kernels>> {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, k)) = loaded.iter().find(|(d, _)| *d == n) {
        return Ok(k.clone());
    }
    let k = std::sync::Arc::new(compile_kernels(gpu)?);
    loaded.push((n, k.clone()));
    Ok(k)
}

fn compile_kernels(gpu: &runtime::Gpu) -> Result<Kernels> {
    let ptx = cudarc::nvrtc::compile_ptx(KERNELS).map_err(|e| dev_err("compiling the ring kernels", e))?;
    let m = gpu.ctx.load_module(ptx).map_err(d_err("loading the ring kernels"))?;
    Ok(Kernels {
        merge: m.load_function("ring_merge").map_err(d_err("ring_merge"))?,
        add: m.load_function("ring_add").map_err(d_err("ring_add"))?,
    })
}

#[allow(clippy::too_many_arguments)]
/// `[b, rows, heads, d]` view of rows `start..start + rows` of a `[b, len, heads, d]` contiguous buffer.
fn view(
    base: u64,
    dtype: DType,
    len: usize,
    start: usize,
    rows: usize,
    heads: usize,
    d: usize,
    b: usize,
) -> DeviceTensorRef {
    let e = dtype.size() as u64;
    DeviceTensorRef {
        ptr: base + (start * heads * d) as u64 * e,
        dtype,
        shape: vec![b, rows, heads, d],
        strides: vec![len * heads * d, heads * d, d, 1],
    }
}

/// Where one pair of a rank's work at a step lies in the shards: query rows `q0..q0 + cq` (query chunk slot `qi`)
/// of the rank's `lq` rows; key rows `k0..k0 + nk` of the `lk` rows of rank `src`'s key/value shard.
struct PairRows {
    src: usize,
    lq: usize,
    lk: usize,
    qi: usize,
    q0: usize,
    cq: usize,
    k0: usize,
    nk: usize,
}

/// The pairs rank `r` computes at step `step` ([`RingSchedule::pairs`]), each with its [`PairRows`].
fn pair_rows(sched: &RingSchedule, r: usize, step: usize) -> Result<Vec<(PairWork, PairRows)>> {
    let src = sched.source(r, step);
    let (lq, lk) = (sched.q.rank_len(r), sched.k.rank_len(src));
    let rows = |at: LocalPair| PairRows {
        src,
        lq,
        lk,
        qi: at.q_slot,
        q0: at.q.start,
        cq: at.q.len(),
        k0: at.k.start,
        nk: at.k.len(),
    };
    Ok(sched.pairs(r, step)?.into_iter().map(|(w, at)| (w, rows(at))).collect())
}

/// Per-stream timing of a simulated ring: an event on every stream at the start; at the end each rank's
/// compute seconds (its stream's events) and wait seconds (the wall time not spent computing).
struct RankClock {
    starts: Vec<cudarc::driver::CudaEvent>,
    t0: Instant,
}

impl RankClock {
    fn start<S: std::ops::Deref<Target = CudaStream>>(streams: &[S]) -> Result<Self> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let starts = streams.iter().map(|s| s.record_event(timing).map_err(d_err("event"))).collect::<Result<_>>()?;
        Ok(RankClock { starts, t0: Instant::now() })
    }

    /// Waits for every stream, then fills `stats[r].compute_s` and `wait_s`.
    fn stop<S: std::ops::Deref<Target = CudaStream>>(self, streams: &[S], stats: &mut [RankStats]) -> Result<()> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let ends =
            streams.iter().map(|s| s.record_event(timing).map_err(d_err("event"))).collect::<Result<Vec<_>>>()?;
        for s in streams {
            s.synchronize().map_err(d_err("sync"))?;
        }
        let wall = self.t0.elapsed().as_secs_f64();
        for (r, st) in stats.iter_mut().enumerate() {
            st.compute_s = self.starts[r].elapsed_ms(&ends[r]).map_err(d_err("event time"))? as f64 / 1e3;
            st.wait_s = (wall - st.compute_s).max(0.0);
        }
        Ok(())
    }
}

fn half_only(dtype: DType) -> Result<()> {
    match dtype {
        DType::F16 | DType::BF16 => Ok(()),
        other => Err(crate::cuda::call::unsupported_dtype(other)),
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_add(
    k: &Kernels,
    s: &CudaStream,
    acc: u64,
    acc_bs: usize,
    part: u64,
    part_bs: usize,
    n: usize,
    b: usize,
    is_bf16: i32,
) -> Result<()> {
    let total = n * b;
    if total == 0 {
        return Ok(());
    }
    let (acc_bs, part_bs, n, bb) = (acc_bs as i64, part_bs as i64, n as i64, b as i32);
    let cfg =
        LaunchConfig { grid_dim: (total.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = s.launch_builder(&k.add);
    l.arg(&acc).arg(&acc_bs).arg(&part).arg(&part_bs).arg(&n).arg(&bb).arg(&is_bf16);
    // SAFETY: the pointers cover `b` blocks of `n` elements at the given strides (allocated above).
    unsafe { l.launch(cfg) }.map_err(d_err("launching ring_add"))?;
    Ok(())
}

/// Ring attention forward on CUDA device `n` with `ranks` ranks simulated by streams (see the module doc).
/// Same inputs, options and result as [`super::ring_forward`]; f16/bf16 only.
pub fn ring_forward_cuda(
    n: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttnOptions,
    ranks: usize,
) -> Result<RingForward> {
    let (p, sched) = ring_plan(q, k, v, opts, ranks, |p| half_only(p.dtype))?;
    let (b, h, hk, d, dt) = (p.batch, p.h, p.hk, p.d, p.dtype);
    let (qs, ks, vs) = (sched.q.shard(q, 1)?, sched.k.shard(k, 1)?, sched.k.shard(v, 1)?);
    let gpu = runtime::gpu(n)?;
    gpu.run("the GPU ring forward", || {
        let kern = kernels(n, &gpu)?;
        let main = &gpu.stream;
        let (qd, kd, vd) = (upload_shards(main, &qs)?, upload_shards(main, &ks)?, upload_shards(main, &vs)?);
        let streams =
            (0..ranks).map(|_| gpu.ctx.new_stream().map_err(d_err("new stream"))).collect::<Result<Vec<_>>>()?;
        let max_cq = (0..2 * ranks).map(|c| sched.q.chunk(c).len()).max().unwrap_or(0).max(1);
        let mut acc = Vec::new(); // per rank, per chunk: (o f32, lse f32)
        let mut scratch = Vec::new();
        for r in 0..ranks {
            let mut per = Vec::new();
            for c in sched.q.rank_rows(r) {
                let o = main.alloc_zeros::<f32>((b * c.len() * h * d).max(1)).map_err(d_err("alloc"))?;
                let l = main.clone_htod(&vec![f32::NEG_INFINITY; (b * h * c.len()).max(1)]).map_err(d_err("upload"))?;
                per.push((o, l));
            }
            acc.push(per);
            let op = main.alloc_zeros::<u16>(b * max_cq * h * d).map_err(d_err("alloc"))?;
            let lp = main.alloc_zeros::<f32>(b * h * max_cq).map_err(d_err("alloc"))?;
            scratch.push((op, lp));
        }
        main.synchronize().map_err(d_err("sync"))?;
        let (scale, softcap) = (p.scale, p.softcap);
        let is_bf16 = i32::from(dt == DType::BF16);
        let clock = RankClock::start(&streams)?;
        let mut stats: Vec<RankStats> = (0..ranks).map(RankStats::new).collect();
        for step in 0..ranks {
            for (r, s) in streams.iter().enumerate() {
                for (w, PairRows { src, lq, lk, qi, q0, cq, k0, nk }) in pair_rows(&sched, r, step)? {
                    let ck = sched.k.chunk(w.kv_chunk).len();
                    let qv = view(ptr(&qd[r], s), dt, lq, q0, cq, h, d, b);
                    let kv = view(ptr(&kd[src], s), dt, lk, k0, nk, hk, d, b);
                    let vv = view(ptr(&vd[src], s), dt, lk, k0, nk, hk, d, b);
                    let ov = DeviceTensorRef::contiguous(ptr(&scratch[r].0, s), dt, &[b, cq, h, d]);
                    let lv = DeviceTensorRef::contiguous(ptr(&scratch[r].1, s), DType::F32, &[b, h, cq]);
                    let t = ForwardTensors { q: &qv, k: &kv, v: &vv, o: &ov, lse: &lv };
                    // SAFETY: every view lies inside a buffer allocated above for its shape; one stream per rank
                    // orders the scratch reuse.
                    unsafe { forward_raw(n, s.cu_stream() as _, t, &local_opts(scale, softcap, w.mask))? };
                    let (oa, la) = (ptr(&acc[r][qi].0, s), ptr(&acc[r][qi].1, s));
                    let (op, lp) = (ov.ptr, lv.ptr);
                    let (cq_i, h_i, d_i) = (cq as i32, h as i32, d as i32);
                    let rows = (b * cq * h) as u32;
                    if rows > 0 {
                        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
                        let mut l = s.launch_builder(&kern.merge);
                        l.arg(&oa).arg(&la).arg(&op).arg(&lp).arg(&cq_i).arg(&h_i).arg(&d_i).arg(&is_bf16);
                        // SAFETY: the accumulators and the scratch hold `rows` rows of `d` (and `rows` lse).
                        unsafe { l.launch(cfg) }.map_err(d_err("launching ring_merge"))?;
                    }
                    stats[r].pairs += 1;
                    stats[r].visible += w.mask.visible(cq, ck);
                }
            }
        }
        clock.stop(&streams, &mut stats)?;
        // Assemble each rank's shard, then the sequence.
        let mut o_sh = Vec::new();
        let mut l_sh = Vec::new();
        for (r, per) in acc.iter().enumerate() {
            let lq = sched.q.rank_len(r);
            let mut o = vec![f32::NAN; b * lq * h * d];
            let mut l = vec![f32::NAN; b * h * lq];
            let mut q0 = 0;
            for (c, (oa, la)) in sched.q.rank_rows(r).iter().zip(per) {
                let cq = c.len();
                let (ho, hl) =
                    (main.clone_dtoh(oa).map_err(d_err("download"))?, main.clone_dtoh(la).map_err(d_err("download"))?);
                for bi in 0..b {
                    for i in 0..cq {
                        let src = (bi * cq + i) * h * d;
                        let dst = (bi * lq + q0 + i) * h * d;
                        o[dst..dst + h * d].copy_from_slice(&ho[src..src + h * d]);
                        for hh in 0..h {
                            l[(bi * h + hh) * lq + q0 + i] = hl[(bi * h + hh) * cq + i];
                        }
                    }
                }
                q0 += cq;
            }
            o_sh.push(Tensor::from_f32(&o, &[b, lq, h, d], dt)?);
            l_sh.push(Tensor::from_f32(&l, &[b, h, lq], DType::F32)?);
        }
        let out = ForwardOutput { o: sched.q.unshard(&o_sh, 1)?, lse: sched.q.unshard(&l_sh, 2)? };
        Ok(RingForward { out, stats })
    })
}

/// Ring attention backward on CUDA device `n` with `ranks` ranks simulated by streams. Same inputs and
/// result as [`super::ring_backward`]; f16/bf16 only.
pub fn ring_backward_cuda(
    n: usize,
    x: &BackwardInputs<&Tensor>,
    opts: &AttnOptions,
    ranks: usize,
) -> Result<RingBackward> {
    let (p, sched, shards) = ring_plan_backward(x, opts, ranks, |p| half_only(p.dtype))?;
    let (b, h, hk, d, dt) = (p.batch, p.h, p.hk, p.d, p.dtype);
    let gpu = runtime::gpu(n)?;
    gpu.run("the GPU ring backward", || {
        let kern = kernels(n, &gpu)?;
        let main = &gpu.stream;
        let up = |t: &[Tensor]| upload_shards(main, t);
        let (qd, kd, vd, od, gd) = (up(&shards.q)?, up(&shards.k)?, up(&shards.v)?, up(&shards.o)?, up(&shards.dout)?);
        // lse per query chunk, [b, h, cq], uploaded once.
        let mut lse_dev: Vec<Vec<CudaSlice<f32>>> = Vec::new();
        for (r, lsh) in shards.lse.iter().enumerate() {
            let lq = sched.q.rank_len(r);
            let lf = lsh.to_f32_vec();
            let mut per = Vec::new();
            let mut q0 = 0;
            for c in sched.q.rank_rows(r) {
                let cq = c.len();
                let mut x = vec![0f32; b * h * cq];
                for bh in 0..b * h {
                    x[bh * cq..(bh + 1) * cq].copy_from_slice(&lf[bh * lq + q0..bh * lq + q0 + cq]);
                }
                per.push(main.clone_htod(&x).map_err(d_err("upload"))?);
                q0 += cq;
            }
            lse_dev.push(per);
        }
        let streams =
            (0..ranks).map(|_| gpu.ctx.new_stream().map_err(d_err("new stream"))).collect::<Result<Vec<_>>>()?;
        let max_cq = (0..2 * ranks).map(|c| sched.q.chunk(c).len()).max().unwrap_or(0).max(1);
        let max_ck = (0..2 * ranks).map(|c| sched.k.chunk(c).len()).max().unwrap_or(0).max(1);
        let mut dq_acc = Vec::new();
        let mut dkv_acc = Vec::new();
        let mut scratch = Vec::new();
        for r in 0..ranks {
            let per = sched
                .q
                .rank_rows(r)
                .iter()
                .map(|c| main.alloc_zeros::<f32>((b * c.len() * h * d).max(1)).map_err(d_err("alloc")))
                .collect::<Result<Vec<_>>>()?;
            dq_acc.push(per);
            let lk = sched.k.rank_len(r);
            let z = || main.alloc_zeros::<f32>((b * lk * hk * d).max(1)).map_err(d_err("alloc"));
            dkv_acc.push((z()?, z()?));
            let dqp = main.alloc_zeros::<u16>(b * max_cq * h * d).map_err(d_err("alloc"))?;
            let dkp = main.alloc_zeros::<u16>(b * max_ck * hk * d).map_err(d_err("alloc"))?;
            let dvp = main.alloc_zeros::<u16>(b * max_ck * hk * d).map_err(d_err("alloc"))?;
            scratch.push((dqp, dkp, dvp));
        }
        main.synchronize().map_err(d_err("sync"))?;
        let (scale, softcap) = (p.scale, p.softcap);
        let is_bf16 = i32::from(dt == DType::BF16);
        let clock = RankClock::start(&streams)?;
        let mut stats: Vec<RankStats> = (0..ranks).map(RankStats::new).collect();
        let mut step_done: Vec<cudarc::driver::CudaEvent> = Vec::new();
        for step in 0..ranks {
            // The dK/dV hop: rank r continues the accumulation rank r-1 did on this shard last step.
            if step > 0 {
                for (r, s) in streams.iter().enumerate() {
                    s.wait(&step_done[(r + ranks - 1) % ranks]).map_err(d_err("stream wait"))?;
                }
            }
            for (r, s) in streams.iter().enumerate() {
                for (w, PairRows { src, lq, lk, qi, q0, cq, k0, nk }) in pair_rows(&sched, r, step)? {
                    stats[r].pairs += 1;
                    stats[r].visible += w.mask.visible(cq, sched.k.chunk(w.kv_chunk).len());
                    // lse and D belong to the whole row: the backward takes no one-key shortcut on this part.
                    let qv = view(ptr(&qd[r], s), dt, lq, q0, cq, h, d, b);
                    let ov = view(ptr(&od[r], s), dt, lq, q0, cq, h, d, b);
                    let gv = view(ptr(&gd[r], s), dt, lq, q0, cq, h, d, b);
                    let kv = view(ptr(&kd[src], s), dt, lk, k0, nk, hk, d, b);
                    let vv = view(ptr(&vd[src], s), dt, lk, k0, nk, hk, d, b);
                    let lv = DeviceTensorRef::contiguous(ptr(&lse_dev[r][qi], s), DType::F32, &[b, h, cq]);
                    let dqv = DeviceTensorRef::contiguous(ptr(&scratch[r].0, s), dt, &[b, cq, h, d]);
                    let dkv = DeviceTensorRef::contiguous(ptr(&scratch[r].1, s), dt, &[b, nk, hk, d]);
                    let dvv = DeviceTensorRef::contiguous(ptr(&scratch[r].2, s), dt, &[b, nk, hk, d]);
                    let fwd = ForwardTensors { q: &qv, k: &kv, v: &vv, o: &ov, lse: &lv };
                    let t = BackwardTensors { fwd, dout: &gv, dq: &dqv, dk: &dkv, dv: &dvv, dsink: None };
                    // SAFETY: as in the forward.
                    unsafe {
                        backward_raw_of(n, s.cu_stream() as _, t, &local_opts(scale, softcap, w.mask), Softmax::Part)?
                    };
                    let n_dq = cq * h * d;
                    launch_add(&kern, s, ptr(&dq_acc[r][qi], s), n_dq, dqv.ptr, n_dq, n_dq, b, is_bf16)?;
                    let off = (k0 * hk * d * DType::F32.size()) as u64;
                    let (dka, dva) = (ptr(&dkv_acc[src].0, s) + off, ptr(&dkv_acc[src].1, s) + off);
                    let n_kv = nk * hk * d;
                    launch_add(&kern, s, dka, lk * hk * d, dkv.ptr, n_kv, n_kv, b, is_bf16)?;
                    launch_add(&kern, s, dva, lk * hk * d, dvv.ptr, n_kv, n_kv, b, is_bf16)?;
                }
            }
            step_done =
                streams.iter().map(|s| s.record_event(None).map_err(d_err("event"))).collect::<Result<Vec<_>>>()?;
        }
        clock.stop(&streams, &mut stats)?;
        let (mut dq_sh, mut dk_sh, mut dv_sh) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..ranks {
            let lq = sched.q.rank_len(r);
            let mut dq = vec![f32::NAN; b * lq * h * d];
            let mut q0 = 0;
            for (c, acc) in sched.q.rank_rows(r).iter().zip(&dq_acc[r]) {
                let cq = c.len();
                let host = main.clone_dtoh(acc).map_err(d_err("download"))?;
                for bi in 0..b {
                    let dst = (bi * lq + q0) * h * d;
                    dq[dst..dst + cq * h * d].copy_from_slice(&host[bi * cq * h * d..(bi + 1) * cq * h * d]);
                }
                q0 += cq;
            }
            dq_sh.push(Tensor::from_f32(&dq, shards.q[r].shape(), dt)?);
            let lk = sched.k.rank_len(r);
            let n_el = b * lk * hk * d;
            let dk = main.clone_dtoh(&dkv_acc[r].0).map_err(d_err("download"))?;
            let dv = main.clone_dtoh(&dkv_acc[r].1).map_err(d_err("download"))?;
            dk_sh.push(Tensor::from_f32(&dk[..n_el], shards.k[r].shape(), dt)?);
            dv_sh.push(Tensor::from_f32(&dv[..n_el], shards.v[r].shape(), dt)?);
        }
        let grads = Gradients {
            dq: sched.q.unshard(&dq_sh, 1)?,
            dk: sched.k.unshard(&dk_sh, 1)?,
            dv: sched.k.unshard(&dv_sh, 1)?,
            dsink: None,
        };
        Ok(RingBackward { grads, stats })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merge and accumulate kernels compile with NVRTC (no GPU needed; skipped without libnvrtc).
    #[test]
    fn ring_kernels_compile() {
        // SAFETY: only tries to open the library.
        let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false);
        if !present {
            eprintln!("SKIP ring_kernels_compile: libnvrtc not found");
            return;
        }
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS).expect("the ring kernels compile");
        let text = ptx.to_src();
        assert!(text.contains("ring_merge") && text.contains("ring_add"));
    }
}
