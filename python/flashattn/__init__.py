"""flashattn: exact, memory-efficient attention (FlashAttention) with FlashAttention-2's API.

Kernels are compiled at run time by NVRTC for the GPU in front of them and cached on disk; CPU tensors run the
CPU backend. ``from flashattn import flash_attn_func`` is all a FlashAttention-2 user changes.
"""

from __future__ import annotations

import importlib.util
import os


def _nvidia_lib_dirs() -> list[str]:
    """The `lib` folders of the NVIDIA wheels installed beside PyTorch (where libnvrtc lives in a pip install)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        for sub in ("cu13", "cuda_nvrtc"):
            d = os.path.join(root, sub, "lib")
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


from . import _flashattn  # noqa: E402

# The Rust side owns the search order: the loader path first, then these folders.
_flashattn.add_nvrtc_dirs(_nvidia_lib_dirs())

# _ops registers the torch.library operators; parallel is context parallelism (ring attention).
from . import _ops, parallel  # noqa: E402,F401
from .interface import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__version__ = _flashattn.__version__

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "info",
    "parallel",
    "precompile",
    "release_workspaces",
]


def info() -> dict:
    """The backends (``cpu``, ``cuda``) with whether each is usable and why (devices, driver, NVRTC and where it
    was found), and the kernel cache folder."""
    return {
        "version": __version__,
        "backends": {name: {"usable": usable, "detail": detail} for name, usable, detail in _flashattn.info()},
        "nvrtc": _flashattn.nvrtc_location(),
        "kernel_cache": _flashattn.cache_dir(),
    }


def precompile(archs=("sm_80", "sm_90a")) -> list[str]:
    """Compiles every kernel variant for ``archs`` into the kernel cache (no GPU needed; e.g. in a container
    build), so no first call pauses to compile. Returns one line per variant."""
    if isinstance(archs, str):
        archs = [archs]
    return _flashattn.precompile(list(archs))


def release_workspaces() -> None:
    """Gives the scratch memory that KV-cache calls keep between decode steps (one buffer per CUDA device and
    stream, reused by the next eager call on that stream) back to torch's caching allocator, e.g. before
    ``torch.cuda.empty_cache()``. The next call allocates again."""
    _flashattn.release_workspaces()
