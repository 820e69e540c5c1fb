//! Ring attention with ranks simulated by streams of one GPU (`ring_forward_cuda`/`ring_backward_cuda`):
//! the CUDA kernels on chunk pairs and the device merge, against the f64 oracle under the spec's rule and
//! against the single-GPU call. Skips without a usable GPU (fails instead under FLASHATTN_REQUIRE_GPU=1).
#![cfg(feature = "cuda")]

mod common;

use common::{gpu, randn_tensor, rng, seed, RingCase};
use flashattn::accuracy::{compare, compare_lse, o_factor, GRAD_FACTOR};
use flashattn::problem::validate;
use flashattn::reference::{backward_f64, forward_f64, naive_backward, naive_forward};
use flashattn::ring::{ring_backward_cuda, ring_forward_cuda};
use flashattn::{AttnOptions, BackwardInputs, DType, Device, Tensor};
use std::time::Instant;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.to_f32_vec().iter().zip(b.to_f32_vec()).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn ring_on_streams_matches_single_gpu_and_oracle() {
    if !gpu("ring_on_streams_matches_single_gpu_and_oracle") {
        return;
    }
    let cases = [
        RingCase { dtype: DType::BF16, d: 128, sq: 512, sk: 512, h: 4, hk: 2, softcap: false },
        RingCase { dtype: DType::F16, d: 64, sq: 333, sk: 401, h: 4, hk: 4, softcap: true },
    ];
    let s = seed();
    let mut fails = Vec::new();
    let mut n = 0;
    for ranks in [1, 2, 4] {
        for causal in [false, true] {
            for (ci, c) in cases.iter().enumerate() {
                n += 1;
                let case_seed = s.wrapping_add((ranks * 100 + usize::from(causal) * 10 + ci) as u64);
                let ctx = format!("{c:?} causal {causal} ranks {ranks} seed {case_seed}");
                let ([q, k, v, dout], opts) = c.inputs(&mut rng(case_seed), causal);
                let p = validate(&q.view(), &k.view(), &v.view(), &opts).unwrap();
                let (qd, kd, vd) = (q.view().data, k.view().data, v.view().data);
                let reference = forward_f64(&p, qd, kd, vd);
                let (base_o, _) = naive_forward(&p, qd, kd, vd);
                let ring = ring_forward_cuda(0, &q, &k, &v, &opts, ranks).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let single = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).unwrap();
                let factor = o_factor(c.softcap, false);
                let mut verdicts = vec![
                    compare("o", &ring.out.o.to_f32_vec(), &reference.o, &base_o.to_f32_vec(), c.dtype, factor),
                    compare_lse(&ring.out.lse.to_f32_vec(), &reference.lse),
                ];
                let so = compare("o", &single.o.to_f32_vec(), &reference.o, &base_o.to_f32_vec(), c.dtype, factor);
                let do_map = p.q_like_map(dout.layout());
                let g_ref = backward_f64(&p, qd, kd, vd, dout.view().data, &do_map);
                let g_base = naive_backward(&p, qd, kd, vd, dout.view().data, &do_map);
                let x = BackwardInputs { q: &q, k: &k, v: &v, o: &ring.out.o, lse: &ring.out.lse, dout: &dout };
                let g = ring_backward_cuda(0, &x, &opts, ranks).unwrap_or_else(|e| panic!("{ctx}: backward: {e}"));
                let x = BackwardInputs { q: &q, k: &k, v: &v, o: &single.o, lse: &single.lse, dout: &dout };
                let sg = flashattn::backward_on(Device::Cuda(0), &x, &opts).unwrap();
                for (name, got, want, base) in [
                    ("dq", &g.grads.dq, &g_ref.dq, &g_base.dq),
                    ("dk", &g.grads.dk, &g_ref.dk, &g_base.dk),
                    ("dv", &g.grads.dv, &g_ref.dv, &g_base.dv),
                ] {
                    verdicts.push(compare(name, &got.to_f32_vec(), want, base, c.dtype, GRAD_FACTOR));
                }
                let total: u64 = ring.stats.iter().map(|s| s.visible).sum();
                let want: u64 = (0..c.sq).map(|i| p.mask.key_range(i, c.sq, c.sk).len() as u64).sum();
                eprintln!(
                    "{ctx}: ring {} | single-GPU o err {:.2e} | ring-single max |diff| o {:.2e} dq {:.2e} dk {:.2e} \
                     dv {:.2e}",
                    verdicts
                        .iter()
                        .map(|v| format!("{} {:.2e}/{:.2e}", v.name, v.max_err, v.bound))
                        .collect::<Vec<_>>()
                        .join(", "),
                    so.max_err,
                    max_abs_diff(&ring.out.o, &single.o),
                    max_abs_diff(&g.grads.dq, &sg.dq),
                    max_abs_diff(&g.grads.dk, &sg.dk),
                    max_abs_diff(&g.grads.dv, &sg.dv),
                );
                if total != want {
                    fails.push(format!("{ctx}: visible pairs {total}, want {want}"));
                }
                for v in verdicts {
                    if !v.pass {
                        fails.push(format!("{ctx}: ring {v}"));
                    }
                }
            }
        }
    }
    assert!(fails.is_empty(), "{} failures in {n} cases (FLASHATTN_SEED={s}):\n{}", fails.len(), fails.join("\n"));
    eprintln!("ring on streams: {n} cases (forward + backward) pass, seed {s}");
}

