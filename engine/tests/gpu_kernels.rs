//! The engine's CUDA kernels against the plain path (candle's ops) in f32, on a GPU: the fused ops of the
//! transformer and the autoencoder, the attention kernels forward and backward, the adapters' products
//! and the optimizer's kernels, at FLUX.1-dev's sizes. Each test fails past its bound; without a CUDA
//! device they fail too, saying where to run them:
//!
//! ```text
//! cargo test -p engine --features cuda --release --test gpu_kernels --test gpu_training
//! ```
#![cfg(feature = "cuda")]

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{cuda_device, rel_l2, time_median};
use engine::ops::Kernels;
use engine::training::optim::{clip_grads, AdamW};

/// `kernels::gemm::add_matmul` (an adapter's update added into its rows in place, cuBLAS with β = 1)
/// against the same sum in f32: a q/k/v slice of a fused layer's output (b transposed) and an input
/// gradient (b as is). Fails at a relative L2 error over the slice past 1e-2 (the output is bf16) or if
/// a column outside the slice changed at all.
#[test]
fn an_adapter_product_added_in_place_matches_f32() -> Result<()> {
    let device = &cuda_device();
    let randn = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16)?)
    };
    let mut worst = 0f32;
    for (c_shape, at, a_shape, b_shape, transposed) in [
        (
            &[1, 300, 9216][..],
            3072,
            &[1, 300, 16][..],
            &[3072, 16][..],
            true,
        ),
        (&[300, 3072][..], 0, &[300, 16][..], &[16, 3072][..], false),
    ] {
        let (c, a, b) = (randn(c_shape)?, randn(a_shape)?, randn(b_shape)?);
        let before = c.to_dtype(DType::F32)?;
        engine::kernels::gemm::add_matmul(&c, at, &a, &b, transposed)?;
        let b32 = b.to_dtype(DType::F32)?;
        let b32 = if transposed { b32.t()? } else { b32 };
        let p = a.to_dtype(DType::F32)?.broadcast_matmul(&b32)?;
        let last = c.rank() - 1;
        let n = p.dim(last)?;
        let want = before.slice_scatter(&(before.narrow(last, at, n)? + &p)?, last, at)?;
        let got = c.to_dtype(DType::F32)?;
        let err = rel_l2(&got.narrow(last, at, n)?, &want.narrow(last, at, n)?)?;
        let diff = (&got - &want)?.abs()?;
        let mut outside = 0f32;
        for (start, len) in [(0, at), (at + n, c.dim(last)? - at - n)] {
            if len > 0 {
                let d = diff
                    .narrow(last, start, len)?
                    .max_all()?
                    .to_scalar::<f32>()?;
                outside = outside.max(d);
            }
        }
        println!(
            "{}",
            serde_json::json!({"what": "kernel_check", "op": "add_matmul", "c": c_shape, "at": at,
                "b_transposed": transposed, "rel_l2": err, "outside_max_diff": outside})
        );
        anyhow::ensure!(
            outside == 0.0,
            "add_matmul changed columns outside its slice"
        );
        worst = worst.max(err);
    }
    anyhow::ensure!(worst < 1e-2, "add_matmul off by {worst:e}");

    // gemm::matmul on an adapter's rows of a single block's linear1 gradient (a column slice), read
    // transposed (dBᵀ's product) and not (dy·sB's), and with a transposed second operand.
    let dy = randn(&[4608, 21504])?;
    let dy_a = dy.narrow(1, 3072, 3072)?;
    let (ax, up) = (randn(&[4608, 16])?, randn(&[3072, 16])?);
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    for (what, a, b, alpha, out) in [
        ("dy_aᵀ · ax", dy_a.t()?, ax.clone(), 1.0, DType::BF16),
        ("dy_a · up", dy_a.clone(), up.clone(), 1.0, DType::BF16),
        ("ax · upᵀ", ax.clone(), up.t()?, 1.0, DType::BF16),
        (
            "0.5 · dy_aᵀ · ax into f32",
            dy_a.t()?,
            ax.clone(),
            0.5,
            DType::F32,
        ),
    ] {
        let got = engine::kernels::gemm::matmul(&a, &b, alpha, out)?;
        anyhow::ensure!(
            got.dtype() == out,
            "the strided matmul wrote {:?}",
            got.dtype()
        );
        let want = (f32s(&a)?.matmul(&f32s(&b)?)? * alpha)?;
        let err = rel_l2(&got, &want)?;
        println!(
            "{}",
            serde_json::json!({"what": "kernel_check", "op": "strided matmul", "case": what,
                "a": a.dims(), "b": b.dims(), "rel_l2": err})
        );
        anyhow::ensure!(err < 1e-2, "the strided matmul {what} off by {err:e}");
    }
    Ok(())
}

