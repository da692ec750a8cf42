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
source "$(dirname "$0")/post.sh"
gen() {  # $1: label, $2: side in pixels
  post "$1" /generate/ "{\"prompt\": \"a fox reading under a tree\", \"width\": $2, \"height\": $2, \"steps\": 4, \"seed\": 1}" \
    | tee -a "$OUT/oom.jsonl"
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
