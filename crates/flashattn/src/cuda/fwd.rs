//! The forward launcher: the path choice (the Hopper kernel of `fwd_sm90.rs` where it covers the problem) and
//! the sm80-class kernel's variant, shared memory and grid.

use super::call::{check_sizes, fwd_params, variant_for, FwdArgs};
use super::compile::{Pass, Variant};
use super::launch::launch;
use super::params::FwdDvParams;
use super::runtime::Gpu;
use crate::error::{Error, Result};
use crate::problem::Problem;
use cudarc::driver::sys as dsys;

/// Forward tile sizes `(BLOCK_M, BLOCK_N, warps)` of a variant: the defaults of `fwd.cu` (FWD_DEFAULT_TILES), by
/// the wider of its head dim and value head dim; 128 x 64 with 8 warps when the value head dim is the wider.
pub(crate) fn fwd_tiles(v: &Variant) -> (u32, u32, u32) {
    let hv = v.value_dim().unwrap_or(v.head_dim);
    if hv > v.head_dim {
        return (128, 64, 8);
    }
    match v.head_dim.max(hv) {
        0..=64 => (128, 128, 4),
        65..=128 => (128, 64, 4),
        _ => (128, 64, 8),
    }
}

/// Dynamic shared memory of a forward variant (`FWD_SMEM_BYTES`): the Q and K tiles (or the O staging area,
/// `BLOCK_M` rows of the value head dim, where that is larger), then the V tile; rows padded by 16 bytes.
pub(crate) fn fwd_smem(v: &Variant) -> u32 {
    let (bm, bn, _) = fwd_tiles(v);
    let row = |dim: usize| (dim as u32 + 8) * 2;
    let (rb, rbv) = (row(v.head_dim), row(v.value_dim().unwrap_or(v.head_dim)));
    ((bm + bn) * rb).max(bm * rbv) + bn * rbv
}

/// The sm80-class forward of a problem: its variant, query rows per CTA, warps and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sm80Plan {
    pub v: Variant,
    pub block_m: u32,
    pub warps: u32,
    pub smem: u32,
}

/// The sm80-class forward of a problem on a device (`device`: its name for messages) with `smem_optin` bytes of
/// shared memory per block, or `Unsupported` when the variant needs more.
pub(crate) fn sm80_plan(p: &Problem, aligned16: bool, device: &str, smem_optin: i64) -> Result<Sm80Plan> {
    let v = variant_for(p, Pass::Fwd, aligned16, false)?;
    let (block_m, _, warps) = fwd_tiles(&v);
    let smem = fwd_smem(&v);
    if smem as i64 > smem_optin {
        let dims =
            if p.d_v == p.d { format!("head dim {}", p.d) } else { format!("head dims d {}, d_v {}", p.d, p.d_v) };
        return Err(Error::Unsupported {
            backend: "cuda",
            what: format!("{dims} on {device} ({smem} B of shared memory per block needed, {smem_optin} available)"),
        });
    }
    Ok(Sm80Plan { v, block_m, warps, smem })
}