/// The optimizer's kernels (training/optim.rs: clipping's norm, AdamW) against its plain candle ops:
/// three clipped AdamW steps from the same f32 values and gradients, at LoRA shapes and a ragged one.
/// Fails where a parameter, moment, clipped gradient or norm differs by more than 1e-5 of the largest
/// magnitude of the plain path's.
#[test]
fn the_optimizers_kernels_match_its_plain_ops() -> Result<()> {
    use candle_core::{backprop::GradStore, Var};
    let device = &cuda_device();
    let shapes: [&[usize]; 3] = [&[16, 3072], &[9216, 16], &[7, 33]];
    let randn = |std: f32| -> Result<Vec<Tensor>> {
        Ok(shapes
            .iter()
            .map(|s| Tensor::randn(0f32, std, *s, device))
            .collect::<candle_core::Result<_>>()?)
    };
    let init = randn(0.1)?;
    let grads = (0..3).map(|_| randn(1.0)).collect::<Result<Vec<_>>>()?;
    let fresh = |kernels: Kernels| -> Result<AdamW> {
        let vars = init
            .iter()
            .map(|t| Var::from_tensor(&t.copy()?))
            .collect::<candle_core::Result<_>>()?;
        AdamW::new(vars, 1e-2, kernels)
    };
    // A clipped step as the trainer takes it: the clipped gradients and their norm before clipping.
    // max_norm is below the gradients' norm (~440), so that the clipping scales them.
    let step = |opt: &mut AdamW, gs: &[Tensor], lr: f64| -> Result<(Vec<Tensor>, f64)> {
        let mut store = GradStore::default();
        for (v, g) in opt.vars.iter().zip(gs) {
            store.insert(v.as_tensor(), g.clone());
        }
        let clipped = clip_grads(&opt.vars, &store, 100.0, opt.kernels)?;
        opt.step(&clipped.grads, clipped.scale, lr)?;
        Ok((clipped.scaled()?, clipped.norm))
    };
    // A path's optimizer after three steps, the clipped gradients and norm of every step, and the
    // time of a step (on an optimizer of its own).
    struct Run {
        opt: AdamW,
        clipped: Vec<Vec<Tensor>>,
        norms: Vec<f64>,
        seconds: f64,
    }
    let run = |kernels: Kernels| -> Result<Run> {
        let mut opt = fresh(kernels)?;
        let (mut clipped, mut norms) = (Vec::new(), Vec::new());
        for (i, gs) in grads.iter().enumerate() {
            let (c, norm) = step(&mut opt, gs, 1e-3 * (i + 1) as f64)?;
            clipped.push(c);
            norms.push(norm);
        }
        let mut timed = fresh(kernels)?;
        let seconds = time_median(device, 10, || {
            Ok(step(&mut timed, &grads[0], 1e-3)?.0[0].clone())
        })?;
        Ok(Run {
            opt,
            clipped,
            norms,
            seconds,
        })
    };
    let (plain, out) = (run(Kernels::Plain)?, run(Kernels::Fused)?);
    // max |a − b| / max |b|
    let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let max = |t: &Tensor| -> Result<f32> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()?) };
        Ok(max(&(a - b)?)? / max(b)?)
    };
    let mut ok = true;
    for (i, shape) in shapes.iter().enumerate() {
        // one per step
        let grad = out
            .clipped
            .iter()
            .zip(&plain.clipped)
            .map(|(a, b)| rel(&a[i], &b[i]))
            .collect::<Result<Vec<_>>>()?;
        let [param, m, v] = [
            rel(&out.opt.vars[i], &plain.opt.vars[i])?,
            rel(&out.opt.m[i], &plain.opt.m[i])?,
            rel(&out.opt.v[i], &plain.opt.v[i])?,
        ];
        let pass = [param, m, v].iter().chain(&grad).all(|d| *d <= 1e-5);
        ok &= pass;
        println!(
            "{}",
            serde_json::json!({"what": "optimizer", "shape": shape, "pass": pass,
                "param_max_rel": param, "m_max_rel": m, "v_max_rel": v,
                "clipped_grad_max_rel_per_step": grad})
        );
    }
    let norm: Vec<f64> = out
        .norms
        .iter()
        .zip(&plain.norms)
        .map(|(a, b)| (a - b).abs() / b)
        .collect();
    let pass = norm.iter().all(|d| *d <= 1e-5);
    ok &= pass;
    println!(
        "{}",
        serde_json::json!({"what": "optimizer", "grad_norm_rel_per_step": norm, "pass": pass,
            "plain_norms": plain.norms, "fused_norms": out.norms,
            "fused_step_ms": out.seconds * 1e3, "plain_step_ms": plain.seconds * 1e3})
    );
    anyhow::ensure!(ok, "the optimizer's kernels disagree with its plain path");
    Ok(())
}

