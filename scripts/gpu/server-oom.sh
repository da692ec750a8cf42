#!/usr/bin/env bash
# On the GPU machine, after flux-parity-bench.sh has written the random FLUX.1-dev-size model to $M: the
# CUDA studio serves it (--model-dir), answers a generation, then another process takes nearly all free GPU
# memory and a generation must fail with 503 `out_of_memory` while the server keeps serving; once that
# process exits, the next generation must succeed. Writes studio.log and oom.jsonl to $OUT.
set -uo pipefail
STUDIO=${STUDIO:-.gpu/studio}; M=${M:-/tmp/flux-rand}; OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
log() { echo "$1" | tee -a "$OUT/oom.jsonl"; }
RUST_LOG=info $STUDIO serve --model-dir "$M" --device cuda --port 0 --data-dir /tmp/studio-data \
  > "$OUT/studio.out" 2> "$OUT/studio.log" &
studio=$!
for _ in $(seq 120); do grep -q "listening on" "$OUT/studio.out" 2>/dev/null && break; sleep 0.5; done
URL=$(sed -n 's/^studio listening on //p' "$OUT/studio.out")
[ -n "$URL" ] || { log '{"what": "start", "ok": false}'; tail -20 "$OUT/studio.log"; exit 1; }
gen() {  # $1: label, $2: side in pixels; prints status and the body's first 400 bytes as one JSON line
  local t0 t1 status
  t0=$(date +%s.%N)
  status=$(curl -s -o /tmp/body -w '%{http_code}' -X POST "$URL/generate/" -H 'Content-Type: application/json' \
    -d "{\"prompt\": \"a fox reading under a tree\", \"width\": $2, \"height\": $2, \"steps\": 4, \"seed\": 1}")
  t1=$(date +%s.%N)
  python3 - "$1" "$status" "$t0" "$t1" <<'EOF' | tee -a "$OUT/oom.jsonl"
import json, sys
label, status, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
body = open("/tmp/body", "rb").read()
try:
    parsed = json.loads(body)
    parsed.pop("image", None)
    parsed.pop("images", None)
    body = json.dumps(parsed)[:400]
except Exception:
    body = body[:400].decode("utf8", "replace")
print(json.dumps({"what": label, "status": status, "seconds": round(t1 - t0, 2), "body": body}))
EOF
}
gen first 512
# the hog: all free memory but 256 MiB, held until unhog
source "$(dirname "$0")/hog.sh"
hog 0.25
log "{\"what\": \"hog\", \"bytes\": $(cat /tmp/hog.ready 2>/dev/null || echo 0)}"
gen under-pressure 1024
unhog
gen after 512
kill -0 $studio 2>/dev/null && log '{"what": "server", "alive": true}' || log '{"what": "server", "alive": false}'
curl -s "$URL/health" -o /dev/null -w '{"what": "health", "status": %{http_code}}\n' | tee -a "$OUT/oom.jsonl"
kill $studio; wait $studio 2>/dev/null
grep -i -m5 "memory\|error" "$OUT/studio.log" || true
