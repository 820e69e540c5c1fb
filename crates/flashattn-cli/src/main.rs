//! The `flashattn` command: check the library against the naive formula and the `f64` oracle, run
//! attention on tensors from a safetensors file, benchmark, and show which backends are usable.
//!
//! ```text
//! flashattn check [--batch 2 --seqlen 128 --heads 8 --dim 64 --dtype f16 --causal --backward ...]
//! flashattn run --input IN.safetensors --output OUT.safetensors [--causal --kvcache ...]
//! flashattn bench [--grid standard|decode|quick] [--shape B,H,S,D] [--naive] [--json F] [--plot F.svg]
//! flashattn bench --ranks N [--shape B,H,S,D --causal 1 --modes fwd,fwd_bwd]   # ring attention
//! flashattn info
//! flashattn precompile --arch sm_80,sm_90a
//! ```
//!
//! Exit codes: 0 success; 1 a check failed or a backend could not run; 2 bad input (arguments, files,
//! tensors).

mod alloc;
mod bench;
mod check;
mod common;
mod encode;
mod info;
mod plot;
mod ring_bench;
mod run;
mod tuning;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// Exact, memory-efficient attention (FlashAttention): check, run, benchmark and inspect.
#[derive(Parser, Debug)]
#[command(name = "flashattn", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per process: size does not matter
enum Command {
    /// Random q, k, v: attention the naive way and the flash way, checked against the f64 oracle under the
    /// spec's accuracy rule; prints differences, times and peak extra memory. Exits 1 when the rule fails.
    Check(check::CheckArgs),
    /// Attention on tensors from a safetensors file (q, k, v, ...), outputs to another safetensors file.
    Run(run::RunArgs),
    /// Benchmark on the standard, decode, quick or GQA grid (or one custom shape): a table of ms and TFLOP/s.
    Bench(bench::BenchArgs),
    /// Which backends are usable here, and why not when not.
    Info,
    /// Compile the CUDA kernels for the given architectures into the kernel cache (no GPU needed).
    Precompile(info::PrecompileArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(a) => check::main(a),
        Command::Run(a) => run::main(a),
        Command::Bench(a) => bench::main(a),
        Command::Info => info::main(),
        Command::Precompile(a) => info::precompile(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
