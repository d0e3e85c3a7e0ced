#!/usr/bin/env bash
# Prometheus scrape test: a real Prometheus server (the Debian package `prometheus`, which .ci/run
# installs) scrapes a freshly launched server's /metrics; after N requests its query API must report
# lorax_request_count, lorax_request_success and lorax_request_duration_count equal to N. Skips visibly
# (exit 0) when the prometheus binary is absent. Needs target/debug binaries (cargo build --workspace --bins).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v prometheus >/dev/null 2>&1; then
  echo "SKIPPED: Prometheus scrape test (no prometheus binary; .ci/run installs the Debian package)"
  exit 0
fi
exec scripts/ci/with_server.sh bash tests/prometheus/scrape.sh "${@}"
