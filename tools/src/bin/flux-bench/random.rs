//! FLUX weights drawn at random, for timing a full-size model without its files.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use engine::models::flux::FluxWeights;

/// Every tensor asked for drawn from N(0, 0.02), norm scales around 1: as a model is built. The values
/// are never zeros, so no kernel can take a shortcut.
struct Random;

impl SimpleBackend for Random {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
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

/// Random weights under the BFL names, made on `device` in `dtype` as the model asks for them.
pub fn flux_weights(dtype: DType, device: &Device) -> anyhow::Result<FluxWeights> {
    FluxWeights::from_var_builder(VarBuilder::from_backend(
        Box::new(Random),
        dtype,
        device.clone(),
    ))
}
