//! The on-disk cache of compiled kernels.
//!
//! Folder: `$FLASHATTN_CACHE_DIR`, else `$XDG_CACHE_HOME/flashattn`, else `~/.cache/flashattn`.
//! One file per (variant, architecture): `<variant>-<arch>-<key>.cubin`, where the key hashes the kernel
//! sources, the NVRTC options, the NVRTC version and the architecture. Each file starts with a header
//! (magic, lengths, checksum) so a partial or corrupt entry is detected and recompiled. Entries are written
//! to a temporary file in the same folder and renamed into place, so concurrent processes never see a
//! half-written entry.

use super::compile::{self, Compiled, Fnv, Variant, HEADERS};
use crate::error::Result;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FATTNCB1";
const HEADER: usize = 8 + 8 + 8 + 8;

/// The cache folder (it may not exist yet).
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLASHATTN_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("flashattn");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache").join("flashattn"),
        None => std::env::temp_dir().join("flashattn-cache"),
    }
}

/// The cache key of a variant for an architecture: a 128-bit hash (hex) of the sources, the options, the
/// NVRTC version and the architecture.
pub fn key(v: &Variant, arch: &str, nvrtc: (i32, i32)) -> String {
    let (_, src) = v.source();
    let mut parts: Vec<Vec<u8>> = vec![src.as_bytes().to_vec()];
    for (n, t) in HEADERS {
        parts.push(n.as_bytes().to_vec());
        parts.push(t.as_bytes().to_vec());
    }
    for o in compile::options(v, arch) {
        parts.push(o.into_bytes());
    }
    parts.push(format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).into_bytes());
    parts.push(arch.as_bytes().to_vec());
    let h = |seed| parts.iter().fold(Fnv::new(seed), |f, p| f.bytes(p)).finish();
    format!("{:016x}{:016x}", h(1), h(2))
}

/// The file of an entry.
pub fn path(v: &Variant, arch: &str, key: &str) -> PathBuf {
    dir().join(format!("{v}-{arch}-{key}.cubin"))
}

fn checksum(cubin: &[u8], log: &[u8]) -> u64 {
    Fnv::new(7).bytes(cubin).bytes(log).finish()
}

