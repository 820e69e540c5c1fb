//! The one error type of the crate.
//!
//! Every malformed input is reported as a typed error that names the argument, what was expected and what
//! was given; nothing in the library panics on user input.

use std::fmt;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a `flashattn` call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument has the wrong shape, dtype, device, layout or value.
    #[error("invalid argument `{arg}`: expected {expected}, got {got}")]
    InvalidArgument {
        /// The argument's name, as in the API (`q`, `cu_seqlens_k`, `window`, ...).
        arg: &'static str,
        /// What was expected.
        expected: String,
        /// What was given.
        got: String,
    },
    /// A KV-cache append would write past the cache's capacity; nothing was written.
    #[error("KV-cache overflow for sequence {seq}: {needed} positions needed, the cache holds {capacity}")]
    CacheOverflow {
        /// The batch index of the offending sequence.
        seq: usize,
        /// `cache_seqlens[seq] + s_new`.
        needed: usize,
        /// Positions available to that sequence.
        capacity: usize,
    },
    /// The requested feature is not supported by the selected backend.
    #[error("unsupported on the {backend} backend: {what}")]
    Unsupported {
        /// Backend name (`cpu`, `cuda`).
        backend: &'static str,
        /// What is not supported.
        what: String,
    },
    /// A backend could not be used (no driver, no NVRTC, no device, ...).
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        /// Backend name.
        backend: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
    /// An error reported by the device runtime (driver, NVRTC, kernel launch).
    #[error("device error: {0}")]
    Device(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(arg: &'static str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::InvalidArgument { arg, expected: expected.to_string(), got: got.to_string() }
    }

    /// The argument this error is about, when it is about one.
    pub fn arg(&self) -> Option<&'static str> {
        match self {
            Error::InvalidArgument { arg, .. } => Some(arg),
            _ => None,
        }
    }
}
