#!/usr/bin/env bash
# Runs a command against a freshly launched server: starts target/debug/lorax-launcher (or $LAUNCHER) on
# the embedded model with the fixture adapters under an allowed local root, waits for /health, exports
# LORAX_URL (http://127.0.0.1:PORT), LORAX_GRPC_ADDR (127.0.0.1:PORT of the public gRPC API) and
# LORAX_LOG (the server's log file), runs "$@", then stops the server (SIGTERM) and returns the
# command's status. Extra launcher flags: $LAUNCHER_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
launcher=${LAUNCHER:-target/debug/lorax-launcher}
[ -x "$launcher" ] || { echo "$launcher not built (cargo build --workspace --bins)" >&2; exit 1; }
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
grpc_port=$(free_port)
export LORAX_URL="http://127.0.0.1:$port"
export LORAX_GRPC_ADDR="127.0.0.1:$grpc_port"
export LORAX_LOG="$work/server.log"
# shellcheck disable=SC2086
"$launcher" --port "$port" --grpc-port "$grpc_port" --hostname 127.0.0.1 --embedded-dir "$work" --shard-uds-dir "$work/uds" \
  --adapter-local-roots "$PWD/tests/fixtures/adapters" --num-blocks 512 --max-input-length 256 \
  --max-total-tokens 512 --max-batch-prefill-tokens 1024 ${LAUNCHER_ARGS:-} >"$LORAX_LOG" 2>&1 &
pid=$!
stop() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT
for _ in $(seq 1 600); do
  if curl -sf "$LORAX_URL/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the server exited during startup:" >&2
    tail -50 "$LORAX_LOG" >&2
    exit 1
  fi
  sleep 0.1
done
curl -sf "$LORAX_URL/health" >/dev/null || { echo "server not healthy after 60 s" >&2; tail -50 "$LORAX_LOG" >&2; exit 1; }
status=0
"$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "---- last server log lines ----" >&2
  tail -40 "$LORAX_LOG" >&2
fi
exit "$status"