/// The fused attention kernels against the plain path on fresh random (B, H, L, 128) heads at
/// FLUX's shapes (and ragged, strided and batched ones): error of each against the plain path in f32, and
/// time: the forward's output, and the backward's probabilities and score gradients from the forward's
/// log-sum-exp. Fails when an output is not finite or further than bf16 rounding from f32.
#[test]
fn the_attention_kernels_match_f32() -> Result<()> {
    let device = &cuda_device();
    use engine::kernels::flash_attn::{
        backward_with, flash_attn_lse, flash_attn_variant, Backward, Variant,
    };
    use engine::kernels::fused_ops::head_dot;
    use engine::ops::attention::plain_attention as plain;
    let (heads, d) = (24, 128);
    let scale = 1.0 / (d as f32).sqrt();
    let mut ok = true;
    // (batch, sequence length, q's std, q/k/v as transposed (B, L, H, D) views)
    for (bs, n, q_std, strided) in [
        (1, 1536, 1.0, false),
        (1, 4608, 1.0, false),
        (1, 4608, 3.0, true),
        (1, 1001, 1.0, false),
        (2, 1536, 1.0, true),
    ] {
        let make = |std: f32| -> Result<Tensor> {
            let t = if strided {
                Tensor::randn(0f32, std, (bs, n, heads, d), device)?.transpose(1, 2)?
            } else {
                Tensor::randn(0f32, std, (bs, heads, n, d), device)?
            };
            Ok(t.to_dtype(DType::BF16)?)
        };
        let (q, k, v) = (make(q_std)?, make(1.0)?, make(1.0)?);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let want = plain(&f32s(&q)?, &f32s(&k)?, &f32s(&v)?)?;
        let plain_bf16 = plain(&q, &k, &v)?;
        let t_plain = time_median(device, 5, || Ok(plain(&q, &k, &v)?))?;
        let flops = 4.0 * (bs * n * n * heads * d) as f64;
        let mut report = serde_json::json!({"what": "attention", "shape": [bs, heads, n, d], "q_std": q_std,
            "strided": strided, "plain_bf16_rel_l2_vs_f32": rel_l2(&plain_bf16, &want)?,
            "plain_ms": t_plain * 1e3, "plain_tflops": flops / t_plain / 1e12});
        let Device::Cuda(cuda) = device else {
            anyhow::bail!("the attention check needs a CUDA device")
        };
        for variant in Variant::ALL.into_iter().filter(|v| v.runs_on(cuda)) {
            let fused = || {
                Ok(flash_attn_variant(&q, &k, &v, scale, variant)?.reshape((bs, n, heads * d))?)
            };
            let out = fused()?;
            let finite = out
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                .is_finite();
            let err = rel_l2(&out, &want)?;
            let t = time_median(device, 20, fused)?;
            let pass = finite && err < 1e-2;
            ok &= pass;
            report[variant.name()] = serde_json::json!({"pass": pass, "finite": finite,
                "rel_l2_vs_f32": err, "ms": t * 1e3, "tflops": flops / t / 1e12});
        }

        // The backward's dq, dk, dv from the forward's log-sum-exp, against the plain path in f32.
        // g as heads (strided in the strided case), delta from the (B, L, H·D) rows as training has them.
        let (o, lse) = flash_attn_lse(&q, &k, &v, scale, true)?;
        let o_rows = o.reshape((bs, n, heads * d))?;
        let g = make(1.0)?;
        let g_rows = g
            .transpose(1, 2)?
            .contiguous()?
            .reshape((bs, n, heads * d))?;
        let delta = head_dot(&g_rows, &o_rows)?;
        let want = engine::ops::attention::plain_attention_backward(
            [&f32s(&q)?, &f32s(&k)?, &f32s(&v)?],
            &f32s(&o.transpose(1, 2)?)?,
            &f32s(&g)?,
        )?;
        for kernel in Backward::ALL.into_iter().filter(|k| k.runs_on(cuda)) {
            let run = || backward_with(kernel, [&q, &k, &v], &g, &lse, &delta, scale);
            let got = run()?;
            let mut r = serde_json::json!({});
            let mut pass = true;
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let finite = a
                    .to_dtype(DType::F32)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?
                    .is_finite();
                let err = rel_l2(a, b)?;
                pass &= finite && err < 1e-2;
                r[format!("{name}_rel_l2_vs_f32")] = serde_json::json!(err);
            }
            let t = time_median(device, 10, || Ok(run()?[0].clone()))?;
            ok &= pass;
            r["pass"] = serde_json::json!(pass);
            r["ms"] = serde_json::json!(t * 1e3);
            r["tflops"] = serde_json::json!(5.0 / 2.0 * flops / t / 1e12);
            report[format!("backward_{}", kernel.name())] = r;
        }
        println!("{report}");
    }
    anyhow::ensure!(
        ok,
        "the fused attention kernel disagrees with the plain path"
    );
    Ok(())
}

