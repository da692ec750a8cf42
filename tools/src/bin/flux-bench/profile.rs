//! `flux-bench profile`: each op of a FLUX single block, training's attention backward and the VAE
//! decoder's ops, timed alone: where a step's time goes, without a profiler.

use crate::timing::time_median;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use engine::ops::{attention, conv, Kernels};

#[derive(clap::Args)]
pub struct Args {
    /// The image's side in pixels.
    #[arg(long, default_value_t = 1024)]
    size: usize,
}

/// Times, one by one, the ops a FLUX single block runs (as engine/src/models/flux/model.rs writes
/// them) on random bf16 tensors of FLUX.1-dev's sizes: where a step's time goes, without a profiler.
pub fn run(a: &Args, device: &Device, kernels: Kernels) -> Result<()> {
    use candle_core::{Module, D};
    let size = a.size;
    let (h, heads, hd, mlp) = (3072, 24, 128, 12288);
    let l = 512 + (size / 16) * (size / 16);
    let bf = DType::BF16;
    let rand = |shape: &[usize], std: f32| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, std, shape, device)?.to_dtype(bf)?)
    };
    let x = rand(&[1, l, h], 1.0)?;
    let (ones, zeros) = (Tensor::ones(h, bf, device)?, Tensor::zeros(h, bf, device)?);
    let (shift, scale, gate) = (
        rand(&[1, 1, h], 0.1)?,
        rand(&[1, 1, h], 0.1)?,
        rand(&[1, 1, h], 0.1)?,
    );
    let w1 = rand(&[3 * h + mlp, h], 0.02)?;
    let b1 = rand(&[3 * h + mlp], 0.02)?;
    let w2 = rand(&[h, h + mlp], 0.02)?;
    let b2 = rand(&[h], 0.02)?;
    let lin1 = candle_nn::Linear::new(w1.clone(), Some(b1.clone()));
    let lin2 = candle_nn::Linear::new(w2.clone(), Some(b2));
    let qk_scale = rand(&[hd], 0.1)?;
    let (cos, sin) = (rand(&[l, hd / 2], 0.5)?, rand(&[l, hd / 2], 0.5)?);
    let h1 = lin1.forward(&x)?;
    let qkv = h1.narrow(D::Minus1, 0, 3 * h)?;
    let mlp_part = h1.narrow(D::Minus1, 3 * h, mlp)?;
    let split = |t: &Tensor, i: usize| -> Result<Tensor> {
        Ok(t.reshape((1, l, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .get(i)?
            .contiguous()?)
    };
    let q = split(&qkv, 0)?;
    let k = split(&qkv, 1)?;
    let v = split(&qkv, 2)?;
    let attn = attention::attention(kernels, &q, &k, &v)?;
    let g = mlp_part.gelu()?;
    let cat = Tensor::cat(&[&attn, &g], D::Minus1)?;
    let out = lin2.forward(&cat)?;
    let x2 = x.reshape((l, h))?;
    let mut ops: Vec<(&str, f64, f64)> = Vec::new(); // name, ms, flops
    let mut time = |name: &'static str, flops: f64, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        ops.push((name, time_median(device, 10, f)? * 1e3, flops));
        Ok(())
    };
    let lf = |n: usize, k: usize| 2.0 * (l * n * k) as f64;
    time("layer_norm", 0.0, &|| {
        Ok(candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6)?)
    })?;
    time("modulate", 0.0, &|| {
        Ok(x.broadcast_mul(&(&scale + 1.0)?)?.broadcast_add(&shift)?)
    })?;
    time("linear1 (matmul + bias)", lf(3 * h + mlp, h), &|| {
        Ok(lin1.forward(&x)?)
    })?;
    time("linear1 matmul alone (2-D)", lf(3 * h + mlp, h), &|| {
        Ok(x2.matmul(&w1.t()?)?)
    })?;
    time(
        "linear1 bias add alone",
        0.0,
        &|| Ok(h1.broadcast_add(&b1)?),
    )?;
    time("split q, k, v (3 copies)", 0.0, &|| {
        Ok(Tensor::cat(
            &[split(&qkv, 0)?, split(&qkv, 1)?, split(&qkv, 2)?],
            0,
        )?)
    })?;
    time("rms_norm q and k", 0.0, &|| {
        Ok(candle_nn::ops::rms_norm(&q, &qk_scale, 1e-6)?
            .add(&candle_nn::ops::rms_norm(&k, &qk_scale, 1e-6)?)?)
    })?;
    time("rope q and k", 0.0, &|| {
        Ok(candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?
            .add(&candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?)?)
    })?;
    time("attention", 4.0 * (l * l * h) as f64, &|| {
        Ok(attention::attention(kernels, &q, &k, &v)?)
    })?;
    time("gelu on the mlp slice", 0.0, &|| Ok(mlp_part.gelu()?))?;
    time("cat attention | mlp", 0.0, &|| {
        Ok(Tensor::cat(&[&attn, &g], D::Minus1)?)
    })?;
    time("linear2 (matmul + bias)", lf(h, h + mlp), &|| {
        Ok(lin2.forward(&cat)?)
    })?;
    time("gated residual", 0.0, &|| {
        Ok((&x + out.broadcast_mul(&gate)?)?)
    })?;
    // the "alone" rows split up linear1 and are left out of the block's sum
    let total: f64 = ops
        .iter()
        .filter(|o| !o.0.contains("alone"))
        .map(|o| o.1)
        .sum();
    for (name, ms, flops) in &ops {
        let rate = if *flops > 0.0 {
            serde_json::json!(flops / ms / 1e9)
        } else {
            serde_json::Value::Null
        };
        println!(
            "{}",
            serde_json::json!({"what": "profile", "size": size, "op": name, "ms": ms, "tflops": rate})
        );
    }
    println!(
        "{}",
        serde_json::json!({"what": "profile", "size": size, "op": "sum (one single block)", "ms": total})
    );
    profile_attention_backward(l, device, kernels)?;
    profile_vae(size, device)
}

