//! Kernel variants and their compilation by NVRTC to a cubin for one architecture.
//!
//! The kernel sources are embedded in the binary (`include_str!`); the headers they include are handed to
//! NVRTC as header sources, so no CUDA toolkit headers are needed, only `libnvrtc`.

use crate::error::{Error, Result};
use cudarc::nvrtc::sys as nv;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::time::Instant;

/// The kernel sources and the headers they include, as `(include name, text)`.
pub(crate) const HEADERS: [(&str, &str); 8] = [
    ("variant.cuh", include_str!("../../kernels/variant.cuh")),
    ("params.cuh", include_str!("../../kernels/params.cuh")),
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("mask.cuh", include_str!("../../kernels/mask.cuh")),
    ("bwd_common.cuh", include_str!("../../kernels/bwd_common.cuh")),
    ("sm90/sync.cuh", include_str!("../../kernels/sm90/sync.cuh")),
    ("sm90/wgmma.cuh", include_str!("../../kernels/sm90/wgmma.cuh")),
    ("sm90/gemm.cuh", include_str!("../../kernels/sm90/gemm.cuh")),
];
const FWD_SRC: &str = include_str!("../../kernels/fwd.cu");
const BWD_SRC: &str = include_str!("../../kernels/bwd.cu");
const KV_SRC: &str = include_str!("../../kernels/kvcache.cu");
const FWD_SM90_SRC: &str = include_str!("../../kernels/fwd_sm90.cu");
const BWD_SM90_SRC: &str = include_str!("../../kernels/bwd_sm90.cu");

pub use super::tiles::{padded_head_dim, value_head_dim, HEAD_DIMS, VALUE_DIM_PAIRS};

/// Which kernel source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pass {
    /// `fwd.cu`: `flash_fwd`.
    Fwd,
    /// `bwd.cu`: `flash_bwd_preprocess`, `flash_bwd_main`, `flash_bwd_convert_dq`.
    Bwd,
    /// `kvcache.cu`: `kv_append`, `kv_attn`, `kv_fill` (KV-cache attention; `varlen` and `deterministic`
    /// are unused).
    KvCache,
    /// `fwd_sm90.cu`: `flash_fwd_sm90` (Hopper only: compiled for `sm_90a` alone).
    FwdSm90,
    /// `bwd_sm90.cu`: `flash_bwd_sm90`, the backward's main kernel on Hopper (`sm_90a` alone; head dims 64,
    /// 128 and 256; deterministic mode too). Its preprocess and dQ conversion are `bwd.cu`'s.
    BwdSm90,
}

impl Pass {
    /// Whether this pass's kernels can be compiled for `arch` (`sm_80`, `sm_90a`, ...).
    pub fn builds_for(&self, arch: &str) -> bool {
        match self {
            Pass::FwdSm90 | Pass::BwdSm90 => arch == "sm_90a",
            Pass::Fwd | Pass::Bwd | Pass::KvCache => true,
        }
    }
}

/// One compiled specialisation of a kernel source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    /// Forward or backward.
    pub pass: Pass,
    /// Padded head dim (one of [`HEAD_DIMS`]).
    pub head_dim: usize,
    /// Padded value head dim of the sm80-class forward and backward when the problem's `d_v` differs from `d`
    /// (`-DHEAD_DIM_V`; `(head_dim, v)` one of [`VALUE_DIM_PAIRS`]): the kernels then read the runtime `d_v`
    /// from a field of its own. `None`: the value head dim is `d` (no macro). Ignored by the other passes.
    pub head_dim_v: Option<usize>,
    /// bf16 (else f16).
    pub bf16: bool,
    /// Causal / sliding-window masking.
    pub mask: bool,
    /// ALiBi.
    pub alibi: bool,
    /// Soft-capping.
    pub softcap: bool,
    /// Variable-length batches.
    pub varlen: bool,
    /// Deterministic backward (ignored for the forward).
    pub deterministic: bool,
    /// 16-byte aligned pointers and strides (vector loads); else element-wise accesses.
    pub aligned16: bool,
    /// The sm90 forward at head dim 64 with 3 consumer warpgroups and 192-row query tiles
    /// (`-DSM90_CONSUMERS=3`; the default at head dim 64, [`crate::Tuning::sm90_d64_bm192`] turns it off).
    /// Ignored by every other pass and head dim.
    pub bm192: bool,
    /// The sm90 forward with FA3's wider K/V blocks ([`super::tiles::wide_block_n`]): 176 keys at head dim 128
    /// (128 x 176 tiles; chosen without a mask from 8k keys) and 80 at head dim 256 (128 x 80 tiles; chosen without
    /// a mask, and with one from 2k keys),
    /// `-DSM90_BN_OVERRIDE=176|80`; [`crate::Tuning::sm90_wide_kv_d128`] / `_d256` force either form. Ignored by
    /// every other pass and head dim.
    pub wide_n: bool,
    /// Pipeline stages of the KV-cache kernel (`-DKV_STAGES`): `None` is the head dim's default
    /// ([`super::tiles::default_stages`]), `Some(n)` a tuning override ([`crate::Tuning::kv_stages`], 2..=8).
    /// Ignored by every other pass.
    pub kv_stages: Option<u8>,
    /// Extra NVRTC options of the compilation ([`crate::Tuning::nvrtc_options`]); empty by default.
    pub nvrtc: NvrtcExtra,
    /// The backward with a learnable sink (`-DHAS_SINK=1`): its main kernels also sum `dsink`, and bwd.cu's
    /// module exports `flash_bwd_dsink`. Ignored by the forward passes (they read the sink pointer at run time).
    pub sink: bool,
    /// The KV-cache kernels over float8_e4m3fn caches (`-DKV_FP8=1`: 1-byte K/V rows widened to 16 bits in
    /// shared memory, per-head descales; sm_89 and newer). Ignored by every other pass.
    pub kv_fp8: bool,
    /// The backward writing `dq`, `dk`, `dv` as f32 (`-DGRAD_F32=1`; ring attention's partial gradients, summed
    /// before one rounding). Ignored by the forward passes.
    pub grad_f32: bool,
    /// The forward writing `o` as f32 for 16-bit inputs (`-DOUT_F32=1`; ring attention's partial outputs, merged
    /// before one rounding). Ignored by the other passes.
    pub out_f32: bool,
}