/// The fused memory-bound kernels against the plain path, on fresh random inputs at the 1024x1024
/// single block's sizes: error of each (fused, and plain in bf16) against the plain path in f32, and
/// time. Modulation vectors are chunks of one (1, 1, 3·C) projection, as in the model.
#[test]
fn the_fused_ops_match_f32_as_closely_as_the_plain_path() -> Result<()> {
    use engine::ops::qkv::{QkScales, Rope};
    use engine::ops::{activation, attention, conv, linear, norm, qkv, residual};
    let device = &cuda_device();
    let plain = Kernels::Plain;
    let (l, c, heads, hd, w1) = (4608, 3072, 24, 128, 21504);
    let rand = |shape: &[usize], std: f32| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, std, shape, device)?.to_dtype(DType::BF16)?)
    };
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let x = rand(&[1, l, c], 1.0)?;
    let r = rand(&[1, l, c], 1.0)?;
    let mods = rand(&[1, 1, 3 * c], 0.5)?.chunk(3, candle_core::D::Minus1)?;
    let lin = candle_nn::Linear::new(rand(&[w1, c], 0.02)?, Some(rand(&[w1], 0.5)?));
    let lin32 = candle_nn::Linear::new(f32s(lin.weight())?, lin.bias().map(f32s).transpose()?);
    let h1 = rand(&[1, l, w1], 1.0)?;
    let scales = QkScales::new(rand(&[hd], 1.0)?, rand(&[hd], 1.0)?)?;
    let scales32 = QkScales::new(f32s(&scales.q)?, f32s(&scales.k)?)?;
    // RoPE tables are f32 on every path, as the references keep them.
    let (cos, sin) = (
        Tensor::randn(0f32, 0.7, (l + 512, hd / 2), device)?,
        Tensor::randn(0f32, 0.7, (l + 512, hd / 2), device)?,
    );
    let rope = Rope::new(cos, sin)?.rows(512, l)?;
    let heads_cat = |t: (Tensor, Tensor, Tensor)| Tensor::cat(&[t.0, t.1, t.2], 0);
    // the VAE decoder's largest group norm: 128 channels at 1024x1024, activations off-centre
    let img =
        (Tensor::randn(0f32, 2.0, (1, 128, 1024, 1024), device)? + 3.0)?.to_dtype(DType::BF16)?;
    let (gn_w, gn_b) = (rand(&[128], 1.0)?, rand(&[128], 0.5)?);
    let gn = candle_nn::GroupNorm::new(gn_w.clone(), gn_b.clone(), 128, 32, 1e-6)?;
    let (gn_w32, gn_b32) = (f32s(&gn_w)?, f32s(&gn_b)?);
    let gn32 = candle_nn::GroupNorm::new(gn_w32.clone(), gn_b32.clone(), 128, 32, 1e-6)?;
    // the decoder's commonest full-size convolution: 128 -> 128 channels at 1024x1024
    let conv = candle_nn::Conv2d::new(
        rand(&[128, 128, 3, 3], 0.03)?,
        Some(rand(&[128], 0.1)?),
        candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
    );
    let conv32 = candle_nn::Conv2d::new(
        f32s(conv.weight())?,
        conv.bias().map(f32s).transpose()?,
        *conv.config(),
    );
    let cimg = rand(&[1, 128, 1024, 1024], 1.0)?;
    // and its most expensive: the last upsampler's, 256 channels from 512x512 upsampled to 1024x1024
    let up_img = rand(&[1, 256, 512, 512], 1.0)?;
    let up_conv = candle_nn::Conv2d::new(
        rand(&[256, 256, 3, 3], 0.02)?,
        Some(rand(&[256], 0.1)?),
        *conv.config(),
    );
    let up_conv32 = candle_nn::Conv2d::new(
        f32s(up_conv.weight())?,
        up_conv.bias().map(f32s).transpose()?,
        *up_conv.config(),
    );
    // training's backward passes: the gradient of each output, against the plain path in f32
    let g = rand(&[1, l, c], 1.0)?;
    let (q, k, v) = (
        rand(&[1, heads, l, hd], 1.0)?,
        rand(&[1, heads, l, hd], 1.0)?,
        rand(&[1, heads, l, hd], 1.0)?,
    );
    let (o, lse) = attention::attention_saved(Kernels::Fused, &q, &k, &v)?;
    // f32 takes the plain path, the reference; bf16 the kernel with the forward's log-sum-exp.
    let attn_back = |kn: Kernels, i: usize, f32: bool| -> Result<Tensor> {
        let t = |x: &Tensor| if f32 { f32s(x) } else { Ok(x.clone()) };
        let lse = if f32 { None } else { lse.as_ref() };
        let grads =
            attention::attention_backward(kn, [&t(&q)?, &t(&k)?, &t(&v)?], &t(&o)?, &t(&g)?, lse)?;
        Ok(grads[i].clone())
    };
    let norm_back = |kn: Kernels, i: usize, f32: bool| -> Result<Tensor> {
        let t = |x: &Tensor| if f32 { f32s(x) } else { Ok(x.clone()) };
        let (x, shift, scale) = (t(&x)?, t(&mods[0])?, t(&mods[1])?);
        Ok(norm::norm_modulate_backward(kn, [&x, &shift, &scale], &x, &t(&g)?)?[i].clone())
    };
    let gate_back = |kn: Kernels, i: usize, f32: bool| -> Result<Tensor> {
        let t = |x: &Tensor| if f32 { f32s(x) } else { Ok(x.clone()) };
        let (r, x, gate) = (t(&r)?, t(&x)?, t(&mods[2])?);
        Ok(residual::gated_add_backward(kn, [&r, &x, &gate], &x, &t(&g)?)?[i].clone())
    };
    let g3 = rand(&[3, 1, heads, l, hd], 1.0)?;
    let d_cat = rand(&[1, l, 5 * c], 1.0)?;
    let qkv_back = |kn: Kernels, f32: bool| -> Result<Tensor> {
        if f32 {
            let g = f32s(&g3)?;
            return Ok(qkv::qkv_heads_grad(
                kn,
                &f32s(&h1)?,
                [&g.get(0)?, &g.get(1)?, &g.get(2)?],
                0,
                heads,
                &scales32,
                &rope,
            )?);
        }
        let g = [&g3.get(0)?, &g3.get(1)?, &g3.get(2)?];
        Ok(qkv::qkv_heads_grad(kn, &h1, g, 0, heads, &scales, &rope)?)
    };
    // Each op on the path it is given, and its reference: the plain path in f32.
    type Op<'a> = Box<dyn Fn(Kernels) -> Result<Tensor> + 'a>;
    type Reference<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;
    let mut cases: Vec<(&str, Op, Reference)> = vec![
        (
            "linear + bias",
            Box::new(|kn| Ok(linear::linear(kn, &lin, &x)?)),
            Box::new(|| Ok(linear::linear(plain, &lin32, &f32s(&x)?)?)),
        ),
        (
            "norm_modulate",
            Box::new(|kn| Ok(norm::norm_modulate(kn, &x, &mods[0], &mods[1])?)),
            Box::new(|| {
                Ok(norm::norm_modulate(
                    plain,
                    &f32s(&x)?,
                    &f32s(&mods[0])?,
                    &f32s(&mods[1])?,
                )?)
            }),
        ),
        (
            "gated_add",
            Box::new(|kn| Ok(residual::gated_add(kn, &r, &x, &mods[2])?)),
            Box::new(|| {
                Ok(residual::gated_add(
                    plain,
                    &f32s(&r)?,
                    &f32s(&x)?,
                    &f32s(&mods[2])?,
                )?)
            }),
        ),
        (
            "qkv_heads",
            Box::new(|kn| Ok(heads_cat(qkv::qkv_heads(kn, &h1, heads, &scales, &rope)?)?)),
            Box::new(|| {
                Ok(heads_cat(qkv::qkv_heads(
                    plain,
                    &f32s(&h1)?,
                    heads,
                    &scales32,
                    &rope,
                )?)?)
            }),
        ),
        (
            "gelu_cat",
            Box::new(|kn| Ok(activation::gelu_cat(kn, &x, &h1.narrow(2, 3 * c, 4 * c)?)?)),
            Box::new(|| {
                Ok(activation::gelu_cat(
                    plain,
                    &f32s(&x)?,
                    &f32s(&h1)?.narrow(2, 3 * c, 4 * c)?,
                )?)
            }),
        ),
        (
            "group_norm + silu (VAE, 128x1024x1024)",
            Box::new(|kn| {
                Ok(norm::group_norm(
                    kn,
                    &img,
                    &gn,
                    [&gn_w, &gn_b],
                    32,
                    1e-6,
                    true,
                )?)
            }),
            Box::new(|| {
                let x32 = f32s(&img)?;
                Ok(norm::group_norm(
                    plain,
                    &x32,
                    &gn32,
                    [&gn_w32, &gn_b32],
                    32,
                    1e-6,
                    true,
                )?)
            }),
        ),
        (
            "conv3x3 (VAE, 128x1024x1024)",
            Box::new(|kn| Ok(conv::conv2d(kn, &cimg, &conv)?)),
            Box::new(|| Ok(conv::conv2d(plain, &f32s(&cimg)?, &conv32)?)),
        ),
        (
            "upsample x2 + conv3x3 (VAE, 256x512x512)",
            Box::new(|kn| Ok(conv::upsample_conv2d(kn, &up_img, &up_conv, 2)?)),
            Box::new(|| {
                Ok(conv::upsample_conv2d(
                    plain,
                    &f32s(&up_img)?,
                    &up_conv32,
                    2,
                )?)
            }),
        ),
    ];
    for (name, i) in [
        ("attention backward (4608 tokens): dq", 0),
        ("attention backward (4608 tokens): dk", 1),
        ("attention backward (4608 tokens): dv", 2),
    ] {
        cases.push((
            name,
            Box::new(move |kn| attn_back(kn, i, false)),
            Box::new(move || attn_back(plain, i, true)),
        ));
    }
    for (name, i) in [
        ("norm_modulate backward: dx", 0),
        ("norm_modulate backward: d_shift", 1),
        ("norm_modulate backward: d_scale", 2),
    ] {
        cases.push((
            name,
            Box::new(move |kn| norm_back(kn, i, false)),
            Box::new(move || norm_back(plain, i, true)),
        ));
    }
    cases.push((
        "qkv_heads backward",
        Box::new(move |kn| qkv_back(kn, false)),
        Box::new(move || qkv_back(plain, true)),
    ));
    for (name, i) in [
        ("gated_add backward: dx", 1),
        ("gated_add backward: d_gate", 2),
    ] {
        cases.push((
            name,
            Box::new(move |kn| gate_back(kn, i, false)),
            Box::new(move || gate_back(plain, i, true)),
        ));
    }
    // a single block's MLP columns: gelu's backward read in place from linear1's output and linear2's
    // input gradient, written into linear1's output gradient from column 3·C
    let gelu_into = |kn: Kernels, f32: bool| -> Result<Tensor> {
        let t = |x: &Tensor| if f32 { f32s(x) } else { Ok(x.clone()) };
        let dst = Tensor::zeros(
            (1, l, w1),
            if f32 { DType::F32 } else { DType::BF16 },
            device,
        )?;
        activation::gelu_backward_into(
            kn,
            &dst,
            3 * c,
            &t(&h1)?.narrow(2, 3 * c, 4 * c)?,
            &t(&d_cat)?.narrow(2, c, 4 * c)?,
        )?;
        Ok(dst)
    };
    cases.push((
        "gelu backward into linear1's gradient",
        Box::new(move |kn| gelu_into(kn, false)),
        Box::new(move || gelu_into(plain, true)),
    ));
    let mut ok = true;
    for (name, op, reference) in &cases {
        let want = reference()?;
        let plain_out = op(Kernels::Plain)?;
        let t_plain = time_median(device, 10, || op(Kernels::Plain))?;
        let out = op(Kernels::Fused)?;
        let t_fused = time_median(device, 10, || op(Kernels::Fused))?;
        let finite = out
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            .is_finite();
        let (err, err_plain) = (rel_l2(&out, &want)?, rel_l2(&plain_out, &want)?);
        // bf16 rounding of the output is ~2e-3 relative; allow what the plain bf16 path shows, plus margin
        let pass = finite && err < 1e-2_f32.max(2.0 * err_plain);
        ok &= pass;
        println!(
            "{}",
            serde_json::json!({"what": "fused-op", "op": name, "pass": pass, "finite": finite,
                "fused_rel_l2_vs_f32": err, "plain_bf16_rel_l2_vs_f32": err_plain,
                "fused_ms": t_fused * 1e3, "plain_ms": t_plain * 1e3})
        );
    }
    anyhow::ensure!(ok, "a fused kernel disagrees with the plain path");
    Ok(())
}

