//! Element types.

use half::{bf16, f16};
use std::fmt;

/// The element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision (CPU backends only).
    F32,
    /// 32-bit signed integers (sequence lengths, block tables).
    I32,
    /// FP8 `float8_e4m3fn` (1 byte: 4 exponent bits, 3 mantissa bits, no infinities): forward inputs only,
    /// each with a descale factor ([`crate::AttnOptions::q_descale`]); see [`F8E4M3`].
    E4M3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::E4M3 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }

    /// The dtype's short name (`f16`, `bf16`, `f32`, `i32`, `e4m3`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::E4M3 => "e4m3",
        }
    }

    /// Whether q/k/v may have this dtype (every float type, FP8 included: see [`DType::is_fp8`]).
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }

    /// Whether this is an FP8 type (forward inputs only, dequantized with a descale factor).
    pub fn is_fp8(self) -> bool {
        matches!(self, DType::E4M3)
    }

    /// Rounds an `f32` to this dtype and back (identity for `f32`).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::E4M3 => F8E4M3::from_f32(x).to_f32(),
            DType::F32 | DType::I32 => x,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
            "i32" | "int32" => Ok(DType::I32),
            "e4m3" | "float8_e4m3fn" | "fp8" | "f8e4m3" => Ok(DType::E4M3),
            _ => Err(crate::Error::invalid("dtype", "one of f16, bf16, f32, i32, e4m3", s)),
        }
    }
}

/// An FP8 `float8_e4m3fn` value (its byte): sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities,
/// NaN is `0x7f`/`0xff`, the largest finite value is 448, the smallest subnormal `2^-9`.
///
/// Conversions match PyTorch's `.to(torch.float8_e4m3fn)` and `.float()` exactly: [`F8E4M3::from_f32`] rounds
/// to nearest even and saturates (a magnitude above 448, infinities included, becomes ±448; NaN stays NaN with
/// its sign); [`F8E4M3::to_f32`] is exact.
///
/// ```
/// use flashattn::dtype::F8E4M3;
/// assert_eq!(F8E4M3::from_f32(1.0).0, 0x38);
/// assert_eq!(F8E4M3::from_f32(1e6).to_f32(), 448.0);
/// assert_eq!(F8E4M3::from_f32(f32::NEG_INFINITY).to_f32(), -448.0);
/// assert!(F8E4M3(0x7f).to_f32().is_nan());
/// assert_eq!(F8E4M3::from_f32(0.0009765625).0, 0); // 2^-10: a tie between 0 and 2^-9, to even
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct F8E4M3(pub u8);

impl F8E4M3 {
    /// The largest finite value.
    pub const MAX: f32 = 448.0;

    /// The value as `f32` (exact; `0x7f`/`0xff` are NaN).
    #[inline]
    pub fn to_f32(self) -> f32 {
        let c = self.0;
        let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = ((c >> 3) & 0xf, c & 7);
        if e == 0xf && m == 7 {
            return f32::from_bits(0x7fc0_0000 | ((c as u32 & 0x80) << 24));
        }
        let mag = if e == 0 {
            m as f32 * (1.0 / 512.0) // subnormal: m * 2^-9
        } else {
            // (8 + m) * 2^(e - 10), built exactly from the exponent bits.
            (8 + m) as f32 * f32::from_bits(((e as u32 + 117) & 0xff) << 23)
        };
        sign * mag
    }

    /// `x` rounded to nearest even, saturating at ±448 (infinities too); NaN keeps its sign (`0x7f`/`0xff`).
    #[inline]
    pub fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        if x.is_nan() {
            return F8E4M3(sign | 0x7f);
        }
        let a = x.abs();
        if a >= Self::MAX {
            return F8E4M3(sign | 0x7e);
        }
        if a < 1.0 / 64.0 {
            // Subnormal range (below 2^-6): multiples of 2^-9; 8 * 2^-9 is the smallest normal (code 8).
            // `a * 512` is exact, and `round_ties_even` is what the format's rounding does.
            return F8E4M3(sign | (a * 512.0).round_ties_even() as u8);
        }
        // Normal: round the 23-bit mantissa to 3 bits, to nearest even (a carry moves into the exponent).
        let ab = a.to_bits();
        let r = (ab + 0x7_ffff + ((ab >> 20) & 1)) >> 20;
        let code = r - ((127 - 7) << 3);
        F8E4M3(sign | code.min(0x7e) as u8)
    }
}

