"""References for the weight formats' accuracy per block (scripts/bench/block-accuracy.sh): FLUX.1-dev's
blocks at full width with random weights, a double block alone and a single block alone, each as a
one-block FluxTransformer2DModel (the embedders, the block, the final layer), and diffusers' output of
each on fixed inputs in bf16 and in f32, as `flux-bench forward --inputs` reads them.

usage: python3 scripts/bench/block_accuracy.py OUT_DIR [SIZE]

Writes OUT_DIR/double/transformer/ and OUT_DIR/single/transformer/ (config.json and bf16 weights in
diffusers' layout), OUT_DIR/double.safetensors and OUT_DIR/single.safetensors (the inputs and diffusers'
bf16 output), and beside each a -f32 file (diffusers' f32 output of the same bf16 weights). SIZE is the
image side the inputs' token count comes from (512 by default: 1024 image tokens, beside 512 text
tokens). On the GPU when torch sees one, else on the CPU. The weights are drawn as
scripts/gpu/full_size_reference.py draws the whole model's.
"""
import json, os, sys

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

out_dir = sys.argv[1]
size = int(sys.argv[2]) if len(sys.argv) > 2 else 512
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dt = torch.bfloat16
os.makedirs(out_dir, exist_ok=True)


@torch.no_grad()
def randomize(model, std=0.02):
    for name, prm in model.named_parameters():
        if prm.ndim == 1 and "norm" in name and name.endswith("weight"):
            prm.normal_(1.0, std)
        else:
            prm.normal_(0.0, std)


@torch.no_grad()
def block(name, double, single, seed):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)).to(dev, dt).eval()
    randomize(model)
    model.save_pretrained(f"{out_dir}/{name}/transformer")
    h = w = size // 8
    g = torch.Generator(device=dev).manual_seed(1)
    img = torch.randn(1, (h // 2) * (w // 2), 64, device=dev, dtype=dt, generator=g)
    txt = torch.randn(1, 512, 4096, device=dev, dtype=dt, generator=g)
    pooled = torch.randn(1, 768, device=dev, dtype=dt, generator=g)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, dev, torch.float32)
    txt_ids = torch.zeros(512, 3, device=dev, dtype=torch.float32)
    t = torch.full([1], 0.75, device=dev, dtype=torch.float32)
    gd = torch.full([1], 3.5, device=dev, dtype=torch.float32)
    out = model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t.to(dt),
                img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)[0]
    save_file({"hidden_states": img.contiguous(), "encoder_hidden_states": txt.contiguous(),
               "pooled_projections": pooled.contiguous(), "img_ids": img_ids.contiguous(), "txt_ids": txt_ids,
               "timestep": t, "guidance": gd, "out": out.contiguous()}, f"{out_dir}/{name}.safetensors")
    model = model.float()
    out32 = model(hidden_states=img.float(), encoder_hidden_states=txt.float(), pooled_projections=pooled.float(),
                  timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=gd, return_dict=False)[0]
    save_file({"out_f32": out32.contiguous()}, f"{out_dir}/{name}-f32.safetensors")
    o, o32 = out.float().flatten(), out32.flatten()
    print(json.dumps({"what": "block-reference", "block": name, "size": size, "device": str(dev),
                      "diffusers_bf16_vs_f32": {
                          "cosine": torch.nn.functional.cosine_similarity(o, o32, dim=0).item(),
                          "max_abs_diff_over_max_abs": ((o - o32).abs().max() / o32.abs().max()).item()}}),
          flush=True)


block("double", 1, 0, 10)
block("single", 0, 1, 11)