/// A tensor's values as f32 bits, NaNs made one pattern (fp8 has two NaN codes).
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    // To the host first: candle's CUDA backend cannot cast fp8.
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
        .collect())
}

/// fp8 on CUDA takes the studio's own kernels (candle 0.11.1 has no fp8 cast there): widening every
/// one of the 256 `float8_e4m3fn` codes with a scale, and narrowing values across fp8's range (normal,
/// subnormal, ties), must give the CPU's bits (candle's casts, checked against torch in `tests/quant.rs`).
#[test]
fn fp8_casts_on_cuda_give_the_cpus_bits() -> Result<()> {
    let device = &cuda_device();
    let codes: Vec<u8> = (0..=255).collect();
    let fp8 = Tensor::from_raw_buffer(&codes, DType::F8E4M3, &[256], &Device::Cpu)?;
    for (scale, dtype) in [
        (1.0, DType::BF16),
        (0.0123, DType::BF16),
        (0.0123, DType::F32),
    ] {
        let cpu = engine::ops::linear::fp8_dequantize(&fp8, scale, dtype)?;
        let gpu = engine::ops::linear::fp8_dequantize(&fp8.to_device(device)?, scale, dtype)?;
        assert_eq!(gpu.dtype(), dtype);
        assert_eq!(
            bits(&gpu)?,
            bits(&cpu)?,
            "widening at scale {scale} to {dtype:?}"
        );
    }
    // Every fp8 value, the midpoints between neighbours (ties to even), and values between.
    let values: Vec<f32> = bits(&fp8.to_dtype(DType::F32)?)?
        .into_iter()
        .map(f32::from_bits)
        .filter(|v| v.is_finite())
        .flat_map(|v| [v, v * 1.0625, v * 1.03, v * 0.97])
        .filter(|v| v.abs() <= 448.0)
        .collect();
    let wide = Tensor::new(values.as_slice(), &Device::Cpu)?;
    for scale in [1.0f32, 0.5, 3.0e-3] {
        let cpu = engine::ops::linear::fp8_quantize(&(&wide * scale as f64)?, scale)?;
        let gpu =
            engine::ops::linear::fp8_quantize(&(&wide * scale as f64)?.to_device(device)?, scale)?;
        assert_eq!(gpu.dtype(), DType::F8E4M3);
        assert_eq!(bits(&gpu)?, bits(&cpu)?, "narrowing at scale {scale}");
    }
    Ok(())
}