/// A list of extra NVRTC options, interned so that [`Variant`] stays `Copy` and hashable: each distinct list is
/// stored once for the life of the process (a handful of lists in practice: each one is a separate set of
/// compiled kernels anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NvrtcExtra(&'static [String]);

impl NvrtcExtra {
    /// The interned form of `options` (empty: no extra options).
    pub fn new(options: &[String]) -> Self {
        if options.is_empty() {
            return NvrtcExtra::default();
        }
        static LISTS: std::sync::Mutex<Vec<&'static [String]>> = std::sync::Mutex::new(Vec::new());
        let mut lists = LISTS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = lists.iter().find(|l| **l == options) {
            return NvrtcExtra(l);
        }
        let l: &'static [String] = Box::leak(options.to_vec().into_boxed_slice());
        lists.push(l);
        NvrtcExtra(l)
    }

    /// The options, in order.
    pub fn options(&self) -> &'static [String] {
        self.0
    }

    /// A short stable tag of the list for variant names (hex of a hash of the options).
    fn tag(&self) -> String {
        let h = self.0.iter().fold(Fnv::new(3), |f, o| f.bytes(o.as_bytes())).finish();
        format!("{:08x}", h as u32)
    }
}

/// 64-bit FNV-1a, seeded; stable across Rust versions (unlike `DefaultHasher`).
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new(seed: u64) -> Self {
        Fnv(0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    pub(crate) fn bytes(mut self, b: &[u8]) -> Self {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Length-delimit so ("ab", "c") and ("a", "bc") differ.
        for &x in &(b.len() as u64).to_le_bytes() {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    pub(crate) fn finish(self) -> u64 {
        self.0
    }
}

impl Variant {
    /// Whether this variant can be compiled for `arch` (`sm_80`, `sm_90a`, ...): its pass builds there, and the
    /// e4m3 KV-cache kernels need sm_89 or newer (the e4m3 conversions).
    pub fn builds_for(&self, arch: &str) -> bool {
        self.pass.builds_for(arch) && !(self.pass == Pass::KvCache && self.kv_fp8 && !arch_at_least(arch, 89))
    }

    /// This variant with the score features of `bits` (1 mask, 2 ALiBi, 4 soft-cap, 8 varlen) and
    /// `deterministic`.
    fn with_features(self, bits: u32, deterministic: bool) -> Self {
        Variant {
            mask: bits & 1 != 0,
            alibi: bits & 2 != 0,
            softcap: bits & 4 != 0,
            varlen: bits & 8 != 0,
            deterministic,
            ..self
        }
    }

    /// The plain, aligned variant of a pass.
    pub fn plain(pass: Pass, head_dim: usize, bf16: bool) -> Self {
        Variant {
            pass,
            head_dim,
            head_dim_v: None,
            bf16,
            mask: false,
            alibi: false,
            softcap: false,
            varlen: false,
            deterministic: false,
            aligned16: true,
            bm192: false,
            wide_n: false,
            kv_stages: None,
            nvrtc: NvrtcExtra::default(),
            sink: false,
            kv_fp8: false,
            grad_f32: false,
            out_f32: false,
        }
    }

    /// This variant with the compile-time parts of a call's tuning: its extra NVRTC options and, for the
    /// KV-cache pass, its pipeline stage override.
    pub fn tuned(self, t: &crate::tuning::Tuning) -> Self {
        let kv_stages = match (self.pass, t.kv_stages) {
            (Pass::KvCache, Some(s)) => Some(s.clamp(2, 8) as u8),
            _ => None,
        };
        Variant { kv_stages, nvrtc: NvrtcExtra::new(&t.nvrtc_options), ..self }
    }

    /// Whether this variant is the 192-row sm90 forward (`bm192` where it applies: FwdSm90 at head dim 64).
    pub fn is_bm192(&self) -> bool {
        self.bm192 && self.pass == Pass::FwdSm90 && self.head_dim == 64
    }

    /// The padded value head dim of a sm80-class forward or backward variant with a value head dim of its own
    /// (`head_dim_v` where it applies); `None` otherwise.
    pub fn value_dim(&self) -> Option<usize> {
        match self.pass {
            Pass::Fwd | Pass::Bwd => self.head_dim_v,
            _ => None,
        }
    }

    /// Pipeline stages of a KV-cache variant (`KV_STAGES`): the override, else the head dim's default.
    pub fn stages(&self) -> u32 {
        self.kv_stages.map_or_else(|| super::tiles::default_stages(self.head_dim), u32::from)
    }

    /// Keys per K/V block when this variant is the sm90 forward's wide form (`wide_n` where it applies:
    /// FwdSm90 at a head dim that has one, 176 at 128 and 80 at 256); `None` otherwise.
    pub fn wide_block_n(&self) -> Option<usize> {
        if self.wide_n && self.pass == Pass::FwdSm90 {
            super::tiles::wide_block_n(self.head_dim)
        } else {
            None
        }
    }

    /// The source file's text.
    pub(crate) fn source(&self) -> (&'static str, &'static str) {
        match self.pass {
            Pass::Fwd => ("fwd.cu", FWD_SRC),
            Pass::Bwd => ("bwd.cu", BWD_SRC),
            Pass::KvCache => ("kvcache.cu", KV_SRC),
            Pass::FwdSm90 => ("fwd_sm90.cu", FWD_SM90_SRC),
            Pass::BwdSm90 => ("bwd_sm90.cu", BWD_SM90_SRC),
        }
    }

    /// The `-D` macros of this variant (without the `-D`).
    pub fn defines(&self) -> Vec<String> {
        let b = |x: bool| x as i32;
        let mut v = vec![
            format!("HEAD_DIM={}", self.head_dim),
            format!("IS_BF16={}", b(self.bf16)),
            format!("HAS_MASK={}", b(self.mask)),
            format!("HAS_ALIBI={}", b(self.alibi)),
            format!("HAS_SOFTCAP={}", b(self.softcap)),
            format!("IS_VARLEN={}", b(self.varlen)),
            format!("ALIGNED16={}", b(self.aligned16)),
        ];
        if let Some(hv) = self.value_dim() {
            v.push(format!("HEAD_DIM_V={hv}"));
        }
        if matches!(self.pass, Pass::Bwd | Pass::BwdSm90) {
            v.push(format!("DETERMINISTIC={}", b(self.deterministic)));
            if self.sink {
                v.push("HAS_SINK=1".to_string());
            }
            if self.grad_f32 {
                v.push("GRAD_F32=1".to_string());
            }
        }
        if self.out_f32 && matches!(self.pass, Pass::Fwd | Pass::FwdSm90) {
            v.push("OUT_F32=1".to_string());
        }
        if self.pass == Pass::KvCache {
            v.push(format!("KV_STAGES={}", self.stages()));
            if self.kv_fp8 {
                v.push("KV_FP8=1".to_string());
            }
        }
        if self.is_bm192() {
            v.push("SM90_CONSUMERS=3".to_string());
        }
        if let Some(bn) = self.wide_block_n() {
            v.push(format!("SM90_BN_OVERRIDE={bn}"));
        }
        v
    }

    /// The kernels this variant's module exports.
    pub fn entry_points(&self) -> &'static [&'static str] {
        match self.pass {
            Pass::Fwd => &["flash_fwd"],
            Pass::Bwd if self.sink => {
                &["flash_bwd_preprocess", "flash_bwd_main", "flash_bwd_convert_dq", "flash_bwd_dsink"]
            }
            Pass::Bwd => &["flash_bwd_preprocess", "flash_bwd_main", "flash_bwd_convert_dq"],
            Pass::KvCache => &["kv_append", "kv_attn", "kv_fill"],
            Pass::FwdSm90 => &["flash_fwd_sm90"],
            Pass::BwdSm90 => &["flash_bwd_sm90"],
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pass = match self.pass {
            Pass::Fwd => "fwd",
            Pass::Bwd => "bwd",
            Pass::KvCache => "kv",
            Pass::FwdSm90 => "fwd90",
            Pass::BwdSm90 => "bwd90",
        };
        write!(f, "{pass}_d{}", self.head_dim)?;
        if let Some(hv) = self.value_dim() {
            write!(f, "v{hv}")?;
        }
        if self.is_bm192() {
            write!(f, "_bm192")?;
        }
        if let Some(bn) = self.wide_block_n() {
            write!(f, "_bn{bn}")?;
        }
        if let (Pass::KvCache, Some(s)) = (self.pass, self.kv_stages) {
            write!(f, "_st{s}")?;
        }
        write!(f, "_{}", if self.bf16 { "bf16" } else { "f16" })?;
        if self.pass == Pass::KvCache && self.kv_fp8 {
            write!(f, "_e4m3")?;
        }
        for (on, name) in [
            (self.mask, "mask"),
            (self.alibi, "alibi"),
            (self.softcap, "softcap"),
            (self.varlen, "varlen"),
            (self.deterministic && matches!(self.pass, Pass::Bwd | Pass::BwdSm90), "det"),
            (self.sink && matches!(self.pass, Pass::Bwd | Pass::BwdSm90), "sink"),
            (self.grad_f32 && matches!(self.pass, Pass::Bwd | Pass::BwdSm90), "g32"),
            (self.out_f32 && matches!(self.pass, Pass::Fwd | Pass::FwdSm90), "o32"),
            (!self.aligned16, "unaligned"),
        ] {
            if on {
                write!(f, "_{name}")?;
            }
        }
        if !self.nvrtc.options().is_empty() {
            write!(f, "_x{}", self.nvrtc.tag())?;
        }
        Ok(())
    }
}

/// The number of an architecture name (`sm_90a` -> 90); 0 when it has none.
fn arch_number(arch: &str) -> u32 {
    arch.trim_start_matches("sm_").trim_start_matches("compute_").trim_end_matches(['a', 'f']).parse().unwrap_or(0)
}

/// Whether architecture `arch` (`sm_80`, `sm_90a`, ...) is `sm_<n>` or newer.
pub(crate) fn arch_at_least(arch: &str, n: u32) -> bool {
    arch_number(arch) >= n
}

/// The KV-cache variant with these flags (`varlen` and `deterministic` off).
pub fn kv_variant(head_dim: usize, bf16: bool, mask: bool, alibi: bool, softcap: bool, aligned16: bool) -> Variant {
    Variant { mask, alibi, softcap, aligned16, ..Variant::plain(Pass::KvCache, head_dim, bf16) }
}

/// Every variant the kernels support: head dims (and the value head dim pairs of [`VALUE_DIM_PAIRS`]) x dtypes
/// x (mask, alibi, softcap, varlen), aligned, plus the unaligned (element-wise) forms, forward and backward
/// (backward also x deterministic), and the KV-cache kernels (head dims x dtypes x (mask, alibi, softcap) x aligned
/// or not, over 16-bit or e4m3 caches).
pub fn all_variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for &hd in &HEAD_DIMS {
        for bf16 in [false, true] {
            for bits in 0..8u32 {
                for aligned16 in [true, false] {
                    for kv_fp8 in [false, true] {
                        let v = kv_variant(hd, bf16, bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, aligned16);
                        out.push(Variant { kv_fp8, ..v });
                    }
                }
            }
        }
    }
    for p in sm80_plain().chain(value_dim_plain()) {
        for bits in 0..16u32 {
            for aligned16 in [true, false] {
                for deterministic in [false, true] {
                    if p.pass == Pass::Fwd && deterministic {
                        continue;
                    }
                    out.push(Variant { aligned16, ..p.with_features(bits, deterministic) });
                }
            }
        }
    }
    out.extend(sm90_variants());
    out
}

/// The Hopper passes and the head dims each is compiled for.
const SM90_PASSES: [(Pass, &[usize]); 2] =
    [(Pass::FwdSm90, &super::tiles::SM90_HEAD_DIMS), (Pass::BwdSm90, &super::tiles::SM90_BWD_HEAD_DIMS)];

/// The plain variant of every Hopper pass, head dim and dtype, then the forward's 192-row form at head dim 64
/// and its wide-key-block forms at head dims 128 (176 keys) and 256 (80 keys), both dtypes.
fn sm90_plain() -> impl Iterator<Item = Variant> {
    let bm192 = [false, true].map(|bf16| Variant { bm192: true, ..Variant::plain(Pass::FwdSm90, 64, bf16) });
    let wide = [128, 256]
        .into_iter()
        .flat_map(|hd| [false, true].map(|bf16| Variant { wide_n: true, ..Variant::plain(Pass::FwdSm90, hd, bf16) }));
    SM90_PASSES
        .into_iter()
        .flat_map(|(pass, dims)| {
            dims.iter().flat_map(move |&hd| [false, true].map(|bf16| Variant::plain(pass, hd, bf16)))
        })
        .chain(bm192)
        .chain(wide)
}

/// The sm90 variants (Hopper only), forward and backward: their head dims x dtypes x (mask, alibi, softcap,
/// varlen), the backward also deterministic; the forward's 192-row form at head dim 64 and wide-key-block forms
/// at head dims 128 and 256 likewise.
pub fn sm90_variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for p in sm90_plain() {
        for bits in 0..32u32 {
            let deterministic = bits & 16 != 0;
            if deterministic && p.pass != Pass::BwdSm90 {
                continue;
            }
            out.push(p.with_features(bits, deterministic));
        }
    }
    out
}

/// The plain variant of the sm80-class forward and backward at every head dim and dtype.
fn sm80_plain() -> impl Iterator<Item = Variant> {
    [Pass::Fwd, Pass::Bwd]
        .into_iter()
        .flat_map(|pass| HEAD_DIMS.iter().flat_map(move |&hd| [false, true].map(|bf16| Variant::plain(pass, hd, bf16))))
}

/// The plain variant of the sm80-class forward and backward with a value head dim of its own: every pair of
/// [`VALUE_DIM_PAIRS`] and dtype.
fn value_dim_plain() -> impl Iterator<Item = Variant> {
    [Pass::Fwd, Pass::Bwd].into_iter().flat_map(|pass| {
        VALUE_DIM_PAIRS.iter().flat_map(move |&(hd, hv)| {
            [false, true].map(|bf16| Variant { head_dim_v: Some(hv), ..Variant::plain(pass, hd, bf16) })
        })
    })
}

/// Two KV-cache variants at every head dim and dtype: `forms` gives their (mask, alibi, softcap, aligned16).
fn kv_pairs(forms: [(bool, bool, bool, bool); 2]) -> impl Iterator<Item = Variant> {
    HEAD_DIMS.iter().flat_map(move |&hd| {
        [false, true].into_iter().flat_map(move |bf16| forms.map(|(m, a, s, al)| kv_variant(hd, bf16, m, a, s, al)))
    })
}

/// A plain variant and its causal form.
fn with_causal(p: Variant) -> [Variant; 2] {
    [p, Variant { mask: true, ..p }]
}

/// The forms of a plain variant that CI compiles: itself, causal, every feature at once; the unaligned form of
/// the sm80-class passes (the Hopper kernels need 16-byte alignment), the forward with an f32 output, the
/// deterministic causal backward and the backward with f32 gradients.
fn representative_forms(p: Variant) -> Vec<Variant> {
    let mut out =
        vec![p, Variant { mask: true, ..p }, Variant { mask: true, alibi: true, softcap: true, varlen: true, ..p }];
    if matches!(p.pass, Pass::Fwd | Pass::Bwd) {
        out.push(Variant { aligned16: false, ..p });
    }
    if matches!(p.pass, Pass::Fwd | Pass::FwdSm90) {
        // Ring attention's partial outputs: f32 o (causal and soft-capped, as the ring runs them).
        out.push(Variant { out_f32: true, mask: true, softcap: true, ..p });
    }
    if matches!(p.pass, Pass::Bwd | Pass::BwdSm90) {
        out.push(Variant { deterministic: true, mask: true, ..p });
        // Ring attention's partial gradients: f32 dq, dk, dv (causal and soft-capped, as the ring runs them).
        out.push(Variant { grad_f32: true, mask: true, softcap: true, ..p });
    }
    out
}

/// A representative subset (every head dim, value head dim pair and dtype; each feature on its own and all together; the
/// unaligned and deterministic forms of the plain kernel): what CI compiles for each architecture.
pub fn representative_variants() -> Vec<Variant> {
    sm80_plain()
        .chain(value_dim_plain())
        .flat_map(representative_forms)
        .chain(kv_pairs([(false, false, false, true), (true, true, true, false)]))
        .chain(
            kv_pairs([(false, false, false, true), (true, true, true, false)]).map(|v| Variant { kv_fp8: true, ..v }),
        )
        .chain(sm90_plain().flat_map(representative_forms))
        .collect()
}

/// The variants whose speed matters most (plain and causal, aligned, both dtypes, every head dim and value head
/// dim pair): these must not spill registers.
pub fn hot_variants() -> Vec<Variant> {
    sm80_plain()
        .chain(value_dim_plain())
        .flat_map(with_causal)
        .chain(kv_pairs([(false, false, false, true), (true, false, false, true)]))
        .chain(sm90_plain().flat_map(with_causal))
        .collect()
}

/// The NVRTC options of a variant for an architecture (`sm_80`, `sm_90a`, ...).
pub fn options(v: &Variant, arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--use_fast_math".to_string(),
        "-default-device".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    o.extend(v.defines().into_iter().map(|d| format!("-D{d}")));
    // The call's extra options ([`crate::Tuning::nvrtc_options`]) come last, so that a `-D` among them is seen
    // after the variant's own; they are part of the cache key like every other option.
    o.extend(v.nvrtc.options().iter().cloned());
    o
}

/// Register use of one kernel, from the `ptxas -v` log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelUsage {
    /// Entry point.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Spill stores, bytes.
    pub spill_stores: u32,
    /// Spill loads, bytes.
    pub spill_loads: u32,
    /// Static shared memory, bytes.
    pub smem: u32,
    /// ptxas serialised the kernel's `wgmma.mma_async` instructions (its "Potential Performance Loss" note,
    /// C7515 and kin): every wgmma then waits for the one before, which takes away the overlap the sm90 kernels
    /// are built on. It happens when ptxas cannot prove, along every control path, that no other instruction
    /// touches the accumulators of a wgmma in flight (`docs/notes/cuda-sm90.md`).
    pub wgmma_serialized: bool,
}

