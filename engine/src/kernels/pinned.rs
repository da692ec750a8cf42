//! Page-locked host memory for what the GPU copies again and again: a streamed layer's weight
//! (`models::linear::Linear::place`, docs/memory.md). The driver copies page-locked memory by DMA at
//! the link's full rate; pageable memory it first stages through a pinned buffer of its own, at a
//! fraction of it. `cuMemHostRegister` locks the pages where the weight already lies, so candle's
//! copies (`Tensor::to_device`) take the fast path unchanged.
//!
//! [`PinnedHost::upload`] copies ahead of use instead: on a copy stream of the device's own, while
//! the compute stream works, so that a streamed block's copy hides behind the block before it.

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaEvent, CudaStream, DevicePtr};
use candle_core::cuda_backend::{CudaDType, CudaStorage, DeviceId};
use candle_core::op::BackpropOp;
use candle_core::quantized::cuda::QCudaStorage;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{bail, CpuStorage, CudaDevice, DType, Result, Storage, Tensor};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

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

    /// Starts copying the locked bytes to a new tensor like `host` (the tensor they belong to) on the
    /// GPU. The tensor may be used once [`Upload::join`] has made the compute stream wait for it.
    pub fn upload_tensor(&self, host: &Tensor) -> Result<(Tensor, Upload)> {
        fn alloc<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            device: &CudaDevice,
            len: usize,
        ) -> Result<(CudaStorage, sys::CUdeviceptr)> {
            // SAFETY: every byte is written by the upload before the compute stream reads any
            // (`Upload::join`).
            let slice = unsafe { device.alloc::<T>(len)? };
            let ptr = slice.device_ptr(&device.cuda_stream()).0;
            Ok((CudaStorage::wrap_cuda_slice(slice, device.clone()), ptr))
        }
        let (d, n) = (&self.device, host.elem_count());
        if n * host.dtype().size_in_bytes() != self.bytes {
            bail!("the tensor is not the locked memory it is uploaded from")
        }
        let (storage, ptr) = match host.dtype() {
            DType::BF16 => alloc::<half::bf16>(d, n)?,
            DType::F16 => alloc::<half::f16>(d, n)?,
            DType::F32 => alloc::<f32>(d, n)?,
            DType::F8E4M3 => alloc::<float8::F8E4M3>(d, n)?,
            DType::U8 => alloc::<u8>(d, n)?,
            dt => bail!("uploading a {dt:?} tensor is not supported"),
        };
        let upload = self.upload(ptr)?;
        let tensor = Tensor::from_storage(
            Storage::Cuda(storage),
            host.shape().clone(),
            BackpropOp::none(),
            false,
        );
        Ok((tensor, upload))
    }

    /// Starts copying the locked GGUF blocks of `host` to new blocks on the GPU ([`Self::upload_tensor`]).
    pub fn upload_blocks(&self, host: &QTensor) -> Result<(QTensor, Upload)> {
        let storage = QCudaStorage::zeros(&self.device, host.shape().elem_count(), host.dtype())?;
        if storage.storage_size_in_bytes() != self.bytes {
            bail!("the blocks are not the locked memory they are uploaded from")
        }
        let upload = self.upload(storage.device_ptr()? as sys::CUdeviceptr)?;
        Ok((QTensor::new(QStorage::Cuda(storage), host.shape())?, upload))
    }

    /// Queues the copy of every locked byte to `dst` on the device's copy stream, behind the compute
    /// stream's work so far: `dst` was just allocated in the compute stream's order, in memory that
    /// work may still be using.
    fn upload(&self, dst: sys::CUdeviceptr) -> Result<Upload> {
        let compute = self.device.cuda_stream();
        let copy = copy_stream(&self.device)?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let allocated = compute.record_event(flags).map_err(driver)?;
        copy.wait(&allocated).map_err(driver)?;
        // SAFETY: `dst` holds `self.bytes` bytes (checked by the callers) that nothing reads until the
        // compute stream has waited for `ready`; the source stays locked and alive while the copy
        // runs (the layer that owns it finishes its upload before unlocking: `Upload::finish`).
        unsafe {
            let src = std::slice::from_raw_parts(self.ptr as *const u8, self.bytes);
            result::memcpy_htod_async(dst, src, copy.cu_stream()).map_err(driver)?;
        }
        let ready = copy.record_event(flags).map_err(driver)?;
        Ok(Upload {
            ready: Some(ready),
            compute,
        })
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

fn driver(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA: {e:?}"))
}

/// The stream that streamed weights are copied on, one per device: copies run one after another,
/// in the order the model asks for them, beside the compute stream's work.
fn copy_stream(device: &CudaDevice) -> Result<Arc<CudaStream>> {
    static STREAMS: Mutex<Vec<(DeviceId, Arc<CudaStream>)>> = Mutex::new(Vec::new());
    let mut streams = STREAMS.lock().expect("copy streams lock poisoned");
    if let Some((_, s)) = streams.iter().find(|(id, _)| *id == device.id()) {
        return Ok(s.clone());
    }
    let stream = device.cuda_stream().fork().map_err(driver)?;
    streams.push((device.id(), stream.clone()));
    Ok(stream)
}

/// A copy to the GPU queued on the copy stream ([`PinnedHost::upload_tensor`]). Whatever it fills
/// must not be read, or freed, on the compute stream before that stream has waited for it: `join`
/// does so explicitly, and dropping it without a join still does (so its memory is freed after the
/// copy, not under it).
pub struct Upload {
    ready: Option<CudaEvent>,
    compute: Arc<CudaStream>,
}

impl Upload {
    /// Makes the compute stream wait for the copy: its work queued from now on sees the bytes.
    pub fn join(mut self) -> Result<()> {
        match self.ready.take() {
            Some(ready) => self.compute.wait(&ready).map_err(driver),
            None => Ok(()),
        }
    }

    /// Waits on the host until the copy is done: before its source memory is unlocked.
    pub fn finish(&self) -> Result<()> {
        match &self.ready {
            Some(ready) => ready.synchronize().map_err(driver),
            None => Ok(()),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(ready) = self.ready.take() {
            if let Err(e) = self.compute.wait(&ready) {
                tracing::warn!("an unused upload's copy could not be waited for: {e:?}");
            }
        }
    }
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upload")
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
