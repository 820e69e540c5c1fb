# flashattn: exact FlashAttention with a CPU backend and CUDA kernels that are
# compiled at run time by NVRTC. No CUDA compiler (nvcc) and no CUDA "devel"
# image is needed to build this image: the builder is a plain Rust image, the
# runtime is NVIDIA's CUDA *runtime* image, which carries libnvrtc.
#
#   docker build -t flashattn .
#   docker run --rm --gpus all flashattn              # = flashattn check
#   docker run --rm flashattn check --device cpu      # no GPU needed
#
# The `torch` target is the Python image: PyTorch from PyPI and the flashattn
# wheel (built here by maturin), with the example scripts in /workspace:
#
#   docker build --target torch -t flashattn:torch .
#   docker run --rm --gpus all flashattn:torch python /workspace/example.py
#   docker run --rm --gpus all flashattn:torch python -m flashattn.compat /workspace/fa2_script.py
#
# Stage order: builder, runtime-base, wheel, torch, then the CLI image last,
# so that a build without --target still gives the CLI image (the last stage
# is the default target, and stages it does not need are skipped).
#
# Both base images are build arguments so they can be swapped (CI builds this
# file with locally made stand-ins, see ci/docker-check.sh); the defaults are
# pinned to exact tags. Needs BuildKit (Docker 23+), Podman or Buildah for
# RUN --mount; no `# syntax=` line, so no unpinned frontend image is pulled.
# See docs/docker.md.

# Rust toolchain image for the build stage (Debian bookworm: glibc 2.36, older
# than or equal to the runtime base's, so the binary runs there).
ARG BUILDER=rust:1.95.0-slim-bookworm
# Runtime base: CUDA runtime libraries (libcudart, libnvrtc, ...) on Ubuntu
# 24.04. The driver (libcuda) comes from the host via the NVIDIA container
# toolkit when the container is started with --gpus.
ARG BASE=nvidia/cuda:13.0.3-runtime-ubuntu24.04

# ---------------------------------------------------------------------------
FROM ${BUILDER} AS builder

WORKDIR /src
# .dockerignore keeps the context to the workspace sources (no target/, .git).
COPY . .
# The cache mounts keep downloaded crates and build artefacts between builds
# on the same machine; the binary is copied out of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flashattn-cli \
 && install -D -m 0755 target/release/flashattn /out/flashattn

# ---------------------------------------------------------------------------
# What the CLI image and the torch image share: the environment, the user and
# the kernel cache folder.
FROM ${BASE} AS runtime-base

# Ask the NVIDIA container toolkit for the compute libraries even when BASE is
# not an nvidia/cuda image (those already set the same values).
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    FLASHATTN_CACHE_DIR=/var/cache/flashattn

# Unprivileged user (UID 10001: Ubuntu images already use 1000). The kernel
# cache is owned by it; group 0 may write too, for runtimes that start the
# container under an arbitrary UID in group 0.
RUN groupadd --gid 10001 flashattn \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init \
        --home-dir /var/cache/flashattn --shell /usr/sbin/nologin flashattn \
 && install -d -o 10001 -g 0 -m 0775 /var/cache/flashattn

# ---------------------------------------------------------------------------
# The Python wheel of flashattn, built by maturin from PyPI on the same Rust
# image. abi3: one wheel serves every CPython >= 3.9, so the runtime's Python
# (3.12 on Ubuntu 24.04) need not match the builder's (3.11 on bookworm).
FROM ${BUILDER} AS wheel
ARG MATURIN_VERSION=1.16.0
# Python only to run maturin; its versions are the builder distribution's.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/maturin \
 && /opt/maturin/bin/pip install --no-cache-dir "maturin==${MATURIN_VERSION}"

WORKDIR /src
COPY . .
# Same cache mounts as the CLI build (cargo locks the target dir when both
# stages build at once).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    /opt/maturin/bin/maturin build --release --locked \
        --interpreter /opt/maturin/bin/python3 --out /out/wheels

