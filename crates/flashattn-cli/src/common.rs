//! What the subcommands share: the error type with its exit codes, argument parsers, random tensors.

use flashattn::{bf16, dtype::F8E4M3, f16, CpuStorage, DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::fmt;

/// A failure of the command, with the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// Bad input: arguments, files, tensors (exit code 2).
    Input(String),
    /// Something could not run, or a check failed (exit code 1).
    Failed(String),
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Input(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Input(m) | CliError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<flashattn::Error> for CliError {
    fn from(e: flashattn::Error) -> Self {
        match e {
            flashattn::Error::InvalidArgument { .. }
            | flashattn::Error::CacheOverflow { .. }
            | flashattn::Error::Unsupported { .. } => CliError::Input(e.to_string()),
            _ => CliError::Failed(e.to_string()),
        }
    }
}

/// Result alias of the subcommands.
pub type CliResult<T> = Result<T, CliError>;

/// A `--device` request: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// The GPU when one works, else the CPU.
    Auto,
    /// A specific device.
    Exact(Device),
}

/// Parses `auto`, `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceArg, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceArg::Auto),
        "cpu" => Ok(DeviceArg::Exact(Device::Cpu)),
        "cuda" | "gpu" => Ok(DeviceArg::Exact(Device::Cuda(0))),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceArg::Exact(Device::Cuda(n))),
            _ => Err(format!("expected auto, cpu, cuda or cuda:N, got `{s}`")),
        },
    }
}

/// Resolves a device request with the library; returns the device and a sentence saying which and why.
pub fn resolve_device(arg: DeviceArg) -> CliResult<(Device, String)> {
    let req = match arg {
        DeviceArg::Auto => None,
        DeviceArg::Exact(d) => Some(d),
    };
    flashattn::backends::resolve(req).map_err(|e| CliError::Failed(format!("cannot use the requested device: {e}")))
}

/// Parses a floating-point dtype for q/k/v (`f16`, `bf16`, `f32`).
pub fn parse_float_dtype(s: &str) -> Result<DType, String> {
    match s.parse::<DType>() {
        Ok(DType::I32) | Err(_) => Err(format!("expected f16, bf16, f32 or e4m3 (FP8, CPU forward), got `{s}`")),
        Ok(d) => Ok(d),
    }
}

/// Parses a sliding window `L,R` (`-1` = unbounded side).
pub fn parse_window(s: &str) -> Result<(i64, i64), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [l, r] => match (l.parse::<i64>(), r.parse::<i64>()) {
            (Ok(l), Ok(r)) => Ok((l, r)),
            _ => Err(format!("expected two integers L,R, got `{s}`")),
        },
        _ => Err(format!("expected L,R (e.g. 256,0 or -1,0), got `{s}`")),
    }
}

/// Parses a seqlen that may use a `k` suffix (`4k` = 4096).
pub fn parse_seqlen(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    match t.strip_suffix('k') {
        Some(n) => n.parse::<usize>().map(|n| n * 1024).map_err(|_| format!("`{s}` is not a sequence length")),
        None => t.parse::<usize>().map_err(|_| format!("`{s}` is not a sequence length")),
    }
}

/// Elements of a shape, exact (`u128`; saturating, which no request that could fit reaches).
pub fn elems(shape: &[usize]) -> u128 {
    shape.iter().fold(1u128, |a, &n| a.saturating_mul(n as u128))
}

/// Bytes of host memory the system reports as available (`MemAvailable` of `/proc/meminfo`), when it does.
pub fn available_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as a number and in human units.
pub fn bytes_desc(b: u128) -> String {
    if b > usize::MAX as u128 {
        format!("{b} bytes")
    } else {
        format!("{b} bytes ({})", crate::alloc::human(b as usize))
    }
}

