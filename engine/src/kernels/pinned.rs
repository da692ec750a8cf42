//! Page-locked host memory for what the GPU copies again and again: a streamed layer's weight
//! (`models::linear::Linear::place`, docs/memory.md). The driver copies page-locked memory by DMA at
//! the link's full rate; pageable memory it first stages through a pinned buffer of its own, at a
//! fraction of it. `cuMemHostRegister` locks the pages where the weight already lies, so candle's
//! copies (`Tensor::to_device`) take the fast path unchanged.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::quantized::QTensor;
use candle_core::{bail, CpuStorage, CudaDevice, Result, Storage, Tensor};
use std::ffi::c_void;
use std::sync::Arc;

/// What keeps the locked memory alive: the host tensor or GGUF blocks it belongs to.
enum Owner {
    Tensor(#[allow(dead_code)] Tensor),
    Blocks(#[allow(dead_code)] Arc<QTensor>),
}

/// Host memory page-locked while this lives. Dropping it unlocks the pages before its owner (and so
/// the memory) can be freed.
pub struct PinnedHost {
    ptr: *mut c_void,
    bytes: usize,
    device: CudaDevice,
    _owner: Owner,
}

// The pointer is only handed back to the driver to unlock the pages; the memory itself is read
// through its owner, which is Send and Sync.
unsafe impl Send for PinnedHost {}
unsafe impl Sync for PinnedHost {}

impl std::fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedHost({} bytes)", self.bytes)
    }
}

impl PinnedHost {
    /// Locks the storage of `tensor`, which must be on the host, for copies to `device`.
    pub fn tensor(tensor: &Tensor, device: &CudaDevice) -> Result<Self> {
        let (ptr, bytes) = {
            let (storage, _) = tensor.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("only host memory is page-locked")
            };
            fn raw<T>(v: &[T]) -> (*mut c_void, usize) {
                (v.as_ptr() as *mut c_void, std::mem::size_of_val(v))
            }
            match cpu {
                CpuStorage::U8(v) => raw(v),
                CpuStorage::BF16(v) => raw(v),
                CpuStorage::F16(v) => raw(v),
                CpuStorage::F32(v) => raw(v),
                CpuStorage::F8E4M3(v) => raw(v),
                _ => bail!(
                    "page-locking a {:?} tensor is not supported",
                    tensor.dtype()
                ),
            }
        };
        Self::lock(ptr, bytes, device, Owner::Tensor(tensor.clone()))
    }

    /// Locks the blocks of a GGUF weight held on the host.
    pub fn blocks(q: &Arc<QTensor>, device: &CudaDevice) -> Result<Self> {
        let (ptr, bytes) = {
            let data = q.data()?;
            if matches!(data, std::borrow::Cow::Owned(_)) {
                bail!("only GGUF blocks held on the host are page-locked")
            }
            (data.as_ptr() as *mut c_void, data.len())
        };
        Self::lock(ptr, bytes, device, Owner::Blocks(q.clone()))
    }

    fn lock(ptr: *mut c_void, bytes: usize, device: &CudaDevice, owner: Owner) -> Result<Self> {
        let stream = device.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))?;
        // SAFETY: `ptr` and `bytes` span the owner's live allocation, which `owner` keeps alive
        // until `Drop` has unlocked it.
        let status =
            unsafe { sys::cuMemHostRegister_v2(ptr, bytes, sys::CU_MEMHOSTREGISTER_PORTABLE) };
        if status != sys::CUresult::CUDA_SUCCESS {
            bail!("page-locking {bytes} bytes of host memory failed: {status:?}")
        }
        Ok(Self {
            ptr,
            bytes,
            device: device.clone(),
            _owner: owner,
        })
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let bound = self.device.cuda_stream().context().bind_to_thread();
        // SAFETY: `ptr` was registered by `lock` and its memory is still alive (`_owner` drops after
        // this). An unlock that fails leaves the pages locked until the process ends: nothing to
        // recover, so it is only logged.
        let status = unsafe { sys::cuMemHostUnregister(self.ptr) };
        if bound.is_err() || status != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!(
                "unlocking {} bytes of host memory failed: {status:?}",
                self.bytes
            );
        }
    }
}
