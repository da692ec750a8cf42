//! Helpers shared by the engine's integration tests: fixture paths and tensor comparison.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The transformer's forward on the inputs of a `reference/transformer_*.safetensors` file.
pub fn forward_on_reference(
    model: &engine::models::flux::FluxTransformer,
    r: &HashMap<String, Tensor>,
) -> Tensor {
    model
        .forward(&engine::models::flux::FluxInputs::from_diffusers_names(r))
        .unwrap()
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn tiny_dev() -> PathBuf {
    fixtures().join("tiny-flux-dev")
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join("reference")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn json(name: &str) -> serde_json::Value {
    let path = fixtures().join("reference").join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Largest absolute difference, relative to the reference's largest magnitude.
pub fn rel_err(ours: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(ours.dims(), want.dims(), "shapes differ");
    let a = ours
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = want
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[track_caller]
pub fn assert_close(what: &str, ours: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_err(ours, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} exceeds {tol:.0e}");
    eprintln!("{what}: relative error {e:.2e} (tolerance {tol:.0e})");
}

/// The GPU that the CUDA tests (gpu_kernels, gpu_training) run on. Without one they fail, saying where
/// to run them, rather than pass having checked nothing.
pub fn cuda_device() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| {
        panic!(
            "run on a machine with an NVIDIA GPU: these tests check the CUDA kernels and training's \
             gradients on one (`cargo test -p engine --features cuda --release --test gpu_kernels \
             --test gpu_training`, docs/performance.md); no CUDA device here: {e}"
        )
    })
}

/// ‖a − b‖ / ‖b‖ over all elements, in f32.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(num / b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
}

/// Times `f` (after one warm-up call): the median of `n` synchronised runs, in seconds. The GPU tests
/// print it beside each check, for the story in docs/performance.md.
pub fn time_median(
    device: &Device,
    n: usize,
    mut f: impl FnMut() -> anyhow::Result<Tensor>,
) -> anyhow::Result<f64> {
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = std::time::Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// FLUX weights under the BFL names drawn from N(0, 0.02) (norm scales around 1) as the model asks for
/// them: a model of any size without its files.
pub fn random_flux_weights(
    dtype: DType,
    device: &Device,
) -> anyhow::Result<engine::models::flux::FluxWeights> {
    use candle_core::Shape;
    use candle_nn::var_builder::SimpleBackend;
    struct Random;
    impl SimpleBackend for Random {
        fn get(
            &self,
            shape: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let mean = if name.ends_with(".scale") { 1.0 } else { 0.0 };
            Tensor::randn(mean, 0.02f32, shape, dev)?.to_dtype(dtype)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("random weights need a shape: `{name}` was asked without one")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }
    engine::models::flux::FluxWeights::from_var_builder(candle_nn::VarBuilder::from_backend(
        Box::new(Random),
        dtype,
        device.clone(),
    ))
}
