//! Prints one line per kernel variant and architecture: the variant, the size of its cubin and a 64-bit FNV-1a
//! digest of the bytes, compiled by NVRTC (no GPU needed). Two runs from two versions of the kernel sources, diffed,
//! show which variants a change of the sources altered (a refactoring that should leave them alone must print the
//! same lines).
//!
//! ```text
//! cargo run --release -p flashattn --example cubin_digests -- [hot|representative|all] [sm_80,sm_90a]
//! ```
//! The default set is `hot` for sm_80 and sm_90a. libnvrtc must be on the loader path.

#[cfg(feature = "cuda")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use flashattn::cuda::compile;
    use rayon::prelude::*;
    let mut args = std::env::args().skip(1);
    let set = args.next().unwrap_or_else(|| "hot".into());
    let variants = match set.as_str() {
        "hot" => compile::hot_variants(),
        "representative" => compile::representative_variants(),
        "all" => compile::all_variants(),
        other => return Err(format!("unknown variant set {other:?} (hot, representative or all)").into()),
    };
    let archs: Vec<String> =
        args.next().unwrap_or_else(|| "sm_80,sm_90a".into()).split(',').map(String::from).collect();
    let jobs: Vec<(String, compile::Variant)> =
        archs.iter().flat_map(|a| variants.iter().filter(|v| v.builds_for(a)).map(move |v| (a.clone(), *v))).collect();
    let lines: Vec<String> = jobs
        .par_iter()
        .map(|(arch, v)| {
            let c = compile::compile(v, arch)?;
            let digest =
                c.cubin.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
            Ok(format!("{arch} {v} {} {digest:016x}", c.cubin.len()))
        })
        .collect::<flashattn::Result<_>>()?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("cubin_digests needs the `cuda` feature");
    std::process::exit(2);
}
