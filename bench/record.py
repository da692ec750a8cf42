"""Turns one GPU run's raw output into its compact record for bench/results/ (the figures tables in the
README and docs are rendered from those records: `cargo run -p tools -- bench-tables`).

  python3 bench/record.py generation OUT_DIR   # from scripts/gpu/flux-parity-bench.sh's OUT_DIR
  python3 bench/record.py training OUT_DIR     # scripts/gpu/train-memory-bench.sh's OUT_DIR (+ bench_train_ref.py's output as peft.txt)
  python3 bench/record.py small-gpu OUT_DIR    # scripts/gpu/small-gpu-bench.sh's OUT_DIR
  python3 bench/record.py edit OUT_DIR         # scripts/gpu/edit-bench.sh's OUT_DIR
  python3 bench/record.py speed OUT_DIR        # scripts/gpu/speed-bench.sh's OUT_DIR
  python3 bench/record.py chat-gpu OUT_DIR     # scripts/gpu/chat-gpu-bench.sh's OUT_DIR
  python3 bench/record.py block-accuracy OUT_DIR   # scripts/bench/block-accuracy.sh's OUT_DIR (CPU or GPU)

Options: --date YYYY-MM-DD (default today), --gpu NAME (default: OUT_DIR/gpu.txt's first field), --run N,
--command "..." (what was run), --change "..." (what the run changed). The record goes to stdout; save it as bench/results/DATE-WHAT-runN.json.
"""
import argparse, datetime, json, re, statistics, sys


def lines(path):
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)


def r(x, digits=4):
    return None if x is None else round(float(x), digits)


