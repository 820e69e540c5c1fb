//! The CPU backend's narrower instruction-set copies (AVX-512F without the bf16 products, AVX2+FMA, plain code),
//! which a machine with AVX-512 (and AVX-512-BF16) never
//! picks by itself: a share of the sweep's cases, forward and backward, against the f64 oracle with the
//! backend capped at each level (`flashattn::backends::set_cpu_simd_cap`). One test, so the process-wide cap is
//! never changed under another test of this binary.

mod common;
use common::*;
use flashattn::{DType, Device};

#[test]
fn narrower_simd_levels_pass_the_sweep_share() {
    for (level, name) in [(2u8, "AVX-512F"), (1, "AVX2+FMA"), (0, "plain")] {
        flashattn::backends::set_cpu_simd_cap(level);
        for backward in [false, true] {
            let all = cases(&[DType::BF16, DType::F32], backward);
            // A seventh of the sweep's cases (every 7th), with fresh random inputs.
            let share: Vec<Case> = all.into_iter().step_by(7).collect();
            let o = run_cases_parallel(Device::Cpu, &share);
            println!("cpu simd level {level} ({name}) backward={backward}: {} passed, {} failed", o.pass, o.fail);
            assert!(o.fail == 0, "level {level} ({name}): {} failures:\n{}", o.fail, o.msgs.join("\n"));
            assert_eq!(o.pass, share.len());
        }
    }
    flashattn::backends::set_cpu_simd_cap(3);
}
