"""Prints the figures table (markdown) of one flux-parity-bench run from its two outputs:
diffusers.json (full_size_reference.py) and ours.jsonl (flux-bench lines, peak_mem_mib lines).
Achieved TFLOP/s on both sides use flux-bench's count of one step's work at that size.

usage: python3 summarize.py OUT_DIR
"""
import json, sys

out = sys.argv[1]
ref = json.load(open(f"{out}/diffusers.json"))
ours, peaks, attn, ops, fwd = {}, {}, [], [], None
for line in open(f"{out}/ours.jsonl"):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if r["what"] == "generate":
        ours[r["size"]] = r
    elif r["what"] == "peak_mem_mib":
        peaks[r["mode"]] = r["value"] / 1024
    elif r["what"] == "attention":
        attn.append(r)
    elif r["what"] == "fused-op":
        ops.append(r)
    elif r["what"] == "forward" and r["dtype"] == "BF16":
        fwd = r


def med(xs):
    return sorted(xs)[len(xs) // 2]


rows = []
for size in (1024, 512):
    o = ours.get(size)
    if not o:
        continue
    warm = o["runs"][-1]
    flops = o["flops_per_step"]
    d_step = med(ref["step_s"]) if size == 1024 else ref.get("step_s_512")
    d_pipe = ref[f"pipeline_{size}"][-1]
    rows.append((size, warm, flops, d_step, d_pipe, peaks.get(f"generate-{size}"), ref.get(f"decode_s_{size}")))

print("| | " + " | ".join(f"ours {s}² | diffusers {s}²" for s, *_ in rows) + " |")
print("|---|" + "---|---|" * len(rows))


def line(name, cells):
    print(f"| {name} | " + " | ".join(cells) + " |")


line("28 steps end to end (text encoders, denoise, decode)",
     [c for _, w, _, _, d, *_ in rows for c in (f"{w['total_s']:.2f} s", f"{d['total_s']:.2f} s")])
line("one transformer step", [c for _, w, _, ds, *_ in rows for c in (f"{w['median_step_s']:.3f} s", f"{ds:.3f} s" if ds else "")])
line("achieved TFLOP/s in a step",
     [c for _, w, f, ds, *_ in rows for c in (f"{f / w['median_step_s'] / 1e12:.0f}", f"{f / ds / 1e12:.0f}" if ds else "")])
line("VAE decode", [c for _, w, *_, dd in rows for c in (f"{w['decode_ms'] / 1e3:.3f} s", f"{dd:.3f} s" if dd else "")])
line("peak GPU memory",
     [c for _, _, _, _, d, pk, _ in rows for c in (f"{pk:.1f} GiB in use (nvidia-smi)" if pk else "",
                                                   f"{d['peak_allocated_gib']:.1f} GiB allocated / {d.get('peak_reserved_gib', 0):.1f} reserved (torch)")])
for a in attn:
    fused = ", ".join(f"{k} {v['ms']:.2f} ms ({v['tflops']:.0f} TFLOP/s, rel. L2 {v['rel_l2_vs_f32']:.1e})"
                      for k, v in a.items() if isinstance(v, dict) and not k.startswith("backward_"))
    # The backward kernels' entries: dq, dk, dv against f32 and the whole backward's rate.
    fused += "".join(f"; {k} {v['ms']:.2f} ms ({v['tflops']:.0f} TFLOP/s, dq/dk/dv rel. L2 "
                     f"{v['dq_rel_l2_vs_f32']:.1e}/{v['dk_rel_l2_vs_f32']:.1e}/{v['dv_rel_l2_vs_f32']:.1e})"
                     for k, v in a.items() if k.startswith("backward_"))
    print(f"attention {a['shape']} strided={a['strided']}: plain {a['plain_ms']:.2f} ms "
          f"(rel. L2 {a['plain_bf16_rel_l2_vs_f32']:.1e}); fused {fused}")
for o in ops:
    print(f"{o['op']}: fused {o['fused_ms']:.3f} ms, plain {o['plain_ms']:.3f} ms; rel. L2 vs f32: "
          f"fused {o['fused_rel_l2_vs_f32']:.1e}, plain bf16 {o['plain_bf16_rel_l2_vs_f32']:.1e}")
if fwd and "fused_vs_plain" in fwd:
    print(f"one step at 1024: fused {med(fwd['step_s']):.3f} s, plain {fwd['plain_step_s']:.3f} s; "
          f"fused vs plain output cosine {fwd['fused_vs_plain']['cosine']:.5f}")