def generation(out):
    ref = json.load(open(f"{out}/diffusers.json"))
    gens, batches, cache, peaks, attention, ops, forward = {}, {}, None, {}, [], [], None
    for rec in lines(f"{out}/ours.jsonl"):
        what = rec.get("what")
        if what == "generate" and "step_cache" in rec:
            cache = rec
        elif what == "generate" and rec.get("batch", 1) > 1:
            batches[(rec["size"], rec["batch"])] = rec
        elif what == "generate":
            gens[rec["size"]] = rec
        elif what == "peak_mem_mib":
            peaks[rec["mode"]] = rec["value"]
        elif what == "attention":
            attention.append(rec)
        elif what == "fused-op":
            ops.append(rec)
        elif what == "forward" and rec.get("dtype") == "BF16":
            forward = rec
    sizes = []
    for size in sorted(gens, reverse=True):
        warm = gens[size]["runs"][-1]  # the first run includes loading the text encoders' kernels
        flops = gens[size]["flops_per_step"]
        step_ref = statistics.median(ref["step_s"]) if size == 1024 else ref.get(f"step_s_{size}")
        pipe = ref[f"pipeline_{size}"][-1]
        sizes.append({
            "size": size,
            "steps": gens[size]["steps"],
            "ours": {
                "total_s": r(warm["total_s"], 3),
                "step_s": r(warm["median_step_s"]),
                "step_tflops": r(flops / warm["median_step_s"] / 1e12, 1),
                "decode_s": r(warm["decode_ms"] / 1e3, 3),
                "peak_in_use_gib": r(peaks.get(f"generate-{size}", 0) / 1024, 1),
            },
            "reference": {
                "total_s": r(pipe["total_s"], 3),
                "step_s": r(step_ref),
                "step_tflops": r(flops / step_ref / 1e12, 1) if step_ref else None,
                "decode_s": r(ref.get(f"decode_s_{size}"), 3),
                "peak_allocated_gib": r(pipe["peak_allocated_gib"], 1),
                "peak_reserved_gib": r(pipe.get("peak_reserved_gib"), 1),
            },
        })
    record = {"what": "generation", "sizes": sizes,
              "reference": "diffusers " + ref["versions"]["diffusers"] + ", torch " + ref["versions"]["torch"]}
    # Several images a request: ours `flux-bench generate --batch N` (batch 1 is the plain run), diffusers'
    # `num_images_per_prompt` (full_size_reference.py's batches_SIZE).
    for size in sorted({s for s, _ in batches}):
        theirs = {b["num_images"]: b for b in ref.get(f"batches_{size}", [])}
        rows = []
        for n in sorted({1, *[b for s, b in batches if s == size], *theirs}):
            mine = gens.get(size) if n == 1 else batches.get((size, n))
            warm = mine["runs"][-1] if mine else None
            mode = f"generate-{size}" if n == 1 else f"generate-{size}-b{n}"
            rows.append({
                "size": size, "images": n,
                "ours": warm and {
                    "total_s": r(warm["total_s"], 3),
                    "images_per_minute": r(n * 60 / warm["total_s"], 2),
                    "peak_in_use_gib": r(peaks[mode] / 1024, 1) if mode in peaks else None,
                },
                "reference": n in theirs and {
                    "total_s": r(theirs[n]["total_s"], 3),
                    "images_per_minute": r(n * 60 / theirs[n]["total_s"], 2),
                    "peak_allocated_gib": r(theirs[n]["peak_allocated_gib"], 1),
                } or None,
            })
        record.setdefault("batches", []).extend(rows)
    if cache:
        full, cached = cache["runs"][-1], cache["step_cache"]["runs"][-1]
        record["step_cache"] = {
            "size": cache["size"], "steps": cache["steps"], "threshold": cache["step_cache"]["threshold"],
            "full_total_s": r(full["total_s"], 3), "cached_total_s": r(cached["total_s"], 3),
            "skipped_steps": cached["skipped_steps"], "image_error": r(cached["image_error"], 4),
        }
    if forward:
        record["step_1024"] = {
            "bare_s": r(statistics.median(forward["step_s"])),
            "one_lora_r16_s": r(forward.get("lora_r16_step_s")),
            "two_loras_r16_s": r(forward.get("two_loras_r16_step_s")),
            "plain_ops_s": r(forward.get("plain_step_s")),
            "vs_diffusers_bf16_cosine": r(forward.get("diffusers_bf16", {}).get("cosine"), 5),
            "vs_diffusers_f32_cosine": r(forward.get("diffusers_f32", {}).get("cosine"), 5),
            # diffusers' own bf16 step against its f32 one: how far bf16 rounding alone moves
            # this random-weight network, the yardstick for the two lines above.
            "diffusers_bf16_vs_f32_cosine": r(ref.get("diffusers_bf16_vs_f32", {}).get("cosine"), 5),
        }
    record["kernels"] = [
        {"op": f"attention {'x'.join(map(str, a['shape']))}{' strided' if a['strided'] else ''}",
         "plain_ms": r(a["plain_ms"], 3),
         "fused_ms": r(min(v["ms"] for k, v in a.items() if isinstance(v, dict) and not k.startswith("backward_")), 3),
         "fused_rel_l2_vs_f32": r(max(v["rel_l2_vs_f32"] for k, v in a.items()
                                      if isinstance(v, dict) and not k.startswith("backward_")), 5),
         "plain_bf16_rel_l2_vs_f32": r(a["plain_bf16_rel_l2_vs_f32"], 5),
         "fused_tflops": r(max(v["tflops"] for k, v in a.items() if isinstance(v, dict) and not k.startswith("backward_")), 0)}
        for a in attention
    ] + [
        {"op": o["op"], "plain_ms": r(o["plain_ms"], 3), "fused_ms": r(o["fused_ms"], 3),
         "fused_rel_l2_vs_f32": r(o["fused_rel_l2_vs_f32"], 5),
         "plain_bf16_rel_l2_vs_f32": r(o["plain_bf16_rel_l2_vs_f32"], 5)}
        for o in ops
    ]
    return record


PEFT = re.compile(r"RESULT peft .* (\d+)x\d+ .*grad_ckpt=(True|False): ([0-9.]+) s/step, peak ([0-9.]+) GiB allocated")