impl KernelUsage {
    /// Whether the kernel spills registers.
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// The kernel a ptxas note names (`... in the function 'NAME'` or `... in function 'NAME'`).
fn function_named(line: &str) -> Option<&str> {
    let i = line.rfind("function '")?;
    line[i + "function '".len()..].split('\'').next()
}

fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let i = line.find(suffix)?;
    let head = line[..i].trim_end();
    let start = head.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |p| p + 1);
    head[start..].parse().ok()
}

/// Parses a `ptxas -v` log into per-kernel register and spill counts, and which kernels ptxas serialised the
/// wgmma instructions of (its notes come before the kernel's own lines and name the function; a note naming
/// none marks every kernel of the log).
pub fn parse_usage(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let mut serialized: Vec<Option<String>> = Vec::new();
    let mut in_kernel = true;
    for line in log.lines() {
        if line.contains("wgmma.mma_async instructions are serialized") {
            serialized.push(function_named(line).map(str::to_string));
            continue;
        }
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelUsage {
                kernel: name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                smem: 0,
                wgmma_serialized: false,
            });
            continue;
        }
        // A non-inlined device function's own properties follow its caller's: they are not the kernel's.
        if let Some(i) = line.find("Function properties for ") {
            let name = line[i + "Function properties for ".len()..].trim();
            in_kernel = out.last().is_some_and(|k| k.kernel == name);
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if !in_kernel {
            continue;
        }
        if let Some(n) = number_before(line, "bytes spill stores") {
            cur.spill_stores = n;
        }
        if let Some(n) = number_before(line, "bytes spill loads") {
            cur.spill_loads = n;
        }
        if let Some(i) = line.find("Used ") {
            if let Some(n) = number_before(&line[i..], "registers") {
                cur.registers = n;
            }
        }
        if let Some(n) = number_before(line, "bytes smem") {
            cur.smem = n;
        }
    }
    for k in &mut out {
        // A note applies to the kernel it names, or to every kernel when it names none.
        k.wgmma_serialized = serialized.iter().any(|f| !matches!(f, Some(name) if *name != k.kernel));
    }
    out
}

