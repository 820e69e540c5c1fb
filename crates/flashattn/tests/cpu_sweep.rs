//! The spec's sweep on the CPU backend against the f64 oracle. `FLASHATTN_SWEEP=full` runs the whole cross
//! product (long); the default is a rotating subset that still covers every head dim, shape, head layout
//! and variant.

mod common;
use common::*;
use flashattn::{DType, Device};

fn sweep(dtypes: &[DType], backward: bool) {
    let cases = cases(dtypes, backward);
    let (pass, fail, msgs) = run_cases(Device::Cpu, &cases);
    println!("cpu sweep {dtypes:?} backward={backward}: {pass} passed, {fail} failed");
    assert!(fail == 0, "{} failures:\n{}", fail, msgs.join("\n"));
    assert!(pass > 0);
}

#[test]
fn forward_f16() {
    sweep(&[DType::F16], false);
}

#[test]
fn forward_bf16() {
    sweep(&[DType::BF16], false);
}

#[test]
fn forward_f32() {
    sweep(&[DType::F32], false);
}

#[test]
fn backward_f16() {
    sweep(&[DType::F16], true);
}

#[test]
fn backward_bf16() {
    sweep(&[DType::BF16], true);
}

#[test]
fn backward_f32() {
    sweep(&[DType::F32], true);
}

/// Every variant on small shapes, all dtypes, forward and backward: cheap and exhaustive over variants.
#[test]
fn small_exhaustive() {
    let mut cases = Vec::new();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for variant in VARIANTS {
            for heads in HEADS {
                for (sq, sk) in [(1, 1), (5, 17), (17, 5), (64, 64), (65, 130), (130, 65)] {
                    for d in [8, 59] {
                        let mut c = Case::new(dtype, d, (sq, sk), heads, variant);
                        c.batch = 3;
                        c.backward = true;
                        cases.push(c);
                    }
                }
            }
        }
    }
    let (pass, fail, msgs) = run_cases(Device::Cpu, &cases);
    println!("cpu small exhaustive: {pass} passed, {fail} failed");
    assert!(fail == 0, "{}", msgs.join("\n"));
}
