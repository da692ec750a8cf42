#!/usr/bin/env bash
# On the GPU machine (docs/chat.md): the chat's language model and FLUX sharing one GPU in the CUDA
# studio, as a user runs them. For each card size in CAPS (GiB, default "24 40"), another process holds
# the rest of the GPU (hog.sh); the studio serves the random FLUX.1-dev-size model ($M, made as
# small-gpu-bench.sh makes it) with a Qwen2.5-7B-size chat model in Q4_K (make_random_lm.py), then: a
# generation (FLUX loads under its plan), a chat answer (the chat model loads on the GPU if it fits
# beside the plan, else on the CPU with the reason logged), a second generation and a second answer, and
# /health. Every request must succeed and the server must stay up. Needs .gpu/studio.xz (the CUDA build of
# `studio`), .whl/ with diffusers' and gguf's wheels. Writes $OUT/chat-share.jsonl and the studio's logs.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
M=${M:-/tmp/flux-rand}; R=${R:-/tmp/flux-ref.safetensors}; LM=${LM:-/tmp/qwen2.5-7b-q4_k.gguf}
J="$OUT/chat-share.jsonl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/b
[ -x /tmp/b/studio ] || { xz -dc .gpu/studio.xz > /tmp/b/studio && chmod +x /tmp/b/studio; } || exit 1
if [ ! -f "$M/model_index.json" ]; then
  python3 "$HERE/full_size_reference.py" $M $R engine/tests/fixtures/tiny-flux-dev > /dev/null 2> "$OUT/model.log" \
    || { tail -20 "$OUT/model.log"; exit 1; }
fi
[ -f "$LM" ] || python3 "$HERE/make_random_lm.py" qwen2.5-7b "$LM" || exit 1
source "$HERE/hog.sh"
source "$HERE/post.sh"
request() { post "$@" | tee -a "$J"; }
for cap in ${CAPS:-24 40}; do
  hog "$cap"
  rm -rf /tmp/studio-data
  RUST_LOG=info /tmp/b/studio serve --model-dir "$M" --device cuda --port 0 --data-dir /tmp/studio-data \
    --chat-model "$LM" --chat-device auto > "$OUT/studio-$cap.out" 2> "$OUT/studio-$cap.log" &
  studio=$!
  for _ in $(seq 120); do grep -q "listening on" "$OUT/studio-$cap.out" 2>/dev/null && break; sleep 0.5; done
  URL=$(sed -n 's/^studio listening on //p' "$OUT/studio-$cap.out")
  if [ -z "$URL" ]; then
    echo "{\"cap\": $cap, \"what\": \"start\", \"ok\": false}" | tee -a "$J"; tail -20 "$OUT/studio-$cap.log"
  else
    gen='{"prompt": "a fox reading under a tree", "width": 1024, "height": 1024, "steps": 28, "seed": 1}'
    chat='{"message": "Tell me about the history of the bicycle.", "max_tokens": 64, "temperature": 0}'
    request "cap$cap-generate-1" /generate/ "$gen"
    request "cap$cap-chat-1" /chat/ "$chat"
    request "cap$cap-generate-2" /generate/ "$gen"
    request "cap$cap-chat-2" /chat/ "$chat"
    curl -s "$URL/health" -o /dev/null -w "{\"what\": \"cap$cap-health\", \"status\": %{http_code}}\n" | tee -a "$J"
    # where the chat model went, and why
    grep -i "chat model" "$OUT/studio-$cap.log" | tail -3 | cut -c1-400
    kill $studio; wait $studio 2>/dev/null
  fi
  unhog
done