/// The output of one compilation.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The cubin.
    pub cubin: Vec<u8>,
    /// NVRTC's log (ptxas `-v` output included).
    pub log: String,
}

/// Folders an embedding adds to the NVRTC search ([`add_nvrtc_dirs`]).
static NVRTC_DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
/// Where libnvrtc was found: `None` until found, then the file (or "the loader path").
static NVRTC_FOUND_AT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Adds folders to search for libnvrtc after the loader path (an embedding that ships or finds a copy: the
/// Python package passes the `lib` folders of the NVIDIA wheels installed beside PyTorch). Call before the
/// first kernel is needed.
pub fn add_nvrtc_dirs(dirs: &[std::path::PathBuf]) {
    NVRTC_DIRS.lock().unwrap_or_else(|e| e.into_inner()).extend(dirs.iter().cloned());
}

/// Where libnvrtc was found (a file, or "the loader path"), once a kernel compile or [`nvrtc_present`] has
/// looked for it.
pub fn nvrtc_location() -> Option<String> {
    NVRTC_FOUND_AT.get().cloned()
}

/// The one search for libnvrtc, in order: the loader path (libraries already loaded, `LD_LIBRARY_PATH`, the
/// system's), then each folder of [`add_nvrtc_dirs`] (`libnvrtc.so.<major>`, then `libnvrtc.so`). A copy found
/// in a folder is loaded with global symbols and kept loaded, so the bindings' own lookup by name finds it.
fn find_nvrtc() -> Option<String> {
    // SAFETY: only opens the library.
    if std::panic::catch_unwind(|| unsafe { nv::is_culib_present() }).unwrap_or(false) {
        return Some("the loader path".into());
    }
    let dirs = NVRTC_DIRS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for dir in dirs {
        for name in ["libnvrtc.so.13", "libnvrtc.so"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            // SAFETY: loading NVRTC runs no initialisers with preconditions; the handle is leaked on purpose
            // (the library stays loaded for the process's life).
            let lib = unsafe {
                libloading::os::unix::Library::open(
                    Some(&path),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
            };
            if let Ok(lib) = lib {
                std::mem::forget(lib);
                // SAFETY: as above.
                if std::panic::catch_unwind(|| unsafe { nv::is_culib_present() }).unwrap_or(false) {
                    return Some(path.display().to_string());
                }
            }
        }
    }
    None
}

/// Whether libnvrtc can be loaded here ([`find_nvrtc`]'s order). A positive answer is remembered (the probe
/// tries many library names with `dlopen`, which every launch path would otherwise repeat).
pub fn nvrtc_present() -> bool {
    if NVRTC_FOUND_AT.get().is_some() {
        return true;
    }
    match find_nvrtc() {
        Some(at) => {
            let _ = NVRTC_FOUND_AT.set(at);
            true
        }
        None => false,
    }
}

fn nvrtc_unavailable() -> Error {
    Error::BackendUnavailable {
        backend: "cuda",
        reason: "libnvrtc was not found on the loader path (install the CUDA runtime compiler, e.g. the \
                 `nvidia-cuda-nvrtc` wheel, and add its lib folder to LD_LIBRARY_PATH)"
            .into(),
    }
}

/// NVRTC's version `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(nvrtc_unavailable());
    }
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: the library is present; both pointers are valid for writes.
    let r = unsafe { nv::nvrtcVersion(&mut major, &mut minor) };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Device(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok((major, minor))
}

/// The architectures this NVRTC can compile for, as `sm_XY` numbers (e.g. 80, 90).
pub fn supported_archs() -> Result<Vec<i32>> {
    nvrtc_version()?;
    let mut n: c_int = 0;
    // SAFETY: library present; valid out-pointer; then a buffer of `n` ints.
    unsafe {
        if nv::nvrtcGetNumSupportedArchs(&mut n) != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Device("nvrtcGetNumSupportedArchs failed".into()));
        }
        let mut v = vec![0 as c_int; n.max(0) as usize];
        if n > 0 && nv::nvrtcGetSupportedArchs(v.as_mut_ptr()) != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Device("nvrtcGetSupportedArchs failed".into()));
        }
        Ok(v)
    }
}