# ---------------------------------------------------------------------------
# The Python image (--target torch): CUDA runtime base + Python + PyTorch from
# PyPI (its wheel brings its own CUDA libraries) + the flashattn wheel.
FROM runtime-base AS torch

# Python from the base's distribution (Ubuntu 24.04 has none in NVIDIA's
# runtime image), so its versions follow the base, not a pin here. A venv,
# because Ubuntu's system Python refuses pip installs (PEP 668).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# TORCH_SPEC: any requirement pip takes, e.g. --build-arg TORCH_SPEC="torch>=2.4"
# (the package's own floor). PyPI's default Linux wheel carries the CUDA
# libraries (several GB). NUMPY_SPEC: torch runs without NumPy but warns at
# import; a range, so that pip picks a NumPy built for the base's Python.
# Before the flashattn wheel, so that a change to flashattn does not install
# torch again; the cache mount keeps pip's downloads between builds. (DL3013
# cannot see a pin inside a build arg.)
ARG TORCH_SPEC="torch==2.15.0"
ARG NUMPY_SPEC="numpy>=2,<3"
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --disable-pip-version-check --root-user-action=ignore \
        "${TORCH_SPEC}" "${NUMPY_SPEC}"

# COPY, not a bind mount: every builder then reinstalls when the wheel changes
# (the wheel stays in the image: a few MB). Its torch requirement is met by
# the torch above, which pip keeps.
COPY --from=wheel /out/wheels/ /opt/flashattn-wheel/
RUN pip install --disable-pip-version-check --root-user-action=ignore --no-cache-dir \
        /opt/flashattn-wheel/flashattn-*.whl

# The guide's example (flashattn's API), and a script written for
# FlashAttention-2 (`from flash_attn import ...`), unchanged: it runs through
# `python -m flashattn.compat`.
COPY examples/flash_attn_example.py /workspace/example.py
COPY examples/fa2_script.py /workspace/fa2_script.py

USER 10001:10001
WORKDIR /workspace
VOLUME ["/var/cache/flashattn"]

ARG VERSION=0.1.0
ARG SOURCE=https://github.com/flashattn-rs/flashattn
ARG BASE
LABEL org.opencontainers.image.title="flashattn-torch" \
      org.opencontainers.image.description="PyTorch with flashattn (FlashAttention-2's API, and the flash_attn drop-in): kernels compiled at run time by NVRTC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"

# No entrypoint (NVIDIA's prints a banner before every command): the command
# is what runs. The default one is the example.
ENTRYPOINT []
CMD ["python", "/workspace/example.py"]

# ---------------------------------------------------------------------------
# The CLI image: the last stage, so the default target.
FROM runtime-base AS cli

COPY --from=builder /out/flashattn /usr/local/bin/flashattn

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# Bind-mount your tensors here: relative --input/--output paths resolve in it.
WORKDIR /data

# Optional: fill the kernel cache now (NVRTC compiles without a GPU), e.g.
# --build-arg PRECOMPILE_ARCHS=sm_80,sm_90a. Empty (default): kernels are
# compiled on first use and kept in the cache volume. This must come before
# VOLUME: Docker seeds a new named volume from the image's content.
ARG PRECOMPILE_ARCHS=""
RUN if [ -n "${PRECOMPILE_ARCHS}" ]; then \
        flashattn precompile --arch "${PRECOMPILE_ARCHS}"; \
    fi

VOLUME ["/var/cache/flashattn"]

# Labels last, so a version bump rebuilds no layer. ci/docker-check.sh checks
# that these defaults match the workspace's Cargo.toml.
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/flashattn-rs/flashattn
ARG BASE
LABEL org.opencontainers.image.title="flashattn" \
      org.opencontainers.image.description="Exact FlashAttention in Rust: CPU backend and CUDA kernels compiled at run time by NVRTC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"

ENTRYPOINT ["flashattn"]
CMD ["check"]
