#!/usr/bin/env python3
"""A GGUF language model at a real model's full size with random weights, for timing the chat's model
against llama.cpp on the same file (scripts/gpu/chat-gpu-bench.sh): the hub's weights cannot be
fetched where the benchmarks run, and speed depends only on the shapes and the block format.

    python3 scripts/gpu/make_random_lm.py qwen2.5-3b /tmp/qwen2.5-3b-q4_k.gguf

Every matrix in Q4_K (llama.cpp's Q4_K_M keeps a few in Q6_K), norms and biases in f32. The blocks
are random bytes with small positive scales, so every weight is finite and the logits are too. The
vocabulary has the real model's size: the 256 byte-level symbols, ChatML's special tokens and
numbered fillers, with one merge (llama.cpp requires the merges key).
"""

from __future__ import annotations

import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

# Qwen2.5's published configurations (config.json of Qwen/Qwen2.5-3B-Instruct and -7B-Instruct).
SHAPES = {
    "qwen2.5-3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, ff=11008, vocab=151936, tied=True),
    "qwen2.5-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, ff=18944, vocab=152064, tied=False),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the byte-level BPE alphabet."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


def q4_k(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
    blocks = rows * cols // block_elems
    data = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    # d and dmin (f16) lead each block: small and positive, so weights stay around ±0.02.
    scales = np.empty((blocks, 2), dtype=np.float16)
    scales[:, 0] = 0.0005
    scales[:, 1] = 0.004
    data[:, :4] = scales.view(np.uint8)
    return data.reshape(rows, cols // block_elems * block_bytes)


def main() -> None:
    name, path = sys.argv[1], sys.argv[2]
    s = SHAPES[name]
    rng = np.random.default_rng(0)
    h, kv = s["hidden"], s["kv_heads"] * (s["hidden"] // s["heads"])
    w = GGUFWriter(path, "qwen2")
    w.add_name(f"random {name}")
    w.add_context_length(32768)
    w.add_embedding_length(h)
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_file_type(15)  # mostly Q4_K
    tokens = byte_symbols() + ["Ġt"]
    tokens += SPECIALS + [f"<|filler{i}|>" for i in range(s["vocab"] - len(tokens) - len(SPECIALS))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    qt = GGMLQuantizationType.Q4_K

    def matrix(tensor: str, rows: int, cols: int) -> None:
        w.add_tensor(tensor, q4_k(rows, cols, rng), raw_dtype=qt)  # shape from the bytes

    def vector(tensor: str, n: int, around: float, spread: float) -> None:
        w.add_tensor(tensor, (around + spread * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", s["vocab"], h)
    for i in range(s["layers"]):
        p = f"blk.{i}"
        vector(f"{p}.attn_norm.weight", h, 1.0, 0.1)
        matrix(f"{p}.attn_q.weight", h, h)
        matrix(f"{p}.attn_k.weight", kv, h)
        matrix(f"{p}.attn_v.weight", kv, h)
        vector(f"{p}.attn_q.bias", h, 0.0, 0.1)
        vector(f"{p}.attn_k.bias", kv, 0.0, 0.1)
        vector(f"{p}.attn_v.bias", kv, 0.0, 0.1)
        matrix(f"{p}.attn_output.weight", h, h)
        vector(f"{p}.ffn_norm.weight", h, 1.0, 0.1)
        matrix(f"{p}.ffn_gate.weight", s["ff"], h)
        matrix(f"{p}.ffn_up.weight", s["ff"], h)
        matrix(f"{p}.ffn_down.weight", h, s["ff"])
    vector("output_norm.weight", h, 1.0, 0.1)
    if not s["tied"]:
        matrix("output.weight", s["vocab"], h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
