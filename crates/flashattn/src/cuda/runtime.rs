//! Devices: probing the driver and NVRTC, one context and stream per device, and the loaded kernel modules
//! (an in-memory map over the disk cache).

use super::cache::{self, Origin};
use super::compile::{self, Variant};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
use cudarc::driver::{result as dres, sys as dsys, CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable { backend: "cuda", reason: reason.into() }
}

pub(crate) fn dev_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("{what}: {e:?}"))
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol, say) into an error.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(unavailable(format!("{what} failed inside the CUDA bindings: {msg}")))
        }
    }
}

/// Whether the CUDA driver library (`libcuda`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    std::panic::catch_unwind(|| unsafe { dsys::is_culib_present() }).unwrap_or(false)
}

/// The driver after `cuInit`: its version (e.g. 13000) and the number of devices.
fn init_driver() -> Result<(i32, i32)> {
    static INIT: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err("the NVIDIA driver library (libcuda.so) was not found: no GPU driver on this machine".into());
        }
        guard("cuInit", || {
            dres::init().map_err(|e| unavailable(format!("cuInit failed: {e:?} (no usable GPU?)")))?;
            let mut ver = 0;
            // SAFETY: valid out-pointer; the driver is initialised.
            unsafe { dsys::cuDriverGetVersion(&mut ver) };
            let n = dres::device::get_count().map_err(|e| dev_err("cuDeviceGetCount", e))?;
            Ok((ver, n))
        })
        .map_err(|e| match e {
            Error::BackendUnavailable { reason, .. } => reason,
            other => other.to_string(),
        })
    })
    .clone()
    .map_err(unavailable)
}

/// Checks that the driver, a device `n` and NVRTC are all there.
pub fn probe(n: usize) -> Result<()> {
    let (_, count) = init_driver()?;
    if n >= count.max(0) as usize {
        return Err(unavailable(format!("no CUDA device {n} ({count} found)")));
    }
    if !compile::nvrtc_present() {
        return Err(unavailable(
            "libnvrtc was not found on the loader path (the CUDA runtime compiler is needed to build kernels)",
        ));
    }
    Ok(())
}

/// A kernel ready to launch.
#[derive(Clone)]
pub(crate) struct Kernel {
    pub func: CudaFunction,
}

/// A loaded module and its kernels.
pub(crate) struct Loaded {
    #[allow(dead_code)]
    pub module: Arc<CudaModule>,
    pub kernels: HashMap<&'static str, Kernel>,
    /// `flash_bwd_config` = `{BM, BN, threads, smem}` when the module exports it.
    pub bwd_config: Option<[i32; 4]>,
    /// How the cubin was obtained, and how long loading took (compile or read + module load).
    pub origin: Origin,
    pub load_time: Duration,
}

/// One CUDA device: context, stream, architecture, loaded modules.
pub(crate) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub cc: (i32, i32),
    pub arch: String,
    pub smem_optin: i32,
    /// Streaming multiprocessors (read once: the launch plans size persistent grids and decode splits by it).
    pub sm_count: usize,
    modules: Mutex<HashMap<Variant, Arc<Loaded>>>,
}

static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();

/// The device `n`, created on first use.
pub(crate) fn gpu(n: usize) -> Result<Arc<Gpu>> {
    probe(n)?;
    let map = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = map.get(&n) {
        return Ok(g.clone());
    }
    let g = guard("creating the CUDA context", || {
        let ctx = CudaContext::new(n).map_err(|e| dev_err("creating the CUDA context", e))?;
        // One stream per call sequence: ordering is ours, no per-buffer events needed.
        // SAFETY: every buffer is used on the stream that allocated it (or the caller's, for raw calls).
        unsafe { ctx.disable_event_tracking() };
        let cc = ctx.compute_capability().map_err(|e| dev_err("compute capability", e))?;
        if cc.0 < 8 {
            return Err(unavailable(format!(
                "device {n} has compute capability {}.{}; the kernels need 8.0 (Ampere) or newer",
                cc.0, cc.1
            )));
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let smem_optin = ctx
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .unwrap_or(48 * 1024);
        let sm_count = ctx
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| dev_err("reading the multiprocessor count", e))?
            .max(1) as usize;
        let stream = ctx.new_stream().map_err(|e| dev_err("creating a stream", e))?;
        Ok(Arc::new(Gpu {
            ctx,
            stream,
            name,
            cc,
            arch: compile::arch_for(cc),
            smem_optin,
            sm_count,
            modules: Mutex::new(HashMap::new()),
        }))
    })?;
    map.insert(n, g.clone());
    Ok(g)
}

