#!/usr/bin/env bash
# OpenAPI check against a freshly launched server: tests/openapi/validate.py with the test venv
# (scripts/ci/pyenv.sh, which installs openapi-spec-validator from tests/requirements.txt). Skips visibly
# (exit 0) when python3 has no venv module; fails when the venv cannot be made.
set -euo pipefail
cd "$(dirname "$0")/../.."
status=0
py=$(bash scripts/ci/pyenv.sh) || status=$?
if [ "$status" -eq 3 ]; then
  echo "SKIPPED: OpenAPI validation (python3 with venv is not available)"
  exit 0
fi
[ "$status" -eq 0 ] || exit "$status"
exec scripts/ci/with_server.sh "$py" tests/openapi/validate.py