/// Runs the forward kernel on `stream`: the sm90 kernel on Hopper for the problems it covers
/// (`fwd_sm90::covers`; not a value head dim other than `d`), else the sm80-class kernel ([`sm80_plan`]).
pub(crate) fn run(gpu: &Gpu, stream: dsys::CUstream, p: &Problem, a: &FwdArgs, aligned16: bool) -> Result<()> {
    check_sizes(p)?;
    if super::fwd_sm90::covers(gpu, p, aligned16) && super::fwd_sm90::run(gpu, stream, p, a)? {
        return Ok(());
    }
    let Sm80Plan { v, block_m, warps, smem } = sm80_plan(p, aligned16, &gpu.name, gpu.smem_optin as i64)?;
    let m = gpu.module(&v)?;
    let params = fwd_params(p, a);
    let grid = ((p.max_seqlen_q() as u32).div_ceil(block_m), p.batch as u32, p.h as u32);
    let k = &m.kernels["flash_fwd"];
    if v.value_dim().is_some() {
        let params = FwdDvParams { f: params, d_v: p.d_v as i32, pad_: 0 };
        // SAFETY: a variant with a value head dim of its own takes FwdDvParams, which `params` mirrors; its
        // pointers come from buffers sized for this problem (v and o with the last dim d_v).
        return unsafe { launch(k, "flash_fwd", stream, grid, 32 * warps, smem, &params) };
    }
    // SAFETY: `params` mirrors FwdParams; its pointers come from buffers sized for this problem.
    unsafe { launch(k, "flash_fwd", stream, grid, 32 * warps, smem, &params) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::AttnOptions;
    use crate::problem::validate;
    use crate::tensor::Tensor;
    use crate::tuning::{CudaPath, Tuning};
    use crate::DType;

    /// Shared memory per block on an H100 / A100 (`cudaDevAttrMaxSharedMemoryPerBlockOptin`).
    const SM90_SMEM: i64 = 227 * 1024;
    const SM80_SMEM: i64 = 163 * 1024;

    fn problem(d: usize, d_v: usize, causal: bool, tuning: Tuning) -> Problem {
        let (q, k, v) = (
            Tensor::zeros(&[2, 33, 4, d], DType::BF16),
            Tensor::zeros(&[2, 47, 2, d], DType::BF16),
            Tensor::zeros(&[2, 47, 2, d_v], DType::BF16),
        );
        let opts = AttnOptions { causal, tuning, ..AttnOptions::default() };
        validate(&q.view(), &k.view(), &v.view(), &opts).expect("a valid problem")
    }

    /// The launch plan on a Hopper device (no GPU needed): a value head dim other than `d` leaves both sm90 kernels
    /// and runs on the sm80-class forward and backward with `HEAD_DIM_V`, whose shared memory fits sm_80 and
    /// sm_90; equal dims stay on the sm90 kernels (unless the tuning forces the sm80-class path); a pair the
    /// kernels are not compiled for is `Unsupported`, naming `d_v`.
    #[test]
    fn value_head_dims_run_on_the_sm80_class_kernels_on_hopper() {
        for (d, d_v, hd, hv) in [(192, 128, 192, 128), (128, 64, 128, 64), (64, 128, 64, 128), (100, 40, 128, 64)] {
            for causal in [false, true] {
                let p = problem(d, d_v, causal, Tuning::default());
                assert!(!super::super::fwd_sm90::covers_on("sm_90a", SM90_SMEM, &p, true), "({d}, {d_v})");
                assert!(!super::super::bwd_sm90::covers_on("sm_90a", &p, true), "({d}, {d_v})");
                for smem in [SM80_SMEM, SM90_SMEM] {
                    let plan = sm80_plan(&p, true, "a test device", smem).expect("an sm80-class plan");
                    assert_eq!((plan.v.pass, plan.v.head_dim, plan.v.head_dim_v), (Pass::Fwd, hd, Some(hv)));
                    assert_eq!(plan.v.mask, causal);
                    assert!(plan.v.defines().contains(&format!("HEAD_DIM_V={hv}")));
                    assert!(plan.v.to_string().starts_with(&format!("fwd_d{hd}v{hv}_bf16")), "{}", plan.v);
                }
                let b = variant_for(&p, Pass::Bwd, true, true).expect("a backward variant");
                assert_eq!((b.head_dim, b.head_dim_v, b.deterministic), (hd, Some(hv), true));
                assert!(b.to_string().starts_with(&format!("bwd_d{hd}v{hv}_bf16")), "{b}");
            }
        }
        // Equal dims: the sm90 kernels on Hopper, no HEAD_DIM_V; the forced sm80-class path has none either.
        let p = problem(128, 128, false, Tuning::default());
        assert!(super::super::fwd_sm90::covers_on("sm_90a", SM90_SMEM, &p, true));
        assert!(super::super::bwd_sm90::covers_on("sm_90a", &p, true));
        assert!(!super::super::fwd_sm90::covers_on("sm_80", SM80_SMEM, &p, true));
        let plan = sm80_plan(&p, true, "a test device", SM80_SMEM).unwrap();
        assert_eq!(plan.v.head_dim_v, None);
        assert!(!plan.v.defines().iter().any(|d| d.starts_with("HEAD_DIM_V")));
        let forced = problem(128, 128, false, Tuning { cuda_path: CudaPath::Sm80, ..Tuning::default() });
        assert!(!super::super::fwd_sm90::covers_on("sm_90a", SM90_SMEM, &forced, true));
        // Shared memory of the value head dim forms (fwd.cu's FWD_SMEM_BYTES).
        let smem = |d, d_v| sm80_plan(&problem(d, d_v, false, Tuning::default()), true, "x", SM90_SMEM).unwrap().smem;
        assert_eq!((smem(64, 128), smem(128, 64), smem(192, 128)), (52224, 61440, 94208));
        assert_eq!((smem(64, 64), smem(128, 128), smem(192, 192)), (55296, 69632, 102400));
        // Pairs the kernels are not compiled for.
        for (d, d_v) in [(192, 64), (256, 128), (128, 256), (100, 120)] {
            let p = problem(d, d_v, false, Tuning::default());
            for r in [sm80_plan(&p, true, "x", SM90_SMEM).map(|x| x.v), variant_for(&p, Pass::Bwd, true, false)] {
                match r {
                    Err(Error::Unsupported { backend: "cuda", what }) => {
                        assert!(what.contains(&format!("d_v = {d_v}")), "{what}")
                    }
                    other => panic!("({d}, {d_v}): expected Unsupported, got {other:?}"),
                }
            }
        }
    }
}
