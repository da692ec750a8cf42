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
        .forward(&engine::models::flux::FluxInputs {
            img: &r["hidden_states"],
            img_ids: &r["img_ids"],
            txt: &r["encoder_hidden_states"],
            txt_ids: &r["txt_ids"],
            timesteps: &r["timestep"],
            y: &r["pooled_projections"],
            guidance: r.get("guidance"),
        })
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
