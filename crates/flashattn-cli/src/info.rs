//! `flashattn info` (which backends are usable, and why not) and `flashattn precompile` (fill the CUDA
//! kernel cache for given architectures, no GPU needed).

use crate::common::CliResult;
use clap::Args;
use std::process::ExitCode;

/// Runs `flashattn info`.
pub fn main() -> CliResult<ExitCode> {
    println!("flashattn {}", env!("CARGO_PKG_VERSION"));
    println!("features: cuda {}", if cfg!(feature = "cuda") { "on" } else { "off (built without the `cuda` feature)" });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match std::env::var("RAYON_NUM_THREADS") {
        Ok(v) => println!("threads: {cores} cores available; RAYON_NUM_THREADS={v}"),
        Err(_) => println!("threads: {cores} cores available (set RAYON_NUM_THREADS to change the CPU backend's)"),
    }
    println!("backends:");
    for st in flashattn::backends::status() {
        println!("  {:<5} {:<12} {}", st.name, if st.usable { "usable" } else { "not usable" }, st.detail);
        // Which CUDA kernels run here: on Hopper the sm90 forward (where it covers the problem), else sm80-class.
        #[cfg(feature = "cuda")]
        if st.name == "cuda" && st.usable {
            if let Ok(arch) = flashattn::cuda::device_arch(0) {
                let tuning = flashattn::Tuning::default();
                println!("        cuda:0 kernels: {}", flashattn::cuda::kernel_family(&arch, &tuning));
            }
        }
        #[cfg(feature = "cuda")]
        if st.name == "cuda" {
            println!("        value head dims: {}", flashattn::cuda::value_dim_summary());
        }
    }
    match flashattn::backends::resolve(None) {
        Ok((_, why)) => println!("--device auto picks: {why}"),
        Err(e) => println!("--device auto: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Flags of `flashattn precompile`.
#[derive(Args, Debug, Clone)]
pub struct PrecompileArgs {
    /// GPU architectures, comma-separated (e.g. sm_80,sm_90a).
    #[arg(long, value_delimiter = ',', required = true)]
    pub arch: Vec<String>,
}

/// Runs `flashattn precompile`.
#[cfg(feature = "cuda")]
pub fn precompile(a: PrecompileArgs) -> CliResult<ExitCode> {
    let start = std::time::Instant::now();
    let compiled = flashattn::cuda::precompile(&a.arch)?;
    for k in &compiled {
        println!("compiled {k}");
    }
    println!("{} kernel(s) for {} in {:.1} s", compiled.len(), a.arch.join(", "), start.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// Runs `flashattn precompile` (this build has no CUDA backend).
#[cfg(not(feature = "cuda"))]
pub fn precompile(a: PrecompileArgs) -> CliResult<ExitCode> {
    Err(crate::common::CliError::Failed(format!(
        "cannot precompile for {}: this build has no `cuda` feature",
        a.arch.join(", ")
    )))
}
