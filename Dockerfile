# lorax-rs image: the three binaries (lorax-launcher, lorax-router, lorax-shard) on a slim Debian base.
#
#   docker build -t lorax-rs:latest .
#   docker run -p 8080:80 lorax-rs:latest                       # embedded tiny model, no network
#   docker run -p 8080:80 -v ~/data:/data -e HF_TOKEN lorax-rs:latest \
#       --model-id <hub id or /data/dir> --port 80 --hostname 0.0.0.0
#
# The default runtime base, debian:bookworm-slim, runs the CPU backend. For GPUs, build on an nvidia/cuda
# image (RUNTIME_BASE below): the CUDA backend loads libcuda, cuBLAS and NVRTC dynamically at run time
# (nothing links against CUDA at build time), so this same build stage serves both bases, and the shard
# logs which library is missing if the base lacks one. Needs BuildKit (the default builder since Docker 23) for the
# cache mounts.

ARG RUNTIME_BASE=debian:bookworm-slim
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --bins --locked \
 && mkdir -p /out \
 && cp target/release/lorax-launcher target/release/lorax-router target/release/lorax-shard /out/

# For GPU hosts pass e.g. --build-arg RUNTIME_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 (CUDA runtime,
# cuBLAS, NVRTC and NCCL libraries; glibc 2.39 runs these bookworm-built binaries).
FROM ${RUNTIME_BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The launcher finds lorax-shard and lorax-router next to itself.
COPY --from=builder /out/ /usr/local/bin/
# Hub downloads go to $HF_HOME/hub: mount a volume at /data to keep them across runs. PORT=80 keeps the
# port when the CMD below is replaced by other arguments. Pass --hostname 0.0.0.0 yourself in that
# case: Docker sets HOSTNAME to the container id, and the launcher reads HOSTNAME as its default.
ENV HF_HOME=/data \
    PORT=80
EXPOSE 80
ENTRYPOINT ["lorax-launcher"]
CMD ["--port", "80", "--hostname", "0.0.0.0"]
