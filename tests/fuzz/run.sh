#!/usr/bin/env bash
# Schema fuzzing: schemathesis (pinned in tests/requirements.txt) generates requests from the running
# server's OpenAPI document (GET /api-doc/openapi.json), valid and invalid, for every operation, against
# a freshly launched server (scripts/ci/with_server.sh). It fails on any 5xx, on an invalid request that
# is accepted (negative_data_rejection), on a response whose content type the document does not list,
# and if the server is no longer healthy afterwards.
#   LORAX_FUZZ_EXAMPLES  examples per operation and phase (default 10: ~1,500 requests, ~20 s on 2 cores)
#   LORAX_FUZZ_SEED      seed (default 1, reproducible in CI; "random" for a new one each run)
# Longer runs on demand: LORAX_FUZZ_EXAMPLES=500 LORAX_FUZZ_SEED=random bash tests/fuzz/run.sh
# Skips visibly (exit 0) when python3 has no venv module; fails when the venv cannot be made.
set -euo pipefail
cd "$(dirname "$0")/../.."
status=0
py=$(bash scripts/ci/pyenv.sh) || status=$?
if [ "$status" -eq 3 ]; then
  echo "SKIPPED: schema fuzzing (python3 with venv is not available)"
  exit 0
fi
[ "$status" -eq 0 ] || exit "$status"
seed=()
if [ "${LORAX_FUZZ_SEED:-1}" != random ]; then seed=(--seed "${LORAX_FUZZ_SEED:-1}"); fi
export PY="$py" EXAMPLES="${LORAX_FUZZ_EXAMPLES:-10}" SEED_ARGS="${seed[*]}"
# shellcheck disable=SC2016
# A failed check or a request the server did not answer fails the run. An error inside schemathesis
# itself (a "Runtime Error" while generating cases, seen with Python 3.11's AST recursion check) is not
# the server's: it is reported and tolerated when nothing else went wrong.
exec scripts/ci/with_server.sh bash -c '
  set -uo pipefail
  out=$(mktemp)
  # shellcheck disable=SC2086
  "$(dirname "$PY")/schemathesis" run "$LORAX_URL/api-doc/openapi.json" --url "$LORAX_URL" \
    --checks not_a_server_error,negative_data_rejection,content_type_conformance \
    --max-examples "$EXAMPLES" $SEED_ARGS --workers 2 --request-timeout 60 \
    --generation-database none --no-color >"$out" 2>&1
  rc=$?
  # Its tracebacks quote whole source files: lines are cut for the log.
  if [ "$rc" -ne 0 ]; then
    errors=$(grep -cE "^(Runtime Error|Network Error|Connection Error|Timeout Error|Unknown Error)" "$out" || true)
    runtime=$(grep -c "^Runtime Error" "$out" || true)
    if grep -q "= FAILURES =" "$out" || [ "$errors" -ne "$runtime" ] || [ "$runtime" -eq 0 ]; then
      cut -c1-1000 "$out" | tail -400
      echo "schema fuzzing failed (schemathesis exit $rc)" >&2
      exit 1
    fi
    grep -A3 "^Runtime Error" "$out" | cut -c1-300
    echo "NOTE: $runtime schemathesis-internal runtime error(s) while generating cases; no check failed"
  fi
  sed -n "/= SUMMARY =/,\$p" "$out" | cut -c1-300
  curl -sf "$LORAX_URL/health" >/dev/null || { echo "the server is not healthy after fuzzing" >&2; exit 1; }
  echo "schema fuzzing: no 5xx, invalid requests refused, server healthy"
'
