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
                new_cuda(0).map_err(|e| {
                    anyhow::anyhow!("no usable CUDA GPU ({e}); check the driver with nvidia-smi, or use --device cpu")
                })
            }
            Self::Auto => {
                if cfg!(feature = "cuda") {
                    if let Ok(dev) = new_cuda(0) {
                        return Ok(dev);
                    }
                    tracing::warn!("built with CUDA but no GPU answered: running on the CPU");
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// `--gpus`: every GPU of the machine, or a list of CUDA ordinals (`0,1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    All,
    List(Vec<usize>),
}

impl std::str::FromStr for Gpus {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        let mut list = Vec::new();
        for part in s.split(',') {
            let ordinal: usize = part.trim().parse().map_err(|_| {
                anyhow::anyhow!("`{s}` is not `all` or a list of GPU numbers like 0,1 (as nvidia-smi numbers them)")
            })?;
            if list.contains(&ordinal) {
                bail!("GPU {ordinal} is listed twice in `{s}`");
            }
            list.push(ordinal);
        }
        Ok(Self::List(list))
    }
}

impl Gpus {
    /// One device per GPU, in order: each worker of the server gets one.
    pub fn select(&self) -> Result<Vec<Device>> {
        if !cfg!(feature = "cuda") {
            bail!("--gpus needs a build with CUDA support: rebuild with `--features cuda` (see the README), or run several workers on the CPU with --workers");
        }
        let ordinals = match self {
            Self::List(list) => list.clone(),
            Self::All => (0..cuda_count()?).collect(),
        };
        if ordinals.is_empty() {
            bail!("no CUDA GPU answered; check the driver with nvidia-smi");
        }
        ordinals
            .into_iter()
            .map(|ordinal| {
                new_cuda(ordinal).map_err(|e| {
                    anyhow::anyhow!(
                        "GPU {ordinal} is not usable ({e}); check the list against nvidia-smi"
                    )
                })
            })
            .collect()
    }
}

/// How many CUDA GPUs the driver sees.
fn cuda_count() -> Result<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let count = CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("counting the CUDA GPUs: {e:?}"))?;
        Ok(usize::try_from(count).unwrap_or(0))
    }
    #[cfg(not(feature = "cuda"))]
    Ok(0)
}

/// How a device is named to users: `cpu`, `cuda:<ordinal>`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// A CUDA GPU by its ordinal, its freed memory kept for reuse. candle allocates from the driver's default
/// memory pool, which by default hands freed memory back at every synchronisation, so the next large
/// allocation maps its pages afresh, which was measured to cost more than the kernel filling the buffer.
/// Kept, as torch's caching allocator keeps it.
fn new_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_all_or_a_list_of_ordinals() {
        assert_eq!("all".parse::<Gpus>().unwrap(), Gpus::All);
        assert_eq!("0, 1".parse::<Gpus>().unwrap(), Gpus::List(vec![0, 1]));
        assert!("0,0".parse::<Gpus>().is_err());
        assert!("first".parse::<Gpus>().is_err());
        assert_eq!(device_name(&Device::Cpu), "cpu");
    }
}