/// An NVRTC program, destroyed on drop.
struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once.
        unsafe {
            nv::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn c_string(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Device(format!("NUL byte in NVRTC input {s:?}")))
}

/// Compiles one variant for `arch` (`sm_80`, `sm_90a`, ...) to a cubin.
pub fn compile(v: &Variant, arch: &str) -> Result<Compiled> {
    compile_with(v, arch, "")
}

/// The name prefix of the empty kernel [`compile_fresh`] appends.
pub const FRESH_KERNEL_PREFIX: &str = "fa_fresh_compile_";

/// Compiles one variant for `arch` so that ptxas really runs and its `-v` report is in the log. NVRTC 12.9
/// and later can serve a program from a cache of its own, and such a program comes back with an empty log
/// (seen on the GPU machine: a "compile" of 0.04 s with no ptxas report for a kernel another process had
/// just compiled); an empty kernel with a name unique to this call (`fa_fresh_compile_...`) makes source and
/// PTX new to any cache. For checks of registers, spills and wgmma serialisation; the kernels' own cache is
/// not involved and [`parse_usage`] of the log lists the extra kernel too.
pub fn compile_fresh(v: &Variant, arch: &str) -> Result<Compiled> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    compile_with(v, arch, &format!("\nextern \"C\" __global__ void {FRESH_KERNEL_PREFIX}{pid}_{nanos}_{n}() {{}}\n"))
}