def training(out):
    ours, peaks = {}, {}
    import os
    name = "train.jsonl" if os.path.exists(f"{out}/train.jsonl") else "summary.jsonl"
    for rec in lines(f"{out}/{name}"):
        if rec.get("what") == "train":
            ours[(rec["size"], rec["checkpointing"])] = rec
        elif rec.get("what") == "peak_mem_mib":
            size = int(rec["case"].split("-")[0])
            peaks[(size, not rec["case"].endswith("-off"))] = rec["value"]
    ref = {}
    try:
        for line in open(f"{out}/peft.txt"):
            m = PEFT.search(line)
            if m:
                ref[(int(m[1]), m[2] == "True")] = {"step_s": r(m[3], 3), "peak_allocated_gib": r(m[4], 1)}
    except FileNotFoundError:
        pass
    cases = []
    for key in sorted(ours, key=lambda k: (k[0], k[1])):
        o = ours[key]
        cases.append({
            "size": key[0], "checkpointing": key[1],
            "ours": {"step_s": r(o["median_step_s"], 3), "peak_in_use_gib": r(peaks.get(key, 0) / 1024, 1)},
            "reference": ref.get(key),
        })
    any_ = next(iter(ours.values()))
    return {"what": "lora-training", "rank": any_["rank"], "targets": any_["targets"].lower(),
            "text_tokens": any_["text_tokens"], "reference": "peft + diffusers (bench_train_ref.py)", "cases": cases}


def small_gpu(out):
    """Weight formats (step, accuracy against diffusers, a whole 1024x1024 generation) and emulated card
    sizes (our plan and time beside diffusers' configurations under the same cap)."""
    recs = list(lines(f"{out}/small-gpu.jsonl"))
    peaks = {x["label"]: x for x in recs if x.get("what") == "peak_mem_mib"}
    by_label = {x["label"]: x for x in recs if x.get("what") != "peak_mem_mib"}
    gib = lambda label: r(peaks[label]["value"] / 1024, 1) if label in peaks and peaks[label]["rc"] == 0 else None
    try:
        ref = json.load(open(f"{out}/diffusers.json"))
    except FileNotFoundError:
        ref = {}
    formats = []
    for label, rec in by_label.items():
        if rec.get("what") != "forward":
            continue
        f = rec["weights"]
        gen = by_label.get(f"generate-1024-{f}")
        formats.append({
            "weights": f, "step_s": r(statistics.median(rec["step_s"])),
            "vs_diffusers_bf16_cosine": r(rec["diffusers_bf16"]["cosine"], 5),
            "vs_diffusers_f32_cosine": r(rec["diffusers_f32"]["cosine"], 5),
            "forward_peak_in_use_gib": gib(label),
            "total_s_1024": r(gen["runs"][-1]["total_s"], 3) if gen else None,
            "generate_peak_in_use_gib": gib(f"generate-1024-{f}") if gen else None,
        })
    caps = {}
    for label in list(by_label) + list(peaks):
        m = re.fullmatch(r"generate-1024-cap(\d+)|diffusers-cap(\d+)-(\w+)", label)
        if not m:
            continue
        cap = int(m[1] or m[2])
        c = caps.setdefault(cap, {"cap_gib": cap, "ours": None, "reference": []})
        rec = by_label.get(label)
        if m[1]:
            if c["ours"] is not None:
                continue
            if rec:
                c["ours"] = {"plan": rec.get("plan"), "total_s": r(rec["runs"][-1]["total_s"], 3),
                             "first_total_s": r(rec["runs"][0]["total_s"], 3), "peak_in_use_gib": gib(label),
                             "encode_s": r(rec["runs"][-1].get("encode_ms", 0) / 1000, 3)}
            else:
                c["ours"] = {"error": peaks[label].get("error") or f"exit {peaks[label]['rc']}"}
        elif not any(x["how"] == m[3] for x in c["reference"]):
            if rec and "runs" in rec:
                c["reference"].append({"how": m[3], "total_s": r(rec["runs"][-1]["s"], 3),
                                       "peak_allocated_gib": r(rec["runs"][-1]["peak_alloc_gib"], 1)})
            elif rec and "oom" in rec:
                c["reference"].append({"how": m[3], "oom": True})
            else:
                p = peaks.get(label, {})
                c["reference"].append({"how": m[3], "error": p.get("error") or f"exit {p.get('rc')}"})
    # LoRA training on each card (train-memory-bench.sh's capN/SIZE-FORMAT cases), when OUT holds
    # its summary as train-summary.jsonl: each peak line is followed by its run's record if it finished.
    try:
        train = list(lines(f"{out}/train-summary.jsonl"))
    except FileNotFoundError:
        train = []
    for i, rec in enumerate(train):
        if rec.get("what") != "peak_mem_mib" or not rec.get("cap_gib"):
            continue
        size, weights = rec["case"].split("-")[:2]
        cap = int(rec["cap_gib"])
        c = caps.setdefault(cap, {"cap_gib": cap, "ours": None, "reference": []})
        row = {"size": int(size), "weights": weights, "peak_in_use_gib": r(rec["value"] / 1024, 1)}
        nxt = train[i + 1] if i + 1 < len(train) else {}
        if rec["rc"] == 0 and nxt.get("what") == "train":
            row["step_s"] = r(nxt["median_step_s"], 3)
        else:
            err = rec.get("error") or f"exit {rec['rc']}"
            row["error"] = "out of memory" if "OUT_OF_MEMORY" in err else err
        c.setdefault("training", []).append(row)
    pipe = ref.get("pipeline_1024")
    return {"what": "small-gpu", "reference": f"diffusers {ref.get('versions', {}).get('diffusers', '0.42.1')}",
            "diffusers_bf16_1024_s": r(pipe[-1]["total_s"], 3) if pipe else None,
            "diffusers_bf16_vs_f32_cosine": r(ref.get("diffusers_bf16_vs_f32", {}).get("cosine"), 5),
            "formats": formats, "caps": [caps[k] for k in sorted(caps, reverse=True)]}