/// An fp8 weight's product on FP8 tensor cores (the activations quantized to fp8 by their maximum,
/// cuBLASLt in f32) against the same fp8 weight dequantized and multiplied in f32, at FLUX.1-dev's
/// sizes: fails past a relative L2 error of 6e-2 (fp8's 3 mantissa bits on the activations: about
/// 3.6% per value); the dequantizing path (`Kernels::Plain`) must stay within bf16's 1e-2. Prints
/// both paths' times beside the dense bf16 product's.
#[test]
fn fp8_products_on_tensor_cores_match_the_dequantized_weight() -> Result<()> {
    let device = &cuda_device();
    let Device::Cuda(dev) = device else {
        unreachable!()
    };
    assert!(
        engine::kernels::fp8::has_fp8_tensor_cores(dev),
        "this GPU has no FP8 tensor cores (compute capability 8.9 or later): run on an Ada or Hopper GPU"
    );
    for (rows, k, n) in [(4608, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072)] {
        let x = (Tensor::randn(0f32, 1.0, (rows, k), device)?).to_dtype(DType::BF16)?;
        let w = (Tensor::randn(0f32, 0.02, (n, k), device)?).to_dtype(DType::BF16)?;
        let b = (Tensor::randn(0f32, 0.1, n, device)?).to_dtype(DType::BF16)?;
        let absmax = w
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let scale = absmax / engine::models::linear::FP8_E4M3_MAX;
        let w8 = engine::ops::linear::fp8_quantize(&w, scale)?;
        let w_deq = engine::ops::linear::fp8_dequantize(&w8, scale, DType::F32)?;
        let want = x
            .to_dtype(DType::F32)?
            .matmul(&w_deq.t()?)?
            .broadcast_add(&b.to_dtype(DType::F32)?)?;
        let bias = Some(&b);
        let fast = engine::ops::linear::fp8_linear(Kernels::Fused, &w8, scale, bias, &x)?;
        let plain = engine::ops::linear::fp8_linear(Kernels::Plain, &w8, scale, bias, &x)?;
        let (e_fast, e_plain) = (rel_l2(&fast, &want)?, rel_l2(&plain, &want)?);
        let t_fast = time_median(device, 20, || {
            Ok(engine::ops::linear::fp8_linear(
                Kernels::Fused,
                &w8,
                scale,
                bias,
                &x,
            )?)
        })?;
        let t_plain = time_median(device, 20, || {
            Ok(engine::ops::linear::fp8_linear(
                Kernels::Plain,
                &w8,
                scale,
                bias,
                &x,
            )?)
        })?;
        let dense = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let t_bf16 = time_median(device, 20, || {
            Ok(engine::ops::linear::linear(Kernels::Fused, &dense, &x)?)
        })?;
        println!(
            "fp8 linear ({rows}x{k})·({n}x{k})ᵀ: tensor cores {:.4} ms, err {e_fast:.2e}; dequantized {:.4} ms, err {e_plain:.2e}; dense bf16 {:.4} ms",
            t_fast * 1e3,
            t_plain * 1e3,
            t_bf16 * 1e3
        );
        assert!(
            e_fast < 6e-2,
            "FP8 product error {e_fast:.3e} at {rows}x{k}x{n}"
        );
        assert!(
            e_plain < 1e-2,
            "dequantized product error {e_plain:.3e} at {rows}x{k}x{n}"
        );
    }
    Ok(())
}