/// Compiles a variant's source with `suffix` appended.
fn compile_with(v: &Variant, arch: &str, suffix: &str) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(nvrtc_unavailable());
    }
    let (name, src) = v.source();
    let src_c = if suffix.is_empty() { c_string(src)? } else { c_string(&format!("{src}{suffix}"))? };
    let name_c = c_string(name)?;
    let hdr_src: Vec<CString> = HEADERS.iter().map(|(_, t)| c_string(t)).collect::<Result<_>>()?;
    let hdr_name: Vec<CString> = HEADERS.iter().map(|(n, _)| c_string(n)).collect::<Result<_>>()?;
    let hdr_src_p: Vec<*const c_char> = hdr_src.iter().map(|s| s.as_ptr()).collect();
    let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|s| s.as_ptr()).collect();
    let opts: Vec<CString> = options(v, arch).iter().map(|o| c_string(o)).collect::<Result<_>>()?;
    let opts_p: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    let t0 = Instant::now();
    // SAFETY: every pointer refers to a NUL-terminated string that outlives the calls; the program
    // handle is destroyed by `Program`'s drop.
    unsafe {
        let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
        let r = nv::nvrtcCreateProgram(
            &mut prog,
            src_c.as_ptr(),
            name_c.as_ptr(),
            hdr_src_p.len() as c_int,
            hdr_src_p.as_ptr(),
            hdr_name_p.as_ptr(),
        );
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Device(format!("nvrtcCreateProgram({v}): {r:?}")));
        }
        let prog = Program(prog);
        let r = nv::nvrtcCompileProgram(prog.0, opts_p.len() as c_int, opts_p.as_ptr());
        let mut n = 0usize;
        let mut log = String::new();
        if nv::nvrtcGetProgramLogSize(prog.0, &mut n) == nv::nvrtcResult::NVRTC_SUCCESS && n > 1 {
            let mut buf = vec![0 as c_char; n];
            if nv::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr()) == nv::nvrtcResult::NVRTC_SUCCESS {
                log = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
            }
        }
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Device(format!("NVRTC failed to compile {v} for {arch} ({r:?}):\n{log}")));
        }
        let mut n = 0usize;
        let r = nv::nvrtcGetCUBINSize(prog.0, &mut n);
        if r != nv::nvrtcResult::NVRTC_SUCCESS || n == 0 {
            return Err(Error::Device(format!(
                "NVRTC produced no cubin for {v} ({r:?}); is `{arch}` a real architecture (sm_XY)?"
            )));
        }
        let mut cubin = vec![0u8; n];
        let r = nv::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char);
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(Error::Device(format!("nvrtcGetCUBIN({v}): {r:?}")));
        }
        let _ = t0;
        Ok(Compiled { cubin, log })
    }
}

/// The architecture name to compile for, for compute capability `(major, minor)`: `sm_90a` on Hopper
/// (the `a` features), `sm_XY` elsewhere.
pub fn arch_for(cc: (i32, i32)) -> String {
    match cc {
        (9, 0) => "sm_90a".to_string(),
        (ma, mi) => format!("sm_{ma}{mi}"),
    }
}