def edit(out):
    """Image-to-image and a Kontext edit at 1024x1024, ours beside diffusers' pipelines."""
    recs = {x["label"]: x for x in lines(f"{out}/edit.jsonl")}
    cases = []
    for mode in ("img2img", "kontext"):
        ours, theirs = recs.get(f"{mode}-ours"), recs.get(f"{mode}-diffusers")
        cases.append({
            "mode": mode, "strength": (ours or {}).get("edit", {}).get("strength"),
            "ours_s": r(ours["runs"][-1]["total_s"], 3) if ours else None,
            "ours_step_s": r(ours["runs"][-1]["median_step_s"]) if ours else None,
            "reference_s": r(theirs["runs"][-1]["s"], 3) if theirs and "runs" in theirs else None,
            "reference_peak_allocated_gib": r(theirs["runs"][-1]["peak_alloc_gib"], 1) if theirs and "runs" in theirs else None,
        })
    return {"what": "edit", "reference": "diffusers FluxImg2ImgPipeline / FluxKontextPipeline (anchors_ref.py)",
            "size": 1024, "steps": 28, "cases": cases}


def speed(out):
    """Ours beside diffusers where the generation record does not reach: diffusers with torch.compile
    (its compile time and warm time) against ours at 1024x1024, a wide size (1360x768) against
    diffusers eager, and our Ampere path (`flux-bench --ampere`) on the same GPU. Each line of
    speed.jsonl is labelled: ours-1024, compile-diffusers, wide-ours, wide-diffusers, ampere-forward,
    ampere-generate."""
    recs = {x["label"]: x for x in lines(f"{out}/speed.jsonl")}
    last = lambda rec, key: r(rec["runs"][-1][key], 3) if rec and rec.get("runs") else None
    ours, comp = recs.get("ours-1024"), recs.get("compile-diffusers")
    wide_ours, wide_ref = recs.get("wide-ours"), recs.get("wide-diffusers")
    amp_fwd, amp_gen = recs.get("ampere-forward"), recs.get("ampere-generate")
    versions = (comp or wide_ref or {}).get("versions", {})
    return {
        "what": "speed", "reference": f"diffusers {versions.get('diffusers', '0.42.1')}, torch {versions.get('torch', '?')}",
        "compile": {"ours_s": last(ours, "total_s"), "ours_step_s": last(ours, "median_step_s"),
                    "diffusers_compile_s": last(comp, "s"),
                    "diffusers_first_call_s": r((comp or {}).get("first_call_wall_s"), 1),
                    "error": (comp or {}).get("oom") or (None if comp else "not run")},
        "wide": {"width": (wide_ours or {}).get("size"), "height": (wide_ours or {}).get("height"),
                 "ours_s": last(wide_ours, "total_s"), "ours_step_s": last(wide_ours, "median_step_s"),
                 "diffusers_s": last(wide_ref, "s")},
        "ampere": {"step_s": r(statistics.median(amp_fwd["step_s"])) if amp_fwd else None,
                   "vs_diffusers_bf16_cosine": r(amp_fwd["diffusers_bf16"]["cosine"], 5) if amp_fwd else None,
                   "vs_diffusers_f32_cosine": r(amp_fwd["diffusers_f32"]["cosine"], 5) if amp_fwd and "diffusers_f32" in amp_fwd else None,
                   "total_s_1024": last(amp_gen, "total_s"), "gen_step_s": last(amp_gen, "median_step_s")},
    }


