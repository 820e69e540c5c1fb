# Stand-in for the Dockerfile's BUILDER image (an official rust:*-slim-bookworm
# image), made by ci/docker-check.sh from a debootstrap rootfs (gcc, libc6-dev,
# ca-certificates) and this machine's own Rust toolchain, which cannot be
# downloaded here. Paths and variables mirror the official image's.
FROM scratch
ADD rootfs.tar /
COPY rust/ /usr/local/rust/
# The host's CA bundle, so that cargo can fetch crates from inside RUN steps.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["bash"]
