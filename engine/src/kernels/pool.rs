//! The device's memory pool. Candle's CUDA allocations are stream-ordered (`cuMemAllocAsync`), so
//! memory a load frees (a weight's transient copies as it becomes fp8, say) goes back to the device's
//! pool rather than to the driver, and stays reserved there: the next part to load (T5 after the
//! transformer) can then fail for memory the card has. Trimming the pool after a load hands it back.

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::{CudaDevice, Result};

fn driver(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e:?}"))
}

/// Waits for the device's queued work, then returns the pool's unused memory to the driver.
pub fn release_unused(device: &CudaDevice) -> Result<()> {
    let stream = device.cuda_stream();
    let context = stream.context();
    context
        .bind_to_thread()
        .map_err(|e| driver("binding the CUDA context", e))?;
    stream
        .synchronize()
        .map_err(|e| driver("waiting for the device", e))?;
    if !context.has_async_alloc() {
        return Ok(());
    }
    // SAFETY: plain driver calls on this context's device; the pool handle is the driver's own.
    unsafe {
        let mut pool = std::mem::MaybeUninit::uninit();
        sys::cuDeviceGetMemPool(pool.as_mut_ptr(), context.cu_device())
            .result()
            .map_err(|e| driver("reading the device's memory pool", e))?;
        sys::cuMemPoolTrimTo(pool.assume_init(), 0)
            .result()
            .map_err(|e| driver("trimming the device's memory pool", e))?;
    }
    Ok(())
}