def chat_gpu(out):
    """The chat's language model on the GPU (chat-bench) beside llama.cpp's llama-bench on the same
    GGUF files (scripts/gpu/chat-gpu-bench.sh's chat-gpu.jsonl)."""
    models = []
    for rec in lines(f"{out}/chat-gpu.jsonl"):
        models.append({
            "model": rec["model"], "prompt_tokens": rec.get("llama_prompt_tokens"),
            "ours_first_token_ms": r(rec.get("ours_first_token_ms"), 1),
            "ours_tokens_per_s": r(rec.get("ours_tokens_per_s"), 1),
            "reference_first_token_ms": r(rec.get("llama_first_token_ms"), 1),
            "reference_tokens_per_s": r(rec.get("llama_tokens_per_s"), 1),
        })
    return {"what": "chat-gpu", "reference": "llama.cpp (llama-bench, CUDA, all layers on the GPU)",
            "tokens": 128, "models": models}


def block_accuracy(out):
    """Each weight format's output of one FLUX.1-dev block (double, single) at full width against
    diffusers' bf16 and f32 outputs of the same bf16 weights (scripts/bench/block-accuracy.sh)."""
    refs = {x["block"]: x for x in lines(f"{out}/references.jsonl")}
    ours = list(lines(f"{out}/ours.jsonl"))
    blocks = []
    for name, ref in refs.items():
        double = name == "double"
        formats = []
        for rec in ours:
            if (rec["blocks"][0] > 0) != double:
                continue
            formats.append({
                "weights": rec["weights"], "dtype": rec["dtype"],
                "vs_diffusers_bf16_cosine": r(rec["diffusers_bf16"]["cosine"], 6),
                "vs_diffusers_f32_cosine": r(rec["diffusers_f32"]["cosine"], 6),
                "vs_diffusers_f32_max_rel": r(rec["diffusers_f32"]["max_abs_diff_over_max_abs"], 5),
            })
        blocks.append({"block": name, "size": ref["size"],
                       "diffusers_bf16_vs_f32_cosine": r(ref["diffusers_bf16_vs_f32"]["cosine"], 6),
                       "diffusers_bf16_vs_f32_max_rel": r(ref["diffusers_bf16_vs_f32"]["max_abs_diff_over_max_abs"], 5),
                       "formats": formats})
    return {"what": "block-accuracy", "reference": "diffusers 0.42.1", "blocks": blocks}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["generation", "training", "small-gpu", "edit", "speed", "chat-gpu", "block-accuracy"])
    p.add_argument("out")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--gpu")
    p.add_argument("--run", type=int)
    p.add_argument("--command")
    p.add_argument("--change", help="what this run changed, for the history tables")
    a = p.parse_args()
    gpu = a.gpu
    if not gpu:
        try:
            gpu = open(f"{a.out}/gpu.txt").read().split(",")[0].strip()
        except FileNotFoundError:
            sys.exit("no --gpu and no OUT_DIR/gpu.txt")
    body = {"generation": generation, "training": training, "small-gpu": small_gpu, "edit": edit, "speed": speed, "chat-gpu": chat_gpu,
            "block-accuracy": block_accuracy}[a.what](a.out)
    head = {"date": a.date, "run": a.run, "gpu": gpu, "command": a.command, "change": a.change}
    print(json.dumps({**head, **body}, indent=1))


if __name__ == "__main__":
    main()