impl Gpu {
    /// Runs `f` with this device's context bound to the calling thread, under [`guard`] (a panic inside the CUDA
    /// bindings becomes an error naming `what`): the frame of every piece of device work.
    pub(crate) fn run<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        guard(what, || {
            self.ctx.bind_to_thread().map_err(|e| dev_err("binding the context", e))?;
            f()
        })
    }

    /// A caller's stream, borrowed: dropping the handle leaves the stream alone.
    ///
    /// # Safety
    /// `stream` is a stream of this device's context that outlives the handle, or null (the legacy default
    /// stream).
    pub(crate) unsafe fn borrowed_stream(&self, stream: *mut std::ffi::c_void) -> Arc<CudaStream> {
        // SAFETY: the caller's contract.
        unsafe { self.ctx.wrap_borrowed_stream(stream as dsys::CUstream) }
    }

    /// The module of a variant: from memory, else the disk cache, else compiled now.
    pub(crate) fn module(&self, v: &Variant) -> Result<Arc<Loaded>> {
        if let Some(m) = self.modules.lock().unwrap_or_else(|e| e.into_inner()).get(v) {
            return Ok(m.clone());
        }
        let t0 = Instant::now();
        let (compiled, origin) = cache::get_or_compile(v, &self.arch)?;
        let loaded = self.run("loading a kernel module", || {
            let module = self
                .ctx
                .load_module(Ptx::from_binary(compiled.cubin.clone()))
                .map_err(|e| dev_err(&format!("loading the cubin of {v} for {}", self.arch), e))?;
            let mut kernels = HashMap::new();
            for &name in v.entry_points() {
                let func = module.load_function(name).map_err(|e| dev_err(&format!("kernel {name} of {v}"), e))?;
                // Allow the dynamic shared memory to go past 48 KB, up to what the device offers.
                func.set_attribute(Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, self.smem_optin)
                    .map_err(|e| dev_err(&format!("setting the shared memory limit of {name}"), e))?;
                kernels.insert(name, Kernel { func });
            }
            let bwd_config = if matches!(v.pass, compile::Pass::Bwd | compile::Pass::BwdSm90) {
                match module.get_global("flash_bwd_config", &self.stream) {
                    Ok(view) if view.len() >= 16 => {
                        let mut bytes = [0u8; 16];
                        self.stream
                            .memcpy_dtoh(&view.slice(0..16), &mut bytes[..])
                            .and_then(|_| self.stream.synchronize())
                            .map_err(|e| dev_err("reading flash_bwd_config", e))?;
                        let w = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
                        Some([w(0), w(1), w(2), w(3)])
                    }
                    _ => None,
                }
            } else {
                None
            };
            Ok(Loaded { module, kernels, bwd_config, origin, load_time: Duration::ZERO })
        })?;
        let loaded = Arc::new(Loaded { load_time: t0.elapsed(), ..loaded });
        self.modules.lock().unwrap_or_else(|e| e.into_inner()).insert(*v, loaded.clone());
        Ok(loaded)
    }
}

/// A human-readable description of the CUDA backend's state (for `flashattn info` and `--device auto`).
pub fn describe() -> (bool, String) {
    let cache_dir = cache::dir();
    let nv = match compile::nvrtc_version() {
        Ok((a, b)) => format!("NVRTC {a}.{b} from {}", compile::nvrtc_location().unwrap_or_else(|| "?".into())),
        Err(_) => "NVRTC not found".into(),
    };
    let (ver, count) = match init_driver() {
        Ok(x) => x,
        Err(e) => {
            let reason = match e {
                Error::BackendUnavailable { reason, .. } => reason,
                other => other.to_string(),
            };
            return (false, format!("{reason}; {nv}; kernel cache {}", cache_dir.display()));
        }
    };
    let drv = format!("driver {}.{}", ver / 1000, (ver % 1000) / 10);
    if count <= 0 {
        return (false, format!("no CUDA device found ({drv}, {nv}); kernel cache {}", cache_dir.display()));
    }
    if !compile::nvrtc_present() {
        return (false, format!("{count} device(s), {drv}, but libnvrtc was not found on the loader path"));
    }
    let mut devs = Vec::new();
    let mut usable = false;
    for n in 0..count as usize {
        match gpu(n) {
            Ok(g) => {
                usable = true;
                devs.push(format!("cuda:{n} {} (cc {}.{}, {})", g.name, g.cc.0, g.cc.1, g.arch));
            }
            Err(e) => devs.push(format!("cuda:{n} unusable: {e}")),
        }
    }
    let n_entries = cache::entries().len();
    (usable, format!("{}; {drv}; {nv}; kernel cache {} ({n_entries} entries)", devs.join(", "), cache_dir.display()))
}

/// Whether `stream` (a stream of device `n`'s primary context, or null for the legacy default stream) is
/// capturing a CUDA graph now.
///
/// # Safety
/// `stream` is a live stream of that context, or null.
pub unsafe fn stream_is_capturing(n: usize, stream: *mut std::ffi::c_void) -> Result<bool> {
    let gpu = gpu(n)?;
    gpu.run("querying a stream's capture status", || {
        let mut status = dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: the caller's contract; `status` is a live out-parameter.
        unsafe { dsys::cuStreamIsCapturing(stream as dsys::CUstream, &mut status) }
            .result()
            .map_err(|e| dev_err("querying a stream's capture status", e))?;
        Ok(status != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    })
}
