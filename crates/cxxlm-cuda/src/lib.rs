//! CUDA work that tch does not bind: graphs of captured work ([`graph`]), causal
//! attention with an explicit backward ([`attention`]), streams and events ([`stream`]),
//! and the fused kernels of the GPT's explicit training step, compiled at run time by
//! NVRTC ([`fused`], [`nvrtc`]).
//! Builds whose libtorch lacks CUDA (or the CUDA headers) keep the CPU paths.

pub mod attention;
pub mod check;
pub mod fused;
pub mod graph;
pub mod nvrtc;
pub mod stream;

pub use fused::{Fused, Kernels};
pub use graph::CudaGraph;

#[cfg(cxxlm_cuda)]
extern "C" {
    fn cxxlm_current_stream(device: std::ffi::c_int) -> *mut std::ffi::c_void;
    fn cxxlm_peak_memory(device: std::ffi::c_int, out: *mut u64);
    fn cxxlm_reset_peak(device: std::ffi::c_int);
    fn cxxlm_allocator_counts(device: std::ffi::c_int, out: *mut i64);
}

/// What torch's allocator on a CUDA device has done since the process began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorCounts {
    /// Times it found no cached block, freed them all and retried: each a device
    /// synchronization, then fresh `cudaMalloc`s.
    pub retries: i64,
    pub device_allocs: i64,
    pub device_frees: i64,
}

/// [`AllocatorCounts`] of CUDA device `device`; None without the shim.
pub fn allocator_counts(device: usize) -> Option<AllocatorCounts> {
    #[cfg(cxxlm_cuda)]
    {
        let mut out = [0i64; 3];
        // SAFETY: reads the allocator's statistics of an initialized device into three
        // integers.
        unsafe { cxxlm_allocator_counts(device as std::ffi::c_int, out.as_mut_ptr()) };
        Some(AllocatorCounts {
            retries: out[0],
            device_allocs: out[1],
            device_frees: out[2],
        })
    }
    #[cfg(not(cxxlm_cuda))]
    {
        let _ = device;
        None
    }
}

/// The most bytes torch's allocator has had on a CUDA device since [`reset_peak_memory`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeakMemory {
    /// Handed out to tensors (PyTorch's `max_memory_allocated`).
    pub allocated: u64,
    /// Held from the device (`max_memory_reserved`): beyond `allocated`, blocks cached
    /// for reuse, among them those a stream's pending work still holds.
    pub reserved: u64,
}

/// [`PeakMemory`] of CUDA device `device`; None without the shim.
pub fn peak_memory(device: usize) -> Option<PeakMemory> {
    #[cfg(cxxlm_cuda)]
    {
        let mut out = [0u64; 2];
        // SAFETY: reads the allocator's statistics of an initialized device into two
        // integers.
        unsafe { cxxlm_peak_memory(device as std::ffi::c_int, out.as_mut_ptr()) };
        Some(PeakMemory {
            allocated: out[0],
            reserved: out[1],
        })
    }
    #[cfg(not(cxxlm_cuda))]
    {
        let _ = device;
        None
    }
}

pub fn reset_peak_memory(device: usize) {
    #[cfg(cxxlm_cuda)]
    // SAFETY: resets the allocator's peak statistics.
    unsafe {
        cxxlm_reset_peak(device as std::ffi::c_int)
    };
    #[cfg(not(cxxlm_cuda))]
    let _ = device;
}

/// The stream torch enqueues work on for CUDA device `device` (None without the shim).
pub fn current_stream(device: usize) -> Option<*mut std::ffi::c_void> {
    #[cfg(cxxlm_cuda)]
    // SAFETY: returns torch's current stream handle for the device.
    return Some(unsafe { cxxlm_current_stream(device as std::ffi::c_int) });
    #[cfg(not(cxxlm_cuda))]
    {
        let _ = device;
        None
    }
}

/// Runs a shim call that reports failure by returning false after writing a message.
#[cfg(cxxlm_cuda)]
pub(crate) fn call(f: impl FnOnce(*mut std::ffi::c_char, usize) -> bool) -> Result<(), String> {
    let mut error = [0 as std::ffi::c_char; 512];
    if f(error.as_mut_ptr(), error.len()) {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated message into `error`.
    let text = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
    Err(text.to_string_lossy().into_owned())
}