/// A GGUF weight's product on a GPU: many rows take the weight dequantized (candle's kernel, through
/// f16) and bf16 tensor cores, a few rows candle's integer kernels. Both against the dequantized
/// weight multiplied in f32, at FLUX.1-dev's sizes: fails past a relative L2 error of 1e-2 (bf16
/// products) for many rows and 3e-2 for a few (candle rounds the input to 8 bits per block there).
#[test]
fn gguf_products_on_a_gpu_match_the_dequantized_weight() -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use std::sync::Arc;
    let device = &cuda_device();
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
        let w = Tensor::randn(0f32, 0.02, (3072, 3072), &Device::Cpu)?;
        let q = Arc::new(QTensor::quantize_onto(&w, dtype, device)?);
        let w_deq = q.dequantize(device)?;
        let b = Tensor::randn(0f32, 0.1, 3072, device)?.to_dtype(DType::BF16)?;
        for rows in [4096, 2] {
            let x = Tensor::randn(0f32, 1.0, (rows, 3072), device)?.to_dtype(DType::BF16)?;
            let want = x
                .to_dtype(DType::F32)?
                .matmul(&w_deq.t()?)?
                .broadcast_add(&b.to_dtype(DType::F32)?)?;
            let got = engine::ops::linear::gguf_linear(Kernels::Fused, &q, Some(&b), &x)?;
            let err = rel_l2(&got, &want)?;
            let t = time_median(device, 10, || {
                Ok(engine::ops::linear::gguf_linear(
                    Kernels::Fused,
                    &q,
                    Some(&b),
                    &x,
                )?)
            })?;
            println!(
                "gguf {dtype:?} linear ({rows}x3072)·(3072x3072)ᵀ: {:.4} ms, err {err:.2e}",
                t * 1e3
            );
            let bound = if rows >= 16 { 1e-2 } else { 3e-2 };
            assert!(err < bound, "{dtype:?} at {rows} rows: error {err:.3e}");
        }
    }
    Ok(())
}