/// Times of the simulated ring at one larger point (not a scaling figure: every rank shares the GPU), and
/// its agreement with the single-GPU call there.
#[test]
fn ring_on_streams_timing() {
    if !gpu("ring_on_streams_timing") {
        return;
    }
    let (b, h, s, d) = (1, 8, 8192, 128);
    let mut r = rng(7);
    let q = randn_tensor(&mut r, &[b, s, h, d], DType::BF16, 1.0);
    let k = randn_tensor(&mut r, &[b, s, h, d], DType::BF16, 1.0);
    let v = randn_tensor(&mut r, &[b, s, h, d], DType::BF16, 1.0);
    let opts = AttnOptions::default().causal();
    let single = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).unwrap(); // warm-up, compile
    let t0 = Instant::now();
    let single = flashattn::forward_on(Device::Cuda(0), &q, &k, &v, &opts).map(|_| single).unwrap();
    let single_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "timing point b={b} h={h} s={s} d={d} causal bf16; single-GPU forward_on (host copies included): {:.1} ms",
        single_s * 1e3
    );
    for ranks in [1, 2, 4, 8] {
        let _ = ring_forward_cuda(0, &q, &k, &v, &opts, ranks).unwrap();
        let t0 = Instant::now();
        let ring = ring_forward_cuda(0, &q, &k, &v, &opts, ranks).unwrap();
        let wall = t0.elapsed().as_secs_f64();
        let per: Vec<String> = ring
            .stats
            .iter()
            .map(|st| format!("r{} {} pairs {:.2} ms", st.rank, st.pairs, st.compute_s * 1e3))
            .collect();
        eprintln!(
            "ranks {ranks}: ring_forward_cuda {:.1} ms (host sharding and copies included); \
             per-rank stream time: {}; max |ring - single| o {:.3e}",
            wall * 1e3,
            per.join(", "),
            max_abs_diff(&ring.out.o, &single.o)
        );
        let vis: Vec<u64> = ring.stats.iter().map(|st| st.visible).collect();
        assert!(vis.iter().all(|&x| x == vis[0]), "zig-zag balance {vis:?}");
    }
}

/// The NCCL transport on one GPU: a ring of one rank whose send and receive are a self-exchange through
/// NCCL (the only ring one GPU allows: NCCL refuses two ranks on one device). Runs the communicator set-up,
/// the grouped send/recv on the communication stream and the stream joins; skips without libnccl.
#[cfg(feature = "nccl")]
#[test]
fn nccl_transport_self_exchange() {
    use flashattn::cuda::cudarc::driver::CudaContext;
    use flashattn::ring::nccl::{probe, DeviceBlock, NcclTransport};
    use flashattn::ring::Transport;
    if !gpu("nccl_transport_self_exchange") {
        return;
    }
    match probe() {
        Ok(v) => eprintln!("nccl version code {v}"),
        Err(e) => {
            eprintln!("SKIP nccl_transport_self_exchange: {e}");
            return;
        }
    }
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let mut t = NcclTransport::single_process(vec![stream.clone()]).unwrap().pop().unwrap();
    assert_eq!((t.rank(), t.ranks()), (0, 1));
    let a: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
    for round in 0..3 {
        let block = DeviceBlock { bufs: vec![stream.clone_htod(&a).unwrap(), stream.clone_htod(&b).unwrap()] };
        t.start(block).unwrap();
        let got = t.finish().unwrap();
        assert_eq!(got.bufs.len(), 2);
        assert_eq!(stream.clone_dtoh(&got.bufs[0]).unwrap(), a, "round {round}");
        assert_eq!(stream.clone_dtoh(&got.bufs[1]).unwrap(), b, "round {round}");
    }
    assert!(t.finish().is_err(), "nothing posted");
    eprintln!("nccl self-exchange: 3 rounds of 2 buffers (1,000,003 + 4,096 bytes) came back intact");
}
