#!/usr/bin/env bash
# On the GPU machine (docs/chat.md): the chat's language model on the GPU against llama.cpp built for it,
# on the same GGUF files: full-size Qwen2.5-3B and -7B shapes with random Q4_K weights
# (make_random_lm.py; the hub's files cannot be fetched there). Ours: `chat-bench --device cuda`
# (first token and tokens a second over greedy answers of 128 tokens, after a warm-up); llama.cpp:
# `llama-bench -ngl 99` reading a prompt of the same length (pp) and generating 128 tokens (tg).
# Needs .gpu/chat-bench.xz (the CUDA build of `tools --bin chat-bench`), .gpu/llama-bench.xz
# (llama.cpp's, docs/chat.md says how to build it) and .whl/ with gguf's wheel. MODELS (default
# "qwen2.5-3b qwen2.5-7b"). Writes $OUT/chat-gpu.jsonl (OUT default ./gpu-out).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
J="$OUT/chat-gpu.jsonl"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
mkdir -p /tmp/b
for b in chat-bench llama-bench; do
  [ -x /tmp/b/$b ] || { xz -dc .gpu/$b.xz > /tmp/b/$b && chmod +x /tmp/b/$b; } || exit 1
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for m in ${MODELS:-qwen2.5-3b qwen2.5-7b}; do
  f=/tmp/$m-q4_k.gguf
  [ -f $f ] || python3 "$HERE/make_random_lm.py" $m $f || exit 1
  /tmp/b/chat-bench --model $f --device cuda --tokens 128 --runs 3 2> "$OUT/ours-$m.log" | tee "$OUT/ours-$m.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || tail -5 "$OUT/ours-$m.log"
  # the prompt ours read: the same length for llama.cpp's prompt processing
  pp=$(sed -n 's/^run prompt \([0-9]*\) tokens.*/\1/p' "$OUT/ours-$m.txt" | head -1)
  /tmp/b/llama-bench -m $f -ngl 99 -p ${pp:-96} -n 128 -r 3 -o jsonl 2> "$OUT/llama-$m.log" | tee "$OUT/llama-$m.jsonl"
  [ "${PIPESTATUS[0]}" = 0 ] || tail -5 "$OUT/llama-$m.log"
  python3 - "$m" "$OUT/ours-$m.txt" "$OUT/llama-$m.jsonl" <<'PY' | tee -a "$J"
import json, re, sys
name, ours, llama = sys.argv[1:]
rec = {"model": name}
m = re.search(r"median first token ([\d.]+) ms, median ([\d.]+) tokens/s", open(ours).read())
if m:
    rec["ours_first_token_ms"], rec["ours_tokens_per_s"] = float(m[1]), float(m[2])
for line in open(llama):
    r = json.loads(line)
    if r.get("n_gen", 0) > 0:
        rec["llama_tokens_per_s"] = r["avg_ts"]
    elif r.get("n_prompt", 0) > 0:
        rec["llama_prompt_tokens"] = r["n_prompt"]
        # reading the prompt, then one token at the generation rate: llama.cpp's first token
        rec["llama_prompt_ms"] = r["n_prompt"] / r["avg_ts"] * 1e3
if "llama_prompt_ms" in rec and "llama_tokens_per_s" in rec:
    rec["llama_first_token_ms"] = rec["llama_prompt_ms"] + 1e3 / rec["llama_tokens_per_s"]
print(json.dumps(rec))
PY
done