/// Training's attention backward (`fused::attention_backward`) at the joint sequence length `l`, whole
/// and, on the fused path, piece by piece: where a training step's time goes.
fn profile_attention_backward(l: usize, device: &Device, kernels: Kernels) -> Result<()> {
    let (heads, hd) = (24, 128);
    let rand = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16)?)
    };
    let (q, k, v) = (
        rand(&[1, heads, l, hd])?,
        rand(&[1, heads, l, hd])?,
        rand(&[1, heads, l, hd])?,
    );
    let (o, lse) = attention::attention_saved(kernels, &q, &k, &v)?;
    let g = rand(&[1, l, heads * hd])?;
    let mm = 2.0 * (l * l * hd * heads) as f64;
    type Row<'a> = (&'a str, f64, Box<dyn Fn() -> Result<Tensor> + 'a>);
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))] // the fused path adds its pieces
    let mut rows: Vec<Row> = vec![(
        "attention backward (whole)",
        5.0 * mm,
        Box::new(|| {
            let [dq, dk, dv] =
                attention::attention_backward(kernels, [&q, &k, &v], &o, &g, lse.as_ref())?;
            Ok((dq.sum_all()? + dk.sum_all()? + dv.sum_all()?)?)
        }),
    )];
    #[cfg(feature = "cuda")]
    if let (Some(lse), Device::Cuda(cuda)) = (&lse, device) {
        use engine::kernels::{flash_attn, fused_ops::head_dot};
        let delta = head_dot(&g, &o)?;
        rows.push((
            "  delta = rowsum(g ⊙ o) per head",
            0.0,
            Box::new(|| Ok(head_dot(&g, &o)?)),
        ));
        let scale = 1.0 / (hd as f32).sqrt();
        for kernel in flash_attn::Backward::ALL {
            if !kernel.runs_on(cuda) {
                continue;
            }
            let (q, k, v, g, delta) = (q.clone(), k.clone(), v.clone(), g.clone(), delta.clone());
            rows.push((
                match kernel {
                    flash_attn::Backward::Kv => "  kernel kv_wg128 + cuBLAS dq = ds k",
                    flash_attn::Backward::Probs => "  kernel probs_r64 + cuBLAS dv, dq, dk",
                },
                5.0 * mm,
                Box::new(move || {
                    let [dq, ..] =
                        flash_attn::backward_with(kernel, [&q, &k, &v], &g, lse, &delta, scale)?;
                    Ok(dq)
                }),
            ));
        }
    }
    for (op, flops, f) in rows {
        let ms = time_median(device, 10, &*f)? * 1e3;
        let tflops = (flops > 0.0).then(|| flops / ms / 1e9);
        println!(
            "{}",
            serde_json::json!({"what": "profile-attention-backward", "tokens": l, "op": op, "ms": ms, "tflops": tflops})
        );
    }
    Ok(())
}