/// A layer streamed from host memory (`Linear::place`) gives the resident layer's output bit for bit in
/// each format the plan streams (bf16, fp8, GGUF), its weight copied to the GPU for the product; the
/// time of a streamed product against the resident one says what the copy costs at FLUX's largest
/// layer on this machine's link.
#[test]
fn a_layer_streamed_from_host_memory_matches_the_resident_one() -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use engine::models::linear::{Linear, QuantizedWeight};
    use std::sync::Arc;
    let device = &cuda_device();
    let (out, inp) = (21504, 3072);
    let w = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 0.1, out, device)?.to_dtype(DType::BF16)?;
    let x = Tensor::randn(0f32, 1.0, (4608, inp), device)?.to_dtype(DType::BF16)?;
    let fp8 =
        QuantizedWeight::from_dense(&w.to_device(device)?, engine::weights::WeightFormat::Fp8)?
            .expect("fp8 of a dense weight");
    let layers = [
        (
            "bf16",
            Linear::new(
                "l",
                w.to_dtype(DType::BF16)?.to_device(device)?,
                Some(b.clone()),
                Kernels::Fused,
            ),
        ),
        (
            "fp8",
            Linear::quantized("l", fp8, Some(b.clone()), Kernels::Fused)?,
        ),
        (
            "q4_k",
            Linear::quantized(
                "l",
                QuantizedWeight::Gguf(Arc::new(QTensor::quantize_onto(
                    &w,
                    GgmlDType::Q4K,
                    device,
                )?)),
                Some(b.clone()),
                Kernels::Fused,
            )?,
        ),
    ];
    // A resident product as long as the streamed ones: what a prefetched copy runs beside.
    let other = Linear::new(
        "other",
        w.to_dtype(DType::BF16)?.to_device(device)?,
        Some(b.clone()),
        Kernels::Fused,
    );
    for (name, layer) in layers {
        use candle_core::Module;
        let resident = layer.forward(&x)?;
        let t_resident = time_median(device, 5, || Ok(layer.forward(&x)?))?;
        layer.place(device, true)?;
        assert!(layer.is_streamed());
        assert!(
            layer.is_page_locked(),
            "{name}: the streamed weight is not page-locked"
        );
        let streamed = layer.forward(&x)?;
        let t_streamed = time_median(device, 5, || Ok(layer.forward(&x)?))?;
        let diff = (resident.to_dtype(DType::F32)? - streamed.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        // The streamed layer's copy comes from page-locked memory; the same bytes from pageable
        // memory, as candle copies any host tensor, for comparison.
        let pageable = Tensor::zeros(layer.bytes(), DType::U8, &Device::Cpu)?;
        let t_pageable = time_median(device, 5, || Ok(pageable.to_device(device)?))?;
        let gbs = |t: f64| layer.bytes() as f64 / t / 1e9;
        println!(
            "{name} {out}x{inp} layer, {} MB: resident {:.3} ms, streamed {:.3} ms (copy at {:.1} GB/s \
             from page-locked memory; {:.1} GB/s from pageable)",
            layer.bytes() >> 20,
            t_resident * 1e3,
            t_streamed * 1e3,
            gbs(t_streamed - t_resident),
            gbs(t_pageable)
        );
        assert_eq!(diff, 0.0, "{name}: a streamed product differs");
        // Copied ahead on the copy stream (`Linear::prefetch`) while another product runs: the
        // same result, and the pair takes about the longer of the two rather than their sum.
        layer.prefetch()?;
        let prefetched = layer.forward(&x)?;
        let diff = (resident.to_dtype(DType::F32)? - prefetched.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name}: a prefetched product differs");
        let t_other = time_median(device, 5, || Ok(other.forward(&x)?))?;
        let t_overlapped = time_median(device, 5, || {
            layer.prefetch()?;
            other.forward(&x)?;
            Ok(layer.forward(&x)?)
        })?;
        println!(
            "{name}: prefetched during another product: {:.3} ms for both (one after the other: {:.3} ms)",
            t_overlapped * 1e3,
            (t_other + t_streamed) * 1e3
        );
    }
    Ok(())
}
