//! The CUDA backend's dispatch and tuning flags ([`flashattn::Tuning`]), shared by `check`, `run` and `bench`:
//! A/B runs of kernel choices and fallback tests from the command line. Every flag defaults to the library's
//! default.

use crate::common::{CliError, CliResult};
use clap::{ArgAction, Args};
use flashattn::{CudaPath, Tuning};

/// Flags of the CUDA backend's tuning (`flashattn::Tuning`); the defaults are the library's.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "CUDA tuning")]
pub struct TuningArgs {
    /// CUDA kernel path: auto (the Hopper kernels where they cover the problem) or sm80 (the sm80-class
    /// kernels everywhere, Hopper included).
    #[arg(long, value_parser = parse_path, default_value = "auto")]
    pub cuda_path: CudaPath,
    /// Kernel path of the backward alone: auto or sm80.
    #[arg(long, value_parser = parse_path, default_value = "auto")]
    pub bwd_path: CudaPath,
    /// Query rows per tile of the Hopper forward at head dim 64: 192 (3 consumer warpgroups) or 128.
    #[arg(long, default_value_t = 192, value_parser = parse_bm)]
    pub sm90_bm: usize,
    /// Keys per K/V block of the Hopper forward, forced per head dim (comma-separated): 176 or 128 at head dim
    /// 128, 80 or 64 at head dim 256 (e.g. `176,80`); a head dim not listed keeps its rule.
    #[arg(long, value_delimiter = ',')]
    pub sm90_bn: Vec<usize>,
    /// L2 budget (MiB) of the Hopper forward's scheduling groups, replacing the rule.
    #[arg(long)]
    pub sm90_l2_mib: Option<u64>,
    /// Ping-pong of the Hopper forward's consumer warpgroups: on or off.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = ArgAction::Set)]
    pub sm90_pingpong: bool,
    /// L2 budget (MiB) of the Hopper backward's scheduling groups with a mask.
    #[arg(long, default_value_t = 24)]
    pub bwd90_l2_mib: u64,
    /// Pipeline stages of the KV-cache kernel (2..=8; default: 3 up to head dim 128, else 2).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=8))]
    pub kv_stages: Option<u32>,
    /// Key splits of KV-cache calls (FlashAttention's `num_splits`; 0 = chosen per problem).
    #[arg(long, default_value_t = 0)]
    pub num_splits: usize,
    /// An extra NVRTC option for every kernel (repeatable, e.g. `--nvrtc-option=-lineinfo`); part of the kernel
    /// cache key.
    #[arg(long = "nvrtc-option", allow_hyphen_values = true)]
    pub nvrtc_options: Vec<String>,
    /// Fill the outputs with NaN before the kernels run (a test hook: unwritten elements then fail checks).
    #[arg(long)]
    pub poison_outputs: bool,
}

fn parse_path(s: &str) -> Result<CudaPath, String> {
    s.parse().map_err(|e: flashattn::Error| e.to_string())
}

fn parse_bm(s: &str) -> Result<usize, String> {
    match s.trim() {
        "192" => Ok(192),
        "128" => Ok(128),
        _ => Err(format!("expected 192 or 128, got `{s}`")),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "1" | "true" => Ok(true),
        "off" | "0" | "false" => Ok(false),
        _ => Err(format!("expected on or off, got `{s}`")),
    }
}

impl TuningArgs {
    /// The library's [`Tuning`] for these flags.
    pub fn tuning(&self) -> CliResult<Tuning> {
        let mut t = Tuning {
            cuda_path: self.cuda_path,
            bwd_path: self.bwd_path,
            sm90_d64_bm192: self.sm90_bm == 192,
            sm90_l2_group_mib: self.sm90_l2_mib,
            sm90_pingpong: self.sm90_pingpong,
            bwd90_l2_group_mib: self.bwd90_l2_mib,
            kv_stages: self.kv_stages,
            num_splits: self.num_splits,
            nvrtc_options: self.nvrtc_options.clone(),
            poison_outputs: self.poison_outputs,
            ..Tuning::default()
        };
        for &bn in &self.sm90_bn {
            match bn {
                176 => t.sm90_wide_kv_d128 = Some(true),
                128 => t.sm90_wide_kv_d128 = Some(false),
                80 => t.sm90_wide_kv_d256 = Some(true),
                64 => t.sm90_wide_kv_d256 = Some(false),
                _ => {
                    return Err(CliError::Input(format!(
                        "--sm90-bn: {bn} is no key-block size of the Hopper forward (176 or 128 at head dim 128, 80 or \
                         64 at head dim 256)"
                    )))
                }
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: TuningArgs,
    }

    fn tuning(extra: &[&str]) -> CliResult<Tuning> {
        T::parse_from(std::iter::once("t").chain(extra.iter().copied())).a.tuning()
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        assert_eq!(tuning(&[]).unwrap(), Tuning::default());
    }

    #[test]
    fn flags_map_to_fields() {
        let t = tuning(&[
            "--cuda-path",
            "sm80",
            "--bwd-path=SM80",
            "--sm90-bm",
            "128",
            "--sm90-bn",
            "128,80",
            "--sm90-l2-mib",
            "64",
            "--sm90-pingpong",
            "off",
            "--bwd90-l2-mib",
            "8",
            "--kv-stages",
            "4",
            "--num-splits",
            "16",
            "--nvrtc-option",
            "-lineinfo",
            "--nvrtc-option=-DKV_L2_PREFETCH=256",
            "--poison-outputs",
        ])
        .unwrap();
        let want = Tuning {
            cuda_path: CudaPath::Sm80,
            bwd_path: CudaPath::Sm80,
            sm90_d64_bm192: false,
            sm90_wide_kv_d128: Some(false),
            sm90_wide_kv_d256: Some(true),
            sm90_l2_group_mib: Some(64),
            sm90_pingpong: false,
            bwd90_l2_group_mib: 8,
            kv_stages: Some(4),
            num_splits: 16,
            nvrtc_options: vec!["-lineinfo".into(), "-DKV_L2_PREFETCH=256".into()],
            poison_outputs: true,
        };
        assert_eq!(t, want);
        assert!(tuning(&["--sm90-bn", "96"]).is_err());
        assert!(T::try_parse_from(["t", "--kv-stages", "9"]).is_err());
        assert!(T::try_parse_from(["t", "--cuda-path", "sm90"]).is_err());
        assert!(T::try_parse_from(["t", "--sm90-bm", "64"]).is_err());
    }
}
