#!/usr/bin/env bash
# The body of tests/prometheus/run.sh, run by scripts/ci/with_server.sh (which exports LORAX_URL): starts
# Prometheus with a generated config scraping $LORAX_URL/metrics every 250 ms, waits until the target is
# up, sends N (default 5) /generate requests, then polls the query API (deadline, no fixed waits) until
# the request counters equal N. Prometheus's own log is printed on failure.
set -euo pipefail
n=${1:-5}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
prom="http://127.0.0.1:$port"
target=${LORAX_URL#http://}
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 250ms
  scrape_timeout: 200ms
scrape_configs:
  - job_name: lorax
    metrics_path: /metrics
    static_configs:
      - targets: ["$target"]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address="127.0.0.1:$port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
cleanup() {
  kill -TERM "$prom_pid" 2>/dev/null || true
  wait "$prom_pid" 2>/dev/null || true
  rm -rf "$work"
}
fail() {
  echo "FAILED: $*" >&2
  echo "---- prometheus log ----" >&2
  tail -30 "$work/prometheus.log" >&2
  exit 1
}
trap cleanup EXIT

# Polls "$@" (a command printing a value) every 100 ms until it prints $expected, for at most 60 s.
wait_for() {
  local what=$1 expected=$2 value=""
  shift 2
  local deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$prom_pid" 2>/dev/null || fail "prometheus exited"
    value=$("$@" 2>/dev/null || true)
    [ "$value" = "$expected" ] && return 0
    sleep 0.1
  done
  fail "$what: expected $expected, last value ${value:-<none>}"
}

# The value of an instant query ("" when Prometheus has no sample yet).
query() {
  curl -sf --get "$prom/api/v1/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
print(result[0]["value"][1] if result else "")'
}

# Health of the scrape target as Prometheus sees it.
target_health() {
  curl -sf "$prom/api/v1/targets" | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
print(targets[0]["health"] if targets else "")'
}

wait_for "prometheus ready" "ok" bash -c "curl -sf '$prom/-/ready' >/dev/null && echo ok"
wait_for "scrape target health" "up" target_health
echo "prometheus $prom scrapes $LORAX_URL/metrics"

for i in $(seq 1 "$n"); do
  status=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
    -d "{\"inputs\": \"Prometheus request $i\", \"parameters\": {\"max_new_tokens\": 3}}" "$LORAX_URL/generate")
  [ "$status" = 200 ] || fail "request $i answered $status"
done
echo "sent $n /generate requests"

for metric in lorax_request_count lorax_request_success lorax_request_duration_count; do
  wait_for "$metric" "$n" query "sum($metric{job=\"lorax\"})"
  echo "  $metric = $n"
done
# The histograms are real Prometheus histograms (buckets, quantiles computable).
p50=$(query 'histogram_quantile(0.5, sum by (le) (lorax_request_duration_bucket{job="lorax"}))')
[ -n "$p50" ] && [ "$p50" != "NaN" ] || fail "no median request duration from the buckets (got '${p50}')"
echo "  median lorax_request_duration = ${p50}s"
echo "PASSED: Prometheus scrape test"
