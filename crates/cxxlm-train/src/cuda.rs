//! Two functions of the CUDA runtime that torch loaded and tch does not expose:
//! the device's memory, and the memory in use (`cudaMemGetInfo`; it counts everything on
//! the device, torch's cached blocks and the CUDA context, so it bounds the allocator's
//! peak from above) and the current device (`cudaSetDevice`, which NCCL and the default stream follow).

use std::ffi::CStr;
use std::sync::OnceLock;

fn runtime_symbol(name: &CStr) -> Option<*mut libc::c_void> {
    static HANDLE: OnceLock<Option<usize>> = OnceLock::new();
    let handle = (*HANDLE.get_or_init(|| {
        [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"]
            .iter()
            .find_map(|lib| {
                // SAFETY: dlopen with a valid C string; NOLOAD first finds torch's copy.
                let h = unsafe {
                    let h = libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
                    if h.is_null() {
                        libc::dlopen(lib.as_ptr(), libc::RTLD_NOW)
                    } else {
                        h
                    }
                };
                (!h.is_null()).then_some(h as usize)
            })
    }))?;
    // SAFETY: dlsym on a live handle with a valid C string.
    let sym = unsafe { libc::dlsym(handle as *mut libc::c_void, name.as_ptr()) };
    (!sym.is_null()).then_some(sym)
}

/// Free and total bytes of the current CUDA device, or `None` without CUDA.
fn memory_info() -> Option<(u64, u64)> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    static F: OnceLock<Option<MemGetInfo>> = OnceLock::new();
    let f = (*F.get_or_init(|| {
        // SAFETY: the symbol has the signature `cudaError_t cudaMemGetInfo(size_t*, size_t*)`.
        runtime_symbol(c"cudaMemGetInfo").map(|s| unsafe { std::mem::transmute(s) })
    }))?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both pointers are valid for writes.
    let rc = unsafe { f(&mut free, &mut total) };
    (rc == 0).then_some((free as u64, total as u64))
}

/// Bytes in use on the current CUDA device, or `None` without CUDA.
pub fn used_bytes() -> Option<u64> {
    memory_info().map(|(free, total)| total - free)
}

/// The current CUDA device's memory, or `None` without CUDA.
pub fn total_bytes() -> Option<u64> {
    memory_info().map(|(_, total)| total)
}

/// Makes `device` this thread's current CUDA device.
pub fn set_device(device: usize) -> Result<(), String> {
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    let sym = runtime_symbol(c"cudaSetDevice").ok_or("the CUDA runtime is not loaded")?;
    // SAFETY: the symbol has the signature `cudaError_t cudaSetDevice(int)`.
    let f: SetDevice = unsafe { std::mem::transmute(sym) };
    // SAFETY: plain call with an int.
    match unsafe { f(device as i32) } {
        0 => Ok(()),
        rc => Err(format!(
            "cudaSetDevice({device}) failed with CUDA error {rc}"
        )),
    }
}