/// Parses `sm_80`, `sm_90a`, `80`, `compute_90a` style names into a canonical `sm_XY[a]`.
pub fn canonical_arch(s: &str) -> Result<String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_start_matches("sm_").trim_start_matches("compute_").trim_start_matches("sm");
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let rest = &t[digits.len()..];
    let ok = !digits.is_empty() && digits.len() <= 3 && (rest.is_empty() || rest == "a" || rest == "f");
    match digits.parse::<u32>() {
        Ok(n) if ok && n >= 80 => Ok(format!("sm_{n}{rest}")),
        _ => Err(Error::invalid("arch", "an architecture like sm_80, sm_86, sm_89 or sm_90a (8.0 or newer)", s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'flash_fwd' for 'sm_80'\n\
ptxas info    : Function properties for flash_fwd\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size, 560 bytes cmem[0]\n";
        let u = parse_usage(log);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].kernel, "flash_fwd");
        assert_eq!((u[0].registers, u[0].spill_stores, u[0].spill_loads), (255, 4, 12));
        assert!(u[0].spills());
        // A non-inlined device function's properties after the kernel's are not the kernel's.
        let log = "ptxas info    : Compiling entry function 'kv_attn' for 'sm_90a'\n\
ptxas info    : Function properties for kv_attn\n\
ptxas         .     24 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads\n\
ptxas info    : Used 128 registers, used 1 barriers, 24 bytes cumulative stack size\n\
ptxas info    : Function properties for _ZN2kv14combine_splitsE\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Compiling entry function 'kv_append' for 'sm_90a'\n\
ptxas info    : Function properties for kv_append\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 30 registers, used 1 barriers\n";
        let u = parse_usage(log);
        assert_eq!(u.len(), 2);
        assert_eq!((u[0].registers, u[0].spill_stores, u[0].spill_loads), (128, 24, 24));
        assert_eq!((u[1].kernel.as_str(), u[1].registers, u[1].spills()), ("kv_append", 30, false));
        assert!(!u[0].wgmma_serialized && !u[1].wgmma_serialized);
        // ptxas's serialisation note (seen on an experimental sm90 forward) comes before the kernel's lines.
        let log = "ptxas info    : (C7517) warpgroup.wait is injected in around line 3573 by compiler to allow use of \
registers defined by GMMA in function 'flash_fwd_sm90'\n\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma \
instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function \
'flash_fwd_sm90'\n\
ptxas info    : 62 bytes gmem\n\
ptxas info    : Compiling entry function 'flash_fwd_sm90' for 'sm_90a'\n\
ptxas info    : Function properties for flash_fwd_sm90\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 168 registers, used 16 barriers\n\
ptxas info    : Compiling entry function 'other' for 'sm_90a'\n\
ptxas info    : Used 30 registers\n";
        let u = parse_usage(log);
        assert_eq!(u.len(), 2);
        assert!(u[0].wgmma_serialized && !u[0].spills() && u[0].registers == 168);
        assert!(!u[1].wgmma_serialized);
        // A note that names no function marks every kernel.
        let u = parse_usage(
            "wgmma.mma_async instructions are serialized due to the presence of Extern calls\n\
ptxas info    : Compiling entry function 'a' for 'sm_90a'\n\
ptxas info    : Compiling entry function 'b' for 'sm_90a'\n",
        );
        assert!(u.iter().all(|k| k.wgmma_serialized));
    }

    #[test]
    fn tile_shape_variants() {
        // The 192-row form at head dim 64 and the wide-key-block forms at head dims 128 (176 keys) and 256 (80
        // keys): (head dim, name tag, its define, the other flag's define, head dims where its flag means
        // nothing); `set` turns on the form of head dim `hd`.
        let set =
            |v: Variant, hd: usize| if hd == 64 { Variant { bm192: true, ..v } } else { Variant { wide_n: true, ..v } };
        let forms = [
            (64, "bm192", "SM90_CONSUMERS=3", "SM90_BN_OVERRIDE", &[128, 256][..]),
            (128, "bn176", "SM90_BN_OVERRIDE=176", "SM90_CONSUMERS", &[64][..]),
            (256, "bn80", "SM90_BN_OVERRIDE=80", "SM90_CONSUMERS", &[64][..]),
        ];
        let is_form = |x: &Variant| x.is_bm192() || x.wide_block_n().is_some();
        for (hd, tag, define, other, meaningless) in forms {
            let key = define.split('=').next().unwrap();
            for bf16 in [false, true] {
                let dt = if bf16 { "bf16" } else { "f16" };
                let v = Variant::plain(Pass::FwdSm90, hd, bf16);
                let w = set(v, hd);
                assert_eq!(v.to_string(), format!("fwd90_d{hd}_{dt}"));
                assert_eq!(w.to_string(), format!("fwd90_d{hd}_{tag}_{dt}"));
                assert_eq!(Variant { mask: true, ..w }.to_string(), format!("fwd90_d{hd}_{tag}_{dt}_mask"));
                assert_eq!(
                    Variant { mask: true, alibi: true, softcap: true, varlen: true, ..w }.to_string(),
                    format!("fwd90_d{hd}_{tag}_{dt}_mask_alibi_softcap_varlen")
                );
                assert!(!v.defines().iter().any(|d| d.starts_with(key)));
                assert!(w.defines().contains(&define.to_string()));
                assert!(!w.defines().iter().any(|d| d.starts_with(other)));
                // Its own NVRTC options, hence its own cache key and file.
                assert_ne!(options(&v, "sm_90a"), options(&w, "sm_90a"));
                assert!(sm90_variants().contains(&w) && hot_variants().contains(&w));
                assert!(representative_variants().contains(&w));
                assert!(representative_variants().contains(&Variant { mask: true, ..w }));
                // Meaningless elsewhere: no macro, no name change.
                let elsewhere = meaningless
                    .iter()
                    .map(|&h| Variant::plain(Pass::FwdSm90, h, bf16))
                    .chain([Variant::plain(Pass::Fwd, hd, bf16), Variant::plain(Pass::BwdSm90, hd, bf16)]);
                for x in elsewhere {
                    let y = set(x, hd);
                    assert!(!is_form(&y));
                    assert_eq!(y.to_string(), x.to_string());
                    assert_eq!(y.defines(), x.defines());
                }
            }
            let count = sm90_variants().iter().filter(|x| x.head_dim == hd && is_form(x)).count();
            assert_eq!(count, 2 * 16);
        }
    }

    #[test]
    fn tuned_variants() {
        use crate::tuning::Tuning;
        let v = kv_variant(128, true, false, false, false, true);
        // The default tuning changes nothing.
        assert_eq!(v.tuned(&Tuning::default()), v);
        assert_eq!(options(&v, "sm_90a"), options(&v.tuned(&Tuning::default()), "sm_90a"));
        // Extra options: last on the command line, interned (equal lists give equal variants), named.
        let extra = vec!["-lineinfo".to_string(), "-DKV_L2_PREFETCH=256".to_string()];
        let t = Tuning { nvrtc_options: extra.clone(), ..Tuning::default() };
        let (a, b) = (v.tuned(&t), v.tuned(&t.clone()));
        assert_eq!(a, b);
        assert_eq!(options(&a, "sm_90a")[options(&v, "sm_90a").len()..], extra[..]);
        assert!(a.to_string().starts_with(&v.to_string()) && a.to_string().contains("_x"));
        // KV stages: a define and a name of their own, clamped, only on the KV-cache pass.
        let st = |n| v.tuned(&Tuning { kv_stages: Some(n), ..Tuning::default() });
        assert_eq!((st(4).stages(), st(1).stages(), st(99).stages(), v.stages()), (4, 2, 8, 3));
        assert!(st(4).defines().contains(&"KV_STAGES=4".to_string()) && st(4).to_string().contains("_st4"));
        let f = Variant::plain(Pass::Fwd, 128, true);
        assert_eq!(f.tuned(&Tuning { kv_stages: Some(4), ..Tuning::default() }), f);
    }

    #[test]
    fn value_dim_variants() {
        // Each pair, forward and backward, both dtypes, plain and causal, is hot (compiled and spill-checked by
        // nvrtc_compiles_variants) and representative; the macro and the name only where the pass takes it.
        for &(hd, hv) in &VALUE_DIM_PAIRS {
            for pass in [Pass::Fwd, Pass::Bwd] {
                for bf16 in [false, true] {
                    let v = Variant { head_dim_v: Some(hv), ..Variant::plain(pass, hd, bf16) };
                    assert!(hot_variants().contains(&v) && hot_variants().contains(&Variant { mask: true, ..v }));
                    assert!(representative_variants().contains(&v) && all_variants().contains(&v));
                    assert!(v.defines().contains(&format!("HEAD_DIM_V={hv}")));
                    assert!(v
                        .to_string()
                        .starts_with(&format!("{}_d{hd}v{hv}_", if pass == Pass::Fwd { "fwd" } else { "bwd" })));
                    assert_ne!(options(&v, "sm_80"), options(&Variant::plain(pass, hd, bf16), "sm_80"));
                }
            }
            assert_eq!(value_head_dim(hd, hv).unwrap(), Some(hv));
        }
        // Ignored by the passes without a value head dim of their own.
        for pass in [Pass::KvCache, Pass::FwdSm90, Pass::BwdSm90] {
            let v = Variant::plain(pass, 128, true);
            let w = Variant { head_dim_v: Some(64), ..v };
            assert_eq!((w.value_dim(), w.defines(), w.to_string()), (None, v.defines(), v.to_string()));
        }
        // Equal dims have none; odd dims pad to a pair; others are refused naming d_v.
        assert_eq!(value_head_dim(77, 77).unwrap(), None);
        assert_eq!(value_head_dim(170, 100).unwrap(), Some(128));
        assert!(value_head_dim(150, 100).is_err()); // (160, 128)
        assert_eq!(value_head_dim(33, 100).unwrap(), Some(128));
        assert!(value_head_dim(33, 65).is_err()); // (64, 96)
        let e = value_head_dim(192, 64).unwrap_err().to_string();
        assert!(e.contains("d_v = 64") && e.contains("(192, 128)"), "{e}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for((9, 0)), "sm_90a");
        assert_eq!(arch_for((8, 6)), "sm_86");
        assert_eq!(canonical_arch("sm_90a").unwrap(), "sm_90a");
        assert_eq!(canonical_arch("80").unwrap(), "sm_80");
        assert!(canonical_arch("sm_70").is_err());
        assert!(canonical_arch("banana").is_err());
    }

    #[test]
    fn variant_counts_and_architectures() {
        // bwd.cu x deterministic, KV, sm90 forward (3 head dims + the 192-row d64 + the 176-key d128 + the 80-key
        // d256), sm90 backward (3 head dims x deterministic).
        // The value head dim pairs likewise: 3 pairs x (forward + backward x deterministic); the KV kernels over
        // 16-bit and e4m3 caches.
        assert_eq!(
            all_variants().len(),
            8 * 2 * 16 * 2 * 3 + 3 * 2 * 16 * 2 * 3 + 8 * 2 * 8 * 2 * 2 + 6 * 2 * 16 + 3 * 2 * 32
        );
        assert!(Pass::FwdSm90.builds_for("sm_90a") && !Pass::FwdSm90.builds_for("sm_80"));
        assert!(Pass::BwdSm90.builds_for("sm_90a") && !Pass::BwdSm90.builds_for("sm_80"));
        // The e4m3 KV kernels need sm_89 or newer; their name and defines say so.
        let f = Variant { kv_fp8: true, ..kv_variant(128, true, false, false, false, true) };
        assert!(!f.builds_for("sm_80") && !f.builds_for("sm_86") && f.builds_for("sm_89") && f.builds_for("sm_90a"));
        assert!(f.defines().contains(&"KV_FP8=1".to_string()) && f.to_string().ends_with("_bf16_e4m3"));
        assert!(!kv_variant(128, true, false, false, false, true).defines().iter().any(|d| d.starts_with("KV_FP8")));
    }
}