fn encode(c: &Compiled) -> Vec<u8> {
    let log = c.log.as_bytes();
    let mut out = Vec::with_capacity(HEADER + c.cubin.len() + log.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(c.cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&(log.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(&c.cubin, log).to_le_bytes());
    out.extend_from_slice(&c.cubin);
    out.extend_from_slice(log);
    out
}

fn decode(b: &[u8]) -> Option<Compiled> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let (n_cubin, n_log, sum) = (word(8) as usize, word(16) as usize, word(24));
    if n_cubin == 0 || HEADER.checked_add(n_cubin)?.checked_add(n_log)? != b.len() {
        return None;
    }
    let cubin = &b[HEADER..HEADER + n_cubin];
    let log = &b[HEADER + n_cubin..];
    if checksum(cubin, log) != sum {
        return None;
    }
    Some(Compiled { cubin: cubin.to_vec(), log: String::from_utf8_lossy(log).into_owned() })
}

/// Reads an entry; `None` when missing, partial or corrupt (a corrupt file is removed).
pub fn read(p: &Path) -> Option<Compiled> {
    let b = fs::read(p).ok()?;
    let c = decode(&b);
    if c.is_none() {
        let _ = fs::remove_file(p);
    }
    c
}

/// Writes an entry atomically (temporary file + rename). Errors are returned, but callers may ignore
/// them: a read-only cache only costs recompilation.
pub fn write(p: &Path, c: &Compiled) -> std::io::Result<()> {
    let parent = p.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = parent.join(format!(
        ".{}.{}.{nanos}.tmp",
        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&encode(c))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, p)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Where a cubin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from the disk cache.
    Disk,
    /// Compiled now (and written to the cache).
    Compiled,
}

/// The cubin of a variant for an architecture: from the disk cache, else compiled and stored.
pub fn get_or_compile(v: &Variant, arch: &str) -> Result<(Compiled, Origin)> {
    let nvrtc = compile::nvrtc_version()?;
    let p = path(v, arch, &key(v, arch, nvrtc));
    if let Some(c) = read(&p) {
        return Ok((c, Origin::Disk));
    }
    if let Some(hook) = COMPILE_HOOK.get() {
        hook(&format!("{v} for {arch}"), &p);
    }
    let c = compile::compile(v, arch)?;
    let _ = write(&p, &c);
    Ok((c, Origin::Compiled))
}

/// Called before each kernel compile that the disk cache could not serve.
type CompileHook = Box<dyn Fn(&str, &Path) + Send + Sync>;
static COMPILE_HOOK: std::sync::OnceLock<CompileHook> = std::sync::OnceLock::new();

/// Sets (once per process) a function called before every kernel compile that the disk cache could not
/// serve, with the variant's name and the cache file it will be written to: an embedding tells its user why
/// the first call of a new kernel variant pauses. Returns false if a hook was already set.
pub fn set_compile_hook(hook: impl Fn(&str, &Path) + Send + Sync + 'static) -> bool {
    COMPILE_HOOK.set(Box::new(hook)).is_ok()
}

/// The cache's entries: `(file name, bytes)`, sorted by name.
pub fn entries() -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = match fs::read_dir(dir()) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let len = e.metadata().ok()?.len();
                name.ends_with(".cubin").then_some((name, len))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_reject_corruption() {
        let c = Compiled { cubin: vec![1, 2, 3, 4, 5], log: "ptxas info".into() };
        let enc = encode(&c);
        let d = decode(&enc).expect("round trip");
        assert_eq!(d.cubin, c.cubin);
        assert_eq!(d.log, c.log);
        // Truncated (a partial write) and flipped bits are rejected.
        assert!(decode(&enc[..enc.len() - 1]).is_none());
        let mut bad = enc.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        assert!(decode(&bad).is_none());
        assert!(decode(b"garbage").is_none());

        let dir = std::env::temp_dir().join(format!("flashattn-cache-test-{}", std::process::id()));
        let p = dir.join("x.cubin");
        write(&p, &c).unwrap();
        assert_eq!(read(&p).unwrap().cubin, c.cubin);
        fs::write(&p, &enc[..10]).unwrap();
        assert!(read(&p).is_none());
        assert!(!p.exists(), "a corrupt entry is removed");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_differ_by_variant_and_arch() {
        let v = Variant::plain(compile::Pass::Fwd, 128, true);
        let w = Variant { mask: true, ..v };
        assert_ne!(key(&v, "sm_80", (13, 0)), key(&w, "sm_80", (13, 0)));
        assert_ne!(key(&v, "sm_80", (13, 0)), key(&v, "sm_90a", (13, 0)));
        assert_ne!(key(&v, "sm_80", (13, 0)), key(&v, "sm_80", (12, 8)));
        assert_eq!(key(&v, "sm_80", (13, 0)), key(&v, "sm_80", (13, 0)));
        // The 192-row sm90 forward has its own key and file name.
        let a = Variant::plain(compile::Pass::FwdSm90, 64, true);
        let b = Variant { bm192: true, ..a };
        assert_ne!(key(&a, "sm_90a", (13, 0)), key(&b, "sm_90a", (13, 0)));
        assert_ne!(path(&a, "sm_90a", "k"), path(&b, "sm_90a", "k"));
        // So have the wide-key-block ones (176 keys at d128, 80 at d256).
        for hd in [128, 256] {
            let c = Variant::plain(compile::Pass::FwdSm90, hd, true);
            let d = Variant { wide_n: true, ..c };
            assert_ne!(key(&c, "sm_90a", (13, 0)), key(&d, "sm_90a", (13, 0)));
            assert_ne!(path(&c, "sm_90a", "k"), path(&d, "sm_90a", "k"));
        }
    }
}
