"""Full-size FLUX.1-dev with random bf16 weights, on the GPU machine: writes the pipeline in
diffusers' layout (so our binary reads the very same weights), one transformer step on fixed
inputs as the parity reference, and diffusers' end-to-end timings.

usage: python3 full_size_reference.py MODEL_DIR REF_FILE TOKENIZER_SOURCE_DIR > diffusers.json
TOKENIZER_SOURCE_DIR: a diffusers FLUX folder whose tokenizer/ and tokenizer_2/ are copied
(the tiny fixtures' tokenizers: their ids fit the real vocabularies).
"""
import json, os, shutil, sys, time

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, AutoTokenizer

model_dir, ref_file, tok_src = sys.argv[1:4]
dev, dt = torch.device("cuda"), torch.bfloat16
GiB = 1 << 30
torch.manual_seed(0)
log = {}


@torch.no_grad()
def randomize(model, std=0.02):
    # never zeros: every parameter random; norm scales around 1
    for name, prm in model.named_parameters():
        if prm.ndim == 1 and "norm" in name and name.endswith("weight"):
            prm.normal_(1.0, std)
        else:
            prm.normal_(0.0, std)


def build(ctor):
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):
            m = ctor()
    finally:
        torch.set_default_dtype(torch.float32)
    m = m.to(dev, dt).eval()
    randomize(m)
    return m


t0 = time.perf_counter()
transformer = build(lambda: FluxTransformer2DModel(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56)))
t5 = build(lambda: T5EncoderModel(T5Config(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)))
clip = build(lambda: CLIPTextModel(CLIPTextConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=912,
    eos_token_id=913, pad_token_id=913)))
vae = build(lambda: AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True))
sched = FlowMatchEulerDiscreteScheduler(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096)
tok = AutoTokenizer.from_pretrained(f"{tok_src}/tokenizer")
tok2 = AutoTokenizer.from_pretrained(f"{tok_src}/tokenizer_2")
pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                    tokenizer_2=tok2, transformer=transformer)
log["init_s"] = time.perf_counter() - t0
t0 = time.perf_counter()
pipe.save_pretrained(model_dir)
# the same tokenizer files our loader reads (transformers 5 may write other names)
for d in ("tokenizer", "tokenizer_2"):
    shutil.rmtree(f"{model_dir}/{d}", ignore_errors=True)
    shutil.copytree(f"{tok_src}/{d}", f"{model_dir}/{d}")
log["save_s"] = time.perf_counter() - t0
print("saved", log, file=sys.stderr, flush=True)

# one transformer step at 1024x1024 on fixed inputs: the parity reference
H = W = 128
g = torch.Generator(device=dev).manual_seed(1)
img = torch.randn(1, (H // 2) * (W // 2), 64, device=dev, dtype=dt, generator=g)
txt = torch.randn(1, 512, 4096, device=dev, dtype=dt, generator=g)
pooled = torch.randn(1, 768, device=dev, dtype=dt, generator=g)
img_ids = FluxPipeline._prepare_latent_image_ids(1, H // 2, W // 2, dev, torch.float32)
txt_ids = torch.zeros(512, 3, device=dev, dtype=torch.float32)
t = torch.full([1], 0.75, device=dev, dtype=torch.float32)
gd = torch.full([1], 3.5, device=dev, dtype=torch.float32)
with torch.inference_mode():
    out = transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t.to(dt),
                      img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)[0]
    torch.cuda.synchronize()
    steps = []
    for _ in range(3):
        s = time.perf_counter()
        transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t.to(dt),
                    img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - s)
log["step_s"] = steps


@torch.no_grad()
def median_s(fn, n=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    return sorted(times)[n // 2]


# per-step time at 512x512 (1024 image tokens) and the VAE decode at both sizes, on random inputs
h5 = 64
img5 = torch.randn(1, (h5 // 2) ** 2, 64, device=dev, dtype=dt, generator=g)
ids5 = FluxPipeline._prepare_latent_image_ids(1, h5 // 2, h5 // 2, dev, torch.float32)
log["step_s_512"] = median_s(lambda: transformer(
    hidden_states=img5, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t.to(dt), img_ids=ids5,
    txt_ids=txt_ids, guidance=gd, return_dict=False))
for size in (1024, 512):
    z = torch.randn(1, 16, size // 8, size // 8, device=dev, dtype=dt, generator=g)
    log[f"decode_s_{size}"] = median_s(lambda: vae.decode(z, return_dict=False))
save_file({"hidden_states": img.contiguous(), "encoder_hidden_states": txt.contiguous(),
           "pooled_projections": pooled.contiguous(), "img_ids": img_ids.contiguous(), "txt_ids": txt_ids,
           "timestep": t, "guidance": gd, "out": out.contiguous()}, ref_file)

for size in (1024, 512):
    runs = []
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        s = time.perf_counter()
        pipe("a fox reading under a tree, watercolor", height=size, width=size, num_inference_steps=28,
             guidance_scale=3.5, max_sequence_length=512, generator=torch.Generator(device=dev).manual_seed(0),
             output_type="pil")
        torch.cuda.synchronize()
        runs.append({"total_s": time.perf_counter() - s, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB})
    log[f"pipeline_{size}"] = runs
# Images per minute with several images a request (`num_images_per_prompt`), warm (the second of two runs):
# beside ours `flux-bench generate --batch N` in the same call. BATCHES="1 2 4", BATCH_SIZE=1024 by default.
batch_size = int(os.environ.get("BATCH_SIZE", "1024"))
log[f"batches_{batch_size}"] = []
for n in map(int, os.environ.get("BATCHES", "1 2 4").split()):
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        s = time.perf_counter()
        pipe("a fox reading under a tree, watercolor", height=batch_size, width=batch_size,
             num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512, num_images_per_prompt=n,
             generator=torch.Generator(device=dev).manual_seed(0), output_type="pil")
        torch.cuda.synchronize()
        total = time.perf_counter() - s
    log[f"batches_{batch_size}"].append({"num_images": n, "total_s": total, "images_per_minute": n * 60 / total,
                                         "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                                         "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB})
    print("batch", log[f"batches_{batch_size}"][-1], file=sys.stderr, flush=True)
# The same weights and inputs in f32 (48 GB): tells bf16 rounding apart from a real difference.
del pipe, t5, clip, vae
torch.cuda.empty_cache()
transformer = transformer.float()
with torch.inference_mode():
    out32 = transformer(hidden_states=img.float(), encoder_hidden_states=txt.float(),
                        pooled_projections=pooled.float(), timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                        guidance=gd, return_dict=False)[0]
o, o32 = out.float().flatten(), out32.flatten()
log["diffusers_bf16_vs_f32"] = {"cosine": torch.nn.functional.cosine_similarity(o, o32, dim=0).item(),
                                "max_abs_diff_over_max_abs": ((o - o32).abs().max() / o32.abs().max()).item()}
save_file({"out_f32": out32.contiguous()}, ref_file.replace(".safetensors", "-f32.safetensors"))
del transformer
torch.cuda.empty_cache()
log["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                   "transformers": __import__("transformers").__version__}
print(json.dumps(log))
