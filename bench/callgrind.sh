#!/bin/sh
# User-space instructions per request in Fulcrum's own process, counted by callgrind:
# repeatable whatever else the machine is doing, unlike timings. One worker, one server (a
# `fulcrum backend`), kept-alive HTTP/1.1 from h2load.
#   sh bench/callgrind.sh [REQUESTS] [CONFIG-EXTRA]
# CONFIG-EXTRA is appended to the config. FULCRUM=path measures another build (by default
# this checkout's, built here); the backend is always this checkout's `fulcrum backend`.
# CALLGRIND_OUT=path keeps the profile there, for callgrind_annotate.
set -eu
requests=${1:-20000}
extra=${2:-}
cd "$(dirname "$0")/.."
cargo build --release --quiet
fulcrum=${FULCRUM:-./target/release/fulcrum}
dir=$(mktemp -d)
trap 'kill $backend $proxy 2>/dev/null || true; rm -rf "$dir"' EXIT
./target/release/fulcrum backend --listen 127.0.0.1:18601 >/dev/null &
backend=$!
cat > "$dir/fulcrum.toml" <<TOML
workers = 1
[listeners.web]
bind = "127.0.0.1:18600"
[[listeners.web.routes]]
upstream = "app"
[upstreams.app]
servers = [{ address = "127.0.0.1:18601" }]
[access_log]
enabled = false
$extra
TOML
valgrind --tool=callgrind --callgrind-out-file="$dir/out" \
    "$fulcrum" run -c "$dir/fulcrum.toml" 2>"$dir/log" &
proxy=$!
for _ in $(seq 100); do
    grep -q "listening" "$dir/log" 2>/dev/null && break
    sleep 0.2
done
# Warm up the pool and the allocator, then measure from a fresh count.
h2load --h1 -n 2000 -c 16 http://127.0.0.1:18600/ >/dev/null
callgrind_control --zero "$proxy" >/dev/null 2>&1
h2load --h1 -n "$requests" -c 16 http://127.0.0.1:18600/ | grep -E "^requests:"
callgrind_control --dump "$proxy" >/dev/null 2>&1
sleep 1
[ -n "${CALLGRIND_OUT:-}" ] && cp "$dir/out.1" "$CALLGRIND_OUT"
total=$(callgrind_annotate "$dir/out.1" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | awk '{gsub(",","",$1); print $1}')
kill "$proxy"; wait "$proxy" 2>/dev/null || true
echo "instructions: $total"
echo "per request: $((total / requests))"