/// A floating-point element type the kernels read and write.
pub trait Element: Copy + Send + Sync + Default + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts to `f32` (exact).
    fn to_f32(self) -> f32;
    /// Converts from `f32`, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
}

/// [`Element`] for a 16-bit float type of `half`, through its own conversions.
macro_rules! half_element {
    ($t:ident, $dtype:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dtype;
            fn to_f32(self) -> f32 {
                $t::to_f32(self)
            }
            fn from_f32(x: f32) -> Self {
                $t::from_f32(x)
            }
        }
    };
}

half_element!(f16, F16);
half_element!(bf16, BF16);

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding by brute force: the nearest of the 127 finite non-negative values, ties to the even
    /// code (the one whose last mantissa bit is 0), saturating at 448, NaN kept with its sign.
    fn encode_by_search(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | 0x7f;
        }
        let a = x.abs() as f64;
        let mut best = 0u8;
        let mut best_err = f64::INFINITY;
        for c in 0u8..=0x7e {
            let e = (F8E4M3(c).to_f32() as f64 - a).abs();
            if e < best_err || (e == best_err && c & 1 == 0) {
                best = c;
                best_err = e;
            }
        }
        sign | best
    }

    #[test]
    fn decode_facts() {
        assert_eq!(F8E4M3(0x00).to_f32(), 0.0);
        assert!(F8E4M3(0x80).to_f32() == 0.0 && F8E4M3(0x80).to_f32().is_sign_negative());
        assert_eq!(F8E4M3(0x01).to_f32(), 2f32.powi(-9));
        assert_eq!(F8E4M3(0x07).to_f32(), 7.0 * 2f32.powi(-9));
        assert_eq!(F8E4M3(0x08).to_f32(), 2f32.powi(-6));
        assert_eq!(F8E4M3(0x38).to_f32(), 1.0);
        assert_eq!(F8E4M3(0x7e).to_f32(), 448.0);
        assert_eq!(F8E4M3(0xfe).to_f32(), -448.0);
        assert!(F8E4M3(0x7f).to_f32().is_nan() && F8E4M3(0xff).to_f32().is_nan());
        assert!(F8E4M3(0xff).to_f32().is_sign_negative());
        // Every code but NaN round-trips, and the values increase with the code.
        for c in 0u8..0x7e {
            assert!(F8E4M3(c).to_f32() < F8E4M3(c + 1).to_f32(), "code {c:#x}");
        }
        for c in 0u8..=255 {
            if c & 0x7f != 0x7f {
                assert_eq!(F8E4M3::from_f32(F8E4M3(c).to_f32()).0, c, "code {c:#x}");
            }
        }
    }

    #[test]
    fn encode_matches_nearest_even_search() {
        // Every bf16 value (all exponents; midpoints between e4m3 values and their neighbours are bf16 values).
        for bits in 0u32..=0xffff {
            let x = f32::from_bits(bits << 16);
            assert_eq!(F8E4M3::from_f32(x).0, encode_by_search(x), "x = {x:e} ({:#x})", bits << 16);
        }
        // Pseudo-random f32 bit patterns in the e4m3 range and just around it.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let bits = (s >> 32) as u32;
            // Exponents 2^-12 .. 2^9: fold the exponent field into that range.
            let e = 115 + ((bits >> 23) & 0xff) % 22;
            let x = f32::from_bits((bits & 0x807f_ffff) | (e << 23));
            assert_eq!(F8E4M3::from_f32(x).0, encode_by_search(x), "x = {x:e}");
        }
        for (x, c) in [(f32::INFINITY, 0x7e), (f32::NEG_INFINITY, 0xfe), (464.0, 0x7e), (1e30, 0x7e), (-0.0, 0x80)] {
            assert_eq!(F8E4M3::from_f32(x).0, c, "x = {x}");
        }
    }

    #[test]
    fn names_parse() {
        for s in ["e4m3", "float8_e4m3fn", "fp8", "E4M3"] {
            assert_eq!(s.parse::<DType>(), Ok(DType::E4M3));
        }
        assert_eq!(DType::E4M3.name(), "e4m3");
        assert_eq!(DType::E4M3.size(), 1);
        assert_eq!((DType::E4M3.round(1.05), DType::E4M3.round(1.07)), (1.0, 1.125));
    }
}
