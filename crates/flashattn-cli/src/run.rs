//! `flashattn run`: attention on tensors from a safetensors file, outputs to another, for debugging and
//! interop.
//!
//! Inputs by name: `q`, `k`, `v` (f32, f16, bf16 or F8_E4M3: the stored dtype is the compute dtype; FP8 with
//! optional f32 `[b, hk]` descales `q_descale`, `k_descale`, `v_descale`, and a bf16 output unless
//! `--out-dtype f16`), optional
//! `alibi_slopes`, `cu_seqlens_q` + `cu_seqlens_k` (+ `seqused_k`) for packed `[total, heads, d]` batches,
//! optional `do` (then the backward pass runs too). Outputs `o`, `lse` (and `dq`, `dk`, `dv`).
//! With `--kvcache`: `q`, `k_cache`, `v_cache`, optional `k_new`, `v_new`, `cache_seqlens`, `block_table`,
//! `rotary_cos`, `rotary_sin`, `cache_batch_idx`, `cache_leftpad` (an F8_E4M3 cache with `k_descale`, `v_descale`,
//! and `q_descale` with an F8_E4M3 q); outputs `o`, `lse`, and the updated
//! `k_cache`, `v_cache`. Integer inputs may be stored as i32 or i64.

use crate::common::{parse_device, resolve_device, CliError, CliResult, DeviceArg, ScoreArgs};
use clap::Args;
use flashattn::{
    bf16, dtype::F8E4M3, f16, AttnOptions, BackwardInputs, CacheSeqlens, CpuStorage, DType, KvCache, Rotary, Tensor,
    VarLen,
};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Flags of `flashattn run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Input safetensors file.
    #[arg(long, short = 'i')]
    pub input: PathBuf,
    /// Output safetensors file.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Mask, soft-capping and scale.
    #[command(flatten)]
    pub score: ScoreArgs,
    /// Bit-reproducible backward pass.
    #[arg(long)]
    pub deterministic: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
    /// KV-cache attention (inputs q, k_cache, v_cache, ...).
    #[arg(long)]
    pub kvcache: bool,
    /// Rotary embedding with interleaved pairs (0,1), (2,3), ... (default: pairs (k, k + rot/2)).
    #[arg(long)]
    pub rotary_interleaved: bool,
    /// FP8 (e4m3) inputs: the output dtype, bf16 or f16 (default bf16; q's dtype with only an FP8 cache).
    #[arg(long, value_parser = crate::common::parse_float_dtype)]
    pub out_dtype: Option<DType>,
    /// The CUDA backend's dispatch and tuning choices.
    #[command(flatten)]
    pub tuning: crate::tuning::TuningArgs,
}

const DENSE_NAMES: &[&str] = &[
    "q",
    "k",
    "v",
    "alibi_slopes",
    "sink",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "seqused_k",
    "do",
    "q_descale",
    "k_descale",
    "v_descale",
];
const KV_NAMES: &[&str] = &[
    "q",
    "k_cache",
    "v_cache",
    "k_new",
    "v_new",
    "cache_seqlens",
    "block_table",
    "rotary_cos",
    "rotary_sin",
    "cache_batch_idx",
    "cache_leftpad",
    "alibi_slopes",
    "sink",
    "q_descale",
    "k_descale",
    "v_descale",
];

/// The tensors of an input file, read on demand by name.
struct Inputs<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
}

fn input_err(msg: impl Into<String>) -> CliError {
    CliError::Input(msg.into())
}

fn decode<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N bytes"))).collect()
}

impl<'a> Inputs<'a> {
    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    }

    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    /// A floating-point tensor (f32, f16, bf16 or F8_E4M3), kept in its stored dtype.
    fn float(&self, name: &str) -> CliResult<Option<Tensor>> {
        let Ok(t) = self.st.tensor(name) else { return Ok(None) };
        let storage = match t.dtype() {
            StDtype::F32 => CpuStorage::F32(decode(t.data(), f32::from_le_bytes)),
            StDtype::F16 => CpuStorage::F16(decode(t.data(), |b| f16::from_bits(u16::from_le_bytes(b)))),
            StDtype::BF16 => CpuStorage::BF16(decode(t.data(), |b| bf16::from_bits(u16::from_le_bytes(b)))),
            StDtype::F8_E4M3 => CpuStorage::E4M3(t.data().iter().map(|&b| F8E4M3(b)).collect()),
            other => {
                return Err(input_err(format!(
                    "tensor `{name}` in {} has dtype {other:?}; expected F32, F16, BF16 or F8_E4M3",
                    self.path.display()
                )))
            }
        };
        Tensor::from_storage(storage, t.shape()).map(Some).map_err(|e| input_err(format!("tensor `{name}`: {e}")))
    }

    fn float_required(&self, name: &str, mode: &str) -> CliResult<Tensor> {
        self.float(name)?.ok_or_else(|| self.missing(name, mode))
    }

    fn missing(&self, name: &str, mode: &str) -> CliError {
        input_err(format!(
            "{} has no tensor `{name}`, which {mode} needs (it has: {})",
            self.path.display(),
            if self.names().is_empty() { "no tensors".to_string() } else { self.names().join(", ") }
        ))
    }

    /// An integer tensor (i32, or i64 in i32 range) as a shape and values.
    fn int(&self, name: &str) -> CliResult<Option<(Vec<usize>, Vec<i32>)>> {
        let Ok(t) = self.st.tensor(name) else { return Ok(None) };
        let vals = match t.dtype() {
            StDtype::I32 => decode(t.data(), i32::from_le_bytes),
            StDtype::I64 => decode(t.data(), i64::from_le_bytes)
                .into_iter()
                .map(|x| {
                    i32::try_from(x).map_err(|_| input_err(format!("tensor `{name}`: value {x} does not fit in i32")))
                })
                .collect::<CliResult<Vec<i32>>>()?,
            other => {
                return Err(input_err(format!(
                    "tensor `{name}` in {} has dtype {other:?}; expected I32 (or I64)",
                    self.path.display()
                )))
            }
        };
        Ok(Some((t.shape().to_vec(), vals)))
    }

    /// A one-dimensional integer tensor.
    fn int_vec(&self, name: &str) -> CliResult<Option<Vec<i32>>> {
        match self.int(name)? {
            None => Ok(None),
            Some((shape, v)) if shape.len() == 1 => Ok(Some(v)),
            Some((shape, _)) => Err(input_err(format!("tensor `{name}` has shape {shape:?}; expected one dimension"))),
        }
    }

    /// Warns about tensors this mode does not read (a misspelt name would otherwise be silently ignored).
    fn warn_unused(&self, known: &[&str]) {
        let known: BTreeSet<&str> = known.iter().copied().collect();
        for n in self.names() {
            if !known.contains(n.as_str()) {
                eprintln!("warning: ignoring tensor `{n}` (not an input of this mode)");
            }
        }
    }
}

fn alibi_to_f32(t: Tensor) -> Tensor {
    if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)
    }
}

fn options(a: &RunArgs, inp: &Inputs<'_>) -> CliResult<AttnOptions> {
    let mut opts = AttnOptions { deterministic: a.deterministic, tuning: a.tuning.tuning()?, ..a.score.options() };
    opts.alibi_slopes = inp.float("alibi_slopes")?.map(alibi_to_f32);
    opts.sink = inp.float("sink")?;
    opts.q_descale = inp.float("q_descale")?;
    opts.k_descale = inp.float("k_descale")?;
    opts.v_descale = inp.float("v_descale")?;
    opts.out_dtype = a.out_dtype;
    Ok(opts)
}

/// Writes named tensors to a safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)]) -> CliResult<()> {
    let bytes =
        crate::encode::serialize(tensors).map_err(|e| CliError::Failed(format!("cannot encode outputs: {e}")))?;
    crate::common::write_atomic(path, &bytes).map_err(|e| input_err(format!("cannot write {}: {e}", path.display())))
}

/// Whether `output` names the same file as `input` (which exists): compared by canonical path, and on Unix
/// by device and inode too (hard links).
fn same_file(input: &Path, output: &Path) -> bool {
    let Ok(inp) = input.canonicalize() else { return false };
    if let Ok(out) = output.canonicalize() {
        if out == inp {
            return true;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let (Ok(a), Ok(b)) = (std::fs::metadata(&inp), std::fs::metadata(&out)) {
                return a.dev() == b.dev() && a.ino() == b.ino();
            }
        }
        return false;
    }
    // The output does not exist yet: its folder, canonicalised, plus its name.
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (dir.canonicalize(), output.file_name()) {
        (Ok(d), Some(n)) => d.join(n) == inp,
        _ => false,
    }
}

/// The tensor names of a safetensors header, in file order (duplicates kept), or `None` when the header
/// cannot be read (the safetensors parser then reports why).
fn header_names(bytes: &[u8]) -> Option<Vec<String>> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header = bytes.get(8..end)?;
    serde_json::from_slice::<Keys>(header).ok().map(|k| k.0)
}

/// Runs `flashattn run`.
pub fn main(a: RunArgs) -> CliResult<ExitCode> {
    if same_file(&a.input, &a.output) {
        return Err(input_err(format!(
            "--output {} is the input file: choose another path (the input would be overwritten)",
            a.output.display()
        )));
    }
    let bytes = std::fs::read(&a.input).map_err(|e| input_err(format!("cannot read {}: {e}", a.input.display())))?;
    if let Some(names) = header_names(&bytes) {
        let mut seen = BTreeSet::new();
        if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(input_err(format!(
                "{} is not a valid safetensors file: tensor `{dup}` is named twice in its header",
                a.input.display()
            )));
        }
    }
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| input_err(format!("{} is not a valid safetensors file: {e}", a.input.display())))?;
    let inp = Inputs { path: &a.input, st };
    let (device, why) = resolve_device(a.device)?;
    eprintln!("device: {why}");
    if a.kvcache {
        run_kvcache(&a, &inp, device)
    } else {
        run_dense(&a, &inp, device)
    }
}

fn run_dense(a: &RunArgs, inp: &Inputs<'_>, device: flashattn::Device) -> CliResult<ExitCode> {
    inp.warn_unused(DENSE_NAMES);
    for n in ["k_cache", "v_cache"] {
        if inp.has(n) {
            return Err(input_err(format!("{} has `{n}`: did you mean --kvcache?", inp.path.display())));
        }
    }
    let mode = "attention";
    let q = inp.float_required("q", mode)?;
    let k = inp.float_required("k", mode)?;
    let v = inp.float_required("v", mode)?;
    let mut opts = options(a, inp)?;
    let cu_q = inp.int_vec("cu_seqlens_q")?;
    let cu_k = inp.int_vec("cu_seqlens_k")?;
    let used = inp.int_vec("seqused_k")?;
    match (cu_q, cu_k) {
        (Some(cu_seqlens_q), Some(cu_seqlens_k)) => {
            opts.varlen = Some(VarLen { cu_seqlens_q, cu_seqlens_k, seqused_k: used });
        }
        (None, None) if used.is_none() => {}
        (None, None) => {
            return Err(input_err(
                "`seqused_k` needs `cu_seqlens_q` and `cu_seqlens_k` (packed [total, heads, d] inputs)",
            ))
        }
        (Some(_), None) => return Err(inp.missing("cu_seqlens_k", "varlen attention (cu_seqlens_q is given)")),
        (None, Some(_)) => return Err(inp.missing("cu_seqlens_q", "varlen attention (cu_seqlens_k is given)")),
    }
    let dout = inp.float("do")?;
    let out = flashattn::forward_on(device, &q, &k, &v, &opts)?;
    let mut outputs: Vec<(&str, &Tensor)> = vec![("o", &out.o), ("lse", &out.lse)];
    let grads;
    if let Some(dout) = &dout {
        let x = BackwardInputs { q: &q, k: &k, v: &v, o: &out.o, lse: &out.lse, dout };
        grads = flashattn::backward_on(device, &x, &opts).map_err(|e| match e {
            flashattn::Error::InvalidArgument { arg: "dout", expected, got } => {
                input_err(format!("invalid tensor `do`: expected {expected}, got {got}"))
            }
            e => e.into(),
        })?;
        outputs.extend([("dq", &grads.dq), ("dk", &grads.dk), ("dv", &grads.dv)]);
        if let Some(ds) = &grads.dsink {
            outputs.push(("dsink", ds));
        }
    }
    write_safetensors(&a.output, &outputs)?;
    let names: Vec<&str> = outputs.iter().map(|(n, _)| *n).collect();
    println!("wrote {} to {}", names.join(", "), a.output.display());
    Ok(ExitCode::SUCCESS)
}

fn run_kvcache(a: &RunArgs, inp: &Inputs<'_>, device: flashattn::Device) -> CliResult<ExitCode> {
    inp.warn_unused(KV_NAMES);
    let mode = "--kvcache";
    let q = inp.float_required("q", mode)?;
    let mut k_cache = inp.float_required("k_cache", mode)?;
    let mut v_cache = inp.float_required("v_cache", mode)?;
    let k_new = inp.float("k_new")?;
    let v_new = inp.float("v_new")?;
    let cos = inp.float("rotary_cos")?;
    let sin = inp.float("rotary_sin")?;
    let block_table = match inp.int("block_table")? {
        Some((shape, vals)) => {
            Some(Tensor::from_i32(vals, &shape).map_err(|e| input_err(format!("tensor `block_table`: {e}")))?)
        }
        None => None,
    };
    let seqlens = match inp.int("cache_seqlens")? {
        Some((shape, vals)) if shape.is_empty() => CacheSeqlens::All(vals[0]),
        Some((shape, vals)) if shape.len() == 1 => CacheSeqlens::PerSeq(vals),
        Some((shape, _)) => {
            return Err(input_err(format!("tensor `cache_seqlens` has shape {shape:?}; expected [b] or a scalar")))
        }
        None if k_new.is_some() => return Err(inp.missing("cache_seqlens", "appending k_new/v_new")),
        None => {
            // No count given and nothing to append: attend over the whole cache.
            let cap = match &block_table {
                Some(bt) => bt.shape().get(1).copied().unwrap_or(0) * k_cache.shape().get(1).copied().unwrap_or(0),
                None => k_cache.shape().get(1).copied().unwrap_or(0),
            };
            CacheSeqlens::All(i32::try_from(cap).map_err(|_| input_err("the cache is too long for i32 positions"))?)
        }
    };
    let opts = options(a, inp)?;
    let cache_batch_idx = inp.int_vec("cache_batch_idx")?;
    let cache_leftpad = inp.int_vec("cache_leftpad")?;
    let rotary = match (&cos, &sin) {
        (Some(c), Some(s)) => Some(Rotary { cos: c.view(), sin: s.view(), interleaved: a.rotary_interleaved }),
        (None, None) => None,
        (Some(_), None) => return Err(inp.missing("rotary_sin", "rotary embedding (rotary_cos is given)")),
        (None, Some(_)) => return Err(inp.missing("rotary_cos", "rotary embedding (rotary_sin is given)")),
    };
    let out = {
        let mut cache = KvCache::new(k_cache.view_mut(), v_cache.view_mut(), seqlens);
        cache.k_new = k_new.as_ref().map(|t| t.view());
        cache.v_new = v_new.as_ref().map(|t| t.view());
        cache.block_table = block_table;
        cache.rotary = rotary;
        cache.cache_batch_idx = cache_batch_idx;
        cache.cache_leftpad = cache_leftpad;
        flashattn::kvcache_forward_on(device, &q.view(), &mut cache, &opts)?
    };
    let outputs: Vec<(&str, &Tensor)> =
        vec![("o", &out.o), ("lse", &out.lse), ("k_cache", &k_cache), ("v_cache", &v_cache)];
    write_safetensors(&a.output, &outputs)?;
    println!("wrote o, lse, k_cache, v_cache to {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}
