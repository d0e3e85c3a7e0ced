#!/usr/bin/env bash
# The project's test command (README's second command): formatting, lints, then every test.
# Needs only a Rust toolchain; protoc is vendored, fixtures are in the repo, no network at test time.
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
# The process tests start the real lorax-shard and lorax-router binaries next to the launcher.
cargo build --workspace --bins --locked
cargo test --workspace --locked
echo "GPU tests: SKIPPED (no CUDA backend in this build; nothing runs on a GPU yet)"
