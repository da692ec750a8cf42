//! Which device the models run on, and in which precision.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The user's choice of device: `auto` takes CUDA when this build has it and a GPU answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            other => bail!("unknown device `{other}`: use auto, cpu or cuda"),
        }
    }
}

impl DeviceChoice {
    pub fn select(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => {
                if !cfg!(feature = "cuda") {
                    bail!("this build has no CUDA support: rebuild with `--features cuda` (see the README) or use --device cpu");
                }
                Device::new_cuda(0).map_err(|e| {
                    anyhow::anyhow!("no usable CUDA GPU ({e}); check the driver with nvidia-smi, or use --device cpu")
                })
            }
            Self::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(dev) = Device::new_cuda(0) {
                        return Ok(dev);
                    }
                    tracing::warn!("built with CUDA but no GPU answered: running on the CPU");
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// bf16 on the GPU (FLUX's native precision); f32 on the CPU, where bf16 matmuls are slow and
/// the small models we run there are cheap.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}
