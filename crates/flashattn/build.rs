//! Emits `cfg(flashattn_avx512)` when the compiler has stable AVX-512 (`target_feature(enable = "avx512f")`
//! and its intrinsics, Rust 1.89): the CPU backend's AVX-512 copies are compiled only then, so the crate
//! still builds with older compilers (AVX2+FMA is then the widest copy).

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(flashattn_avx512)");
    println!("cargo::rerun-if-env-changed=RUSTC");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1).and_then(|ver| ver.split('.').nth(1)?.parse::<u32>().ok()));
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo::rustc-cfg=flashattn_avx512");
    }
}
