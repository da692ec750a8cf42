#!/usr/bin/env python3
"""llama.cpp's figures for the comparison with `tools --bin chat-bench`: the same GGUF, the same chat
prompt (ChatML, system + user), greedy, the same number of new tokens; first-token latency and tokens a
second after it, median of the measured runs after one warm-up.

    pip install llama-cpp-python      # builds llama.cpp from source for this CPU
    python scripts/bench/chat_llama_cpp.py models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2
"""

import argparse
import statistics
import time

from llama_cpp import Llama

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nTell me about the history of the bicycle.<|im_end|>\n<|im_start|>assistant\n"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    llm = Llama(model_path=args.model, n_threads=args.threads, n_ctx=2048, verbose=False)
    firsts, rates = [], []
    for run in range(args.runs + 1):
        llm.reset()
        start = time.perf_counter()
        first = None
        count = 0
        for _ in llm.create_completion(
            PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True, stop=["<|im_end|>"]
        ):
            count += 1
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        rate = (count - 1) / (total - first)
        print(f"{'warm-up' if run == 0 else 'run'}: {count} tokens, first token {first * 1e3:.1f} ms, "
              f"{rate:.1f} tokens/s after it")
        if run:
            firsts.append(first * 1e3)
            rates.append(rate)
    print(f"llama.cpp: median first token {statistics.median(firsts):.1f} ms, "
          f"median {statistics.median(rates):.1f} tokens/s")


if __name__ == "__main__":
    main()
