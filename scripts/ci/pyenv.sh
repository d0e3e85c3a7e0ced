#!/usr/bin/env bash
# Creates (once) the Python virtual environment the client tests use, at target/pyenv, with the packages
# pinned in tests/requirements.txt, and prints its python. Exits 3 when python3 (with venv) is missing,
# so callers can skip visibly.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/pyenv
stamp="$venv/.requirements"
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "python3 with venv/ensurepip is not available" >&2
  exit 3
fi
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/requirements.txt "$stamp"; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt >&2
  cp tests/requirements.txt "$stamp"
fi
echo "$PWD/$venv/bin/python"
