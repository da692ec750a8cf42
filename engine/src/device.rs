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
                new_cuda().map_err(|e| {
                    anyhow::anyhow!("no usable CUDA GPU ({e}); check the driver with nvidia-smi, or use --device cpu")
                })
            }
            Self::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(dev) = new_cuda() {
                        return Ok(dev);
                    }
                    tracing::warn!("built with CUDA but no GPU answered: running on the CPU");
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The first CUDA GPU, its freed memory kept for reuse. candle allocates from the driver's default
/// memory pool, which by default hands freed memory back at every synchronisation, so the next large
/// allocation maps its pages afresh, which was measured to cost more than the kernel filling the buffer.
/// Kept, as torch's caching allocator keeps it.
fn new_cuda() -> candle_core::Result<Device> {
    let device = Device::new_cuda(0)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        use candle_core::cuda_backend::WrapErr;
        let stream = cuda.cuda_stream();
        let mut keep = u64::MAX;
        // SAFETY: the device handle comes from the live context; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(stream.context().cu_device()).w()?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
            .w()?;
        }
    }
    Ok(device)
}

/// The device's free memory in bytes, for the memory plan: CUDA's count once the memory candle's pool
/// keeps for reuse is handed back (it is the previous model's, free for the next). `None` on the CPU.
pub fn free_memory(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda_backend::cudarc::driver::result;
        let stream = cuda.cuda_stream();
        stream
            .synchronize()
            .map_err(|e| anyhow::anyhow!("synchronising the GPU: {e:?}"))?;
        // SAFETY: the device handle comes from the live context; trimming frees only unused pool memory.
        unsafe {
            let pool = result::device::get_default_mem_pool(stream.context().cu_device())
                .map_err(|e| anyhow::anyhow!("reading the GPU's memory pool: {e:?}"))?;
            result::mem_pool::trim_to(pool, 0)
                .map_err(|e| anyhow::anyhow!("trimming the GPU's memory pool: {e:?}"))?;
        }
        let (free, _total) = stream
            .context()
            .mem_get_info()
            .map_err(|e| anyhow::anyhow!("reading the GPU's free memory: {e:?}"))?;
        return Ok(Some(free as u64));
    }
    let _ = device;
    Ok(None)
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
