//! GPU memory in use, from `cudaMemGetInfo` of the CUDA runtime that torch loaded
//! (tch exposes no allocator statistics). It counts everything on the device: torch's
//! cached blocks and the CUDA context, so it bounds the allocator's peak from above.

use std::sync::OnceLock;

type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;

fn mem_get_info() -> Option<MemGetInfo> {
    static FUNCTION: OnceLock<Option<MemGetInfo>> = OnceLock::new();
    *FUNCTION.get_or_init(|| {
        for name in [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"] {
            // SAFETY: dlopen/dlsym with valid C strings; the symbol has the CUDA runtime
            // signature `cudaError_t cudaMemGetInfo(size_t*, size_t*)`.
            unsafe {
                let handle = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
                let handle = if handle.is_null() {
                    libc::dlopen(name.as_ptr(), libc::RTLD_NOW)
                } else {
                    handle
                };
                if handle.is_null() {
                    continue;
                }
                let sym = libc::dlsym(handle, c"cudaMemGetInfo".as_ptr());
                if !sym.is_null() {
                    return Some(std::mem::transmute::<*mut libc::c_void, MemGetInfo>(sym));
                }
            }
        }
        None
    })
}

/// Bytes in use on the current CUDA device, or `None` without CUDA.
pub fn used_bytes() -> Option<u64> {
    let f = mem_get_info()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both pointers are valid for writes.
    let rc = unsafe { f(&mut free, &mut total) };
    (rc == 0).then(|| (total - free) as u64)
}