/// Refuses a request whose estimated host memory `bytes` cannot be allocated: more than `isize::MAX` (the
/// most one allocation can hold), or more than the memory the system reports available.
pub fn ensure_fits(what: &str, bytes: u128) -> CliResult<()> {
    if bytes > isize::MAX as u128 {
        return Err(CliError::Input(format!(
            "{what} needs about {} of host memory, more than any allocation can hold",
            bytes_desc(bytes)
        )));
    }
    if let Some(avail) = available_memory() {
        if bytes > avail {
            return Err(CliError::Input(format!(
                "{what} needs about {} of host memory; {} is available",
                bytes_desc(bytes),
                bytes_desc(avail)
            )));
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written, flushed to disk
/// (fsync) and renamed over `path`, so `path` holds either its old content or all of the new. The temporary
/// file is removed when any step fails.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable (best effort: not every platform can open a folder).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A tensor of `shape` with independent normal values times `scale`, rounded to `dtype`; generated in
/// parallel chunks (deterministic for a seed whatever the thread count) straight into the dtype.
pub fn randn(shape: &[usize], dtype: DType, seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    const CHUNK: usize = 1 << 16;
    fn fill<T: Send>(n: usize, seed: u64, f: impl Fn(&mut StdRng) -> T + Sync) -> Vec<T> {
        let mut out: Vec<T> = Vec::with_capacity(n);
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n.div_ceil(CHUNK)).max(1);
        let chunks: Vec<usize> = (0..n.div_ceil(CHUNK)).collect();
        let per = chunks.len().div_ceil(threads).max(1);
        let parts: Vec<Vec<T>> = std::thread::scope(|sc| {
            let handles: Vec<_> = chunks
                .chunks(per)
                .map(|cs| {
                    let f = &f;
                    sc.spawn(move || {
                        let mut v = Vec::with_capacity(cs.len() * CHUNK);
                        for &c in cs {
                            let mut rng = StdRng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                            let len = CHUNK.min(n - c * CHUNK);
                            v.extend((0..len).map(|_| f(&mut rng)));
                        }
                        v
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("random generator thread")).collect()
        });
        for p in parts {
            out.extend(p);
        }
        out
    }
    let normal = move |r: &mut StdRng| -> f32 { r.sample::<f32, _>(StandardNormal) * scale };
    let storage = match dtype {
        DType::F16 => CpuStorage::F16(fill(n, seed, |r| f16::from_f32(normal(r)))),
        DType::BF16 => CpuStorage::BF16(fill(n, seed, |r| bf16::from_f32(normal(r)))),
        DType::F32 => CpuStorage::F32(fill(n, seed, normal)),
        DType::I32 => CpuStorage::I32(fill(n, seed, |r| normal(r) as i32)),
        DType::E4M3 => CpuStorage::E4M3(fill(n, seed, |r| F8E4M3::from_f32(normal(r)))),
    };
    Tensor::from_storage(storage, shape).expect("length matches shape")
}

/// Uniform values in `[0, 1) * scale` as an `f32` tensor (ALiBi slopes).
pub fn rand_uniform(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n).map(|_| rng.gen::<f32>() * scale).collect();
    Tensor::from_f32(&v, shape, DType::F32).expect("length matches shape")
}

/// `max |a - b|` (infinite when either has a NaN where the other does not, or lengths differ).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
        if x == y {
            return m; // equal infinities (empty rows' lse) differ by nothing
        }
        let e = (x as f64 - y as f64).abs();
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

/// A duration in milliseconds with sensible precision.
pub fn ms(d: std::time::Duration) -> String {
    let m = d.as_secs_f64() * 1e3;
    if m >= 100.0 {
        format!("{m:.0} ms")
    } else if m >= 1.0 {
        format!("{m:.2} ms")
    } else {
        format!("{m:.3} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        assert_eq!(parse_window("-1,0"), Ok((-1, 0)));
        assert!(parse_window("3").is_err());
        assert_eq!(parse_device("cuda:1"), Ok(DeviceArg::Exact(Device::Cuda(1))));
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_seqlen("4k"), Ok(4096));
        assert!(parse_float_dtype("i32").is_err());
    }

    #[test]
    fn randn_is_deterministic_and_normalish() {
        let a = randn(&[3, 70000], DType::F32, 7, 1.0).to_f32_vec();
        let b = randn(&[3, 70000], DType::F32, 7, 1.0).to_f32_vec();
        assert_eq!(a, b);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}

/// The flags of the score pipeline that `check` and `run` share: mask, soft-capping, scale.
#[derive(clap::Args, Debug, Clone)]
pub struct ScoreArgs {
    /// Causal mask (bottom-right aligned).
    #[arg(long)]
    pub causal: bool,
    /// Sliding window L,R (-1 = unbounded side).
    #[arg(long, value_parser = parse_window, allow_hyphen_values = true)]
    pub window: Option<(i64, i64)>,
    /// Soft-capping of the scores (0 = off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub softcap: f32,
    /// Softmax scale (default 1/sqrt(d)).
    #[arg(long, allow_hyphen_values = true)]
    pub scale: Option<f32>,
}

impl ScoreArgs {
    /// Options with these flags, everything else at its default.
    pub fn options(&self) -> flashattn::AttnOptions {
        let mut opts = flashattn::AttnOptions {
            causal: self.causal,
            softcap: self.softcap,
            softmax_scale: self.scale,
            ..Default::default()
        };
        if let Some(w) = self.window {
            opts.window = w;
        }
        opts
    }
}
