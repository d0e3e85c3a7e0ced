#!/usr/bin/env bash
# Builds, on a machine without CUDA, everything a GPU run needs, into one folder ignored by git
# (default .gpu-bin/, as one bin.tgz): the CUDA test binaries of lorax-engine (release, stripped) and the
# release launcher, shard and router, all from the committed HEAD in a temporary worktree (so
# uncommitted work in progress in the checkout cannot break the build, and what runs is what is
# committed). The GPU machine has no Rust toolchain; name the folder in the device tool's `carry` and
# run scripts/gpu/run.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${1:-.gpu-bin}
export CARGO_PROFILE_RELEASE_DEBUG=false
# Its own target dir: build scripts compiled inside the temporary worktree bake its path into their
# outputs, which would break later builds in the checkout if they shared one.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/gpu-build}
wt=$(mktemp -d)
git worktree add --detach "$wt" HEAD >/dev/null
trap 'git worktree remove --force "$wt"' EXIT
json=$(mktemp)
(cd "$wt" && cargo test --release -p lorax-engine --no-run --message-format=json) >"$json"
rm -rf "$out"
mkdir -p "$out"
python3 - "$json" "$out" <<'PY'
import json, shutil, sys
src, out = sys.argv[1], sys.argv[2]
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    name = m.get("target", {}).get("name", "")
    if exe and name.startswith("cuda_"):
        shutil.copy(exe, f"{out}/{name}")
        print("test binary", name)
PY
rm -f "$json"
(cd "$wt" && cargo build --release -p lorax-launcher -p lorax-shard -p lorax-router -p lorax-bench &&
    cargo build --release -p lorax-router --example validation_timing)
cp "$CARGO_TARGET_DIR"/release/lorax-launcher "$CARGO_TARGET_DIR"/release/lorax-shard \
    "$CARGO_TARGET_DIR"/release/lorax-router "$CARGO_TARGET_DIR"/release/lorax-bench \
    "$CARGO_TARGET_DIR"/release/examples/validation_timing "$out/"
strip "$out"/*
ls -la "$out"
# One gzip archive: the working tree and carried files travel within 64 MiB together.
tar -C "$out" -czf "$out.tgz" .
rm -rf "$out"
mkdir -p "$out"
mv "$out.tgz" "$out/bin.tgz"
du -sh "$out"