/// The VAE decoder's op kinds at their most expensive sizes (the last up block runs 128 channels at
/// full resolution), each timed alone.
fn profile_vae(size: usize, device: &Device) -> Result<()> {
    use candle_core::Module;
    let bf = DType::BF16;
    let rand = |shape: &[usize], std: f32| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, std, shape, device)?.to_dtype(bf)?)
    };
    let conv = |c: usize| -> Result<candle_nn::Conv2d> {
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(candle_nn::Conv2d::new(
            rand(&[c, c, 3, 3], 0.02)?,
            Some(rand(&[c], 0.02)?),
            cfg,
        ))
    };
    for (c, side) in [(128, size), (512, size / 4)] {
        let x = rand(&[1, c, side, side], 1.0)?;
        let conv = conv(c)?;
        let gn = candle_nn::GroupNorm::new(rand(&[c], 1.0)?, rand(&[c], 0.1)?, c, 32, 1e-6)?;
        let flops = 2.0 * (9 * c * c * side * side) as f64;
        let row = |op: &str, flops: f64, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
            let ms = time_median(device, 5, f)? * 1e3;
            let rate = if flops > 0.0 {
                serde_json::json!(flops / ms / 1e9)
            } else {
                serde_json::Value::Null
            };
            println!(
                "{}",
                serde_json::json!({"what": "profile-vae", "size": size, "op": op,
                "shape": [1, c, side, side], "ms": ms, "tflops": rate})
            );
            Ok(())
        };
        row("conv3x3", flops, &|| Ok(conv.forward(&x)?))?;
        row("conv3x3 (fused)", flops, &|| {
            Ok(conv::conv2d(Kernels::Fused, &x, &conv)?)
        })?;
        // Its two parts: the taps product and the sum kernel.
        #[cfg(feature = "cuda")]
        {
            use engine::kernels::conv as k;
            let bias = conv.bias().expect("a bias");
            let taps = conv::conv_taps(&x, conv.weight())?;
            row("conv3x3 taps: product", flops, &|| {
                Ok(conv::conv_taps(&x, conv.weight())?)
            })?;
            row("conv3x3 taps: sum", 0.0, &|| {
                Ok(k::tap_sum(&taps, bias, side, side, 1)?)
            })?;
            row("upsample x2 + conv3x3 taps: sum", 0.0, &|| {
                Ok(k::tap_sum(&taps, bias, 2 * side, 2 * side, 2)?)
            })?;
        }
        row("group_norm", 0.0, &|| Ok(gn.forward(&x)?))?;
        row("silu", 0.0, &|| Ok(x.silu()?))?;
        row("upsample_nearest2d x2", 0.0, &|| {
            Ok(x.upsample_nearest2d(2 * side, 2 * side)?)
        })?;
        // An upsampler: the convolution of the twice-upsampled input, plain and fused.
        let up_flops = 4.0 * flops;
        row("upsample x2 + conv3x3", up_flops, &|| {
            Ok(conv.forward(&x.upsample_nearest2d(2 * side, 2 * side)?)?)
        })?;
        row("upsample x2 + conv3x3 (fused)", up_flops, &|| {
            Ok(conv::upsample_conv2d(Kernels::Fused, &x, &conv, 2)?)
        })?;
    }
    Ok(())
}
