//! The one linear layer type of every model the studio trains or adapts: a frozen base weight
//! plus any number of low-rank adapters applied unmerged, `y = W x + b + Σ sᵢ Bᵢ(Aᵢ x)`.
//! Generation swaps adapters per request on one resident base model; training makes the
//! adapters' tensors `Var`s and leaves the base alone.

use candle_core::{Module, Result, Tensor};
use std::sync::{Arc, RwLock};

/// A low-rank update: `down` is (rank, in), `up` is (out, rank). `up` may cover only a slice of
/// the output rows (a LoRA trained on `to_q` placed on a fused `qkv` layer): `out_offset` says
/// where that slice starts.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
    pub out_offset: usize,
}

#[derive(Debug)]
pub struct Linear {
    name: String,
    base: candle_nn::Linear,
    out_features: usize,
    adapters: RwLock<Vec<Arc<Adapter>>>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        let out_features = weight.dim(0).unwrap_or(0);
        Self {
            name: name.into(),
            base: candle_nn::Linear::new(weight, bias),
            out_features,
            adapters: RwLock::new(Vec::new()),
        }
    }

    /// The checkpoint name of this layer (BFL layout for FLUX), which LoRA keys are mapped to.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }

    pub fn in_features(&self) -> usize {
        self.base.weight().dim(1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn set_adapters(&self, adapters: Vec<Arc<Adapter>>) {
        *self.adapters.write().expect("adapter lock poisoned") = adapters;
    }

    pub fn clear_adapters(&self) {
        self.adapters
            .write()
            .expect("adapter lock poisoned")
            .clear();
    }

    pub fn adapter_count(&self) -> usize {
        self.adapters.read().expect("adapter lock poisoned").len()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = crate::models::fused::linear(&self.base, x)?;
        let adapters = self.adapters.read().expect("adapter lock poisoned");
        for a in adapters.iter() {
            // Adapters may be f32 (training) over a bf16 base: compute in theirs, add in ours.
            let xa = x.to_dtype(a.down.dtype())?;
            let h = xa.broadcast_matmul(&a.down.t()?)?;
            let delta = (h.broadcast_matmul(&a.up.t()?)? * a.scale)?.to_dtype(y.dtype())?;
            let rows = delta.dim(candle_core::D::Minus1)?;
            y = if a.out_offset == 0 && rows == self.out_features {
                (y + delta)?
            } else {
                let last = y.rank() - 1;
                let before = y.narrow(last, 0, a.out_offset)?;
                let mid = (y.narrow(last, a.out_offset, rows)? + delta)?;
                let after_start = a.out_offset + rows;
                let after = y.narrow(last, after_start, self.out_features - after_start)?;
                Tensor::cat(&[before, mid, after], last)?
            };
        }
        Ok(y)
    }
}
