//! Fuzz target for the CLI's `flashattn run` command: its safetensors reader (header, duplicate names,
//! dtypes, shapes, integer inputs), the options it builds, and the dense, varlen, backward and KV-cache calls
//! it makes on the CPU.
//!
//! The CLI's own `run.rs`, `encode.rs` and `common.rs` are compiled into this target unchanged (`#[path]`
//! modules), so what is fuzzed is the shipped code. The first input byte selects flags (`--kvcache`, `--causal`,
//! `--window`, `--softcap`, `--scale`, `--rotary-interleaved`, `--deterministic`); the rest is the input file.
//! Properties: nothing panics; a refusal is an input error (exit code 2), never a failure to encode or
//! write the outputs; a success writes a safetensors file holding `o` and `lse`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "../../crates/flashattn-cli/src/common.rs"]
mod common;

#[allow(dead_code)]
#[path = "../../crates/flashattn-cli/src/encode.rs"]
mod encode;

#[allow(dead_code)]
#[path = "../../crates/flashattn-cli/src/run.rs"]
mod run;

#[allow(dead_code)]
#[path = "../../crates/flashattn-cli/src/tuning.rs"]
mod tuning;

/// The CLI's tuning flags at their defaults (the library's default tuning), parsed once.
fn default_tuning() -> tuning::TuningArgs {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        tuning: tuning::TuningArgs,
    }
    static T: OnceLock<tuning::TuningArgs> = OnceLock::new();
    T.get_or_init(|| <Flags as clap::Parser>::parse_from(["cli_run"]).tuning).clone()
}

/// Stands in for the CLI's allocation-counting module (only its `human` is used by `common.rs`).
mod alloc {
    pub fn human(bytes: usize) -> String {
        format!("{bytes} B")
    }
}

use common::{CliError, DeviceArg};

/// A private folder for this process's input and output files: under `$FLASHATTN_FUZZ_DIR` when set, else
/// `/dev/shm` when there is one, else the temporary folder.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = match std::env::var_os("FLASHATTN_FUZZ_DIR") {
            Some(d) => PathBuf::from(d),
            None if std::path::Path::new("/dev/shm").is_dir() => "/dev/shm".into(),
            None => std::env::temp_dir(),
        };
        let d = base.join(format!("flashattn-fuzz-cli-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the fuzz folder");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, file)) = data.split_first() else { return };
    let input = dir().join("in.safetensors");
    let output = dir().join("out.safetensors");
    std::fs::write(&input, file).expect("write the input file");
    let _ = std::fs::remove_file(&output);
    let args = run::RunArgs {
        input,
        output: output.clone(),
        score: common::ScoreArgs {
            causal: flags & 1 != 0,
            window: (flags & 2 != 0).then_some((((flags >> 5) & 3) as i64 - 1, 0)),
            softcap: if flags & 4 != 0 { 5.0 } else { 0.0 },
            scale: (flags & 8 != 0).then_some(0.5),
        },
        deterministic: flags & 16 != 0,
        device: DeviceArg::Exact(flashattn::Device::Cpu),
        kvcache: flags & 128 != 0,
        rotary_interleaved: flags & 32 != 0,
        out_dtype: None,
        tuning: default_tuning(),
    };
    match run::main(args) {
        Ok(code) => {
            assert_eq!(code, std::process::ExitCode::SUCCESS);
            let bytes = std::fs::read(&output).expect("a success writes the output file");
            let st = safetensors::SafeTensors::deserialize(&bytes).expect("the output is a safetensors file");
            assert!(st.tensor("o").is_ok() && st.tensor("lse").is_ok(), "the output lacks o or lse");
        }
        Err(CliError::Input(msg)) => assert!(!msg.is_empty()),
        Err(CliError::Failed(msg)) => panic!("`run` failed (exit code 1) instead of refusing its input: {msg}"),
    }
});
