//! NCCL through its C API, from the `libnccl.so.2` that torch's CUDA library already
//! loaded (the `nvidia-nccl` wheel beside torch). Every call is enqueued on torch's
//! current stream of the device, so it is ordered with the kernels before and after it
//! without extra synchronization: the stream torch computes on, or the side stream that
//! full sharding makes current for its gathers and reduce-scatters.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UniqueId {
    internal: [u8; 128],
}

type Comm = *mut c_void;
type Stream = *mut c_void;

type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
/// `ncclAllReduce` and `ncclReduceScatter`: send, receive, count, type, op, comm, stream.
type Reduce =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int;
type AllGather =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

struct Lib {
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: Reduce,
    reduce_scatter: Reduce,
    all_gather: AllGather,
    get_error_string: GetErrorString,
}

const SUM: c_int = 0;
const AVG: c_int = 4;

fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: dlopen/dlsym with valid C strings; each symbol is cast to the signature
        // NCCL 2.x declares in nccl.h.
        unsafe {
            let mut handle = libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            if handle.is_null() {
                handle = libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_NOW);
            }
            if handle.is_null() {
                return Err("libnccl.so.2 is not loaded and not on the library path (the torch wheel brings it as nvidia-nccl)".into());
            }
            let sym = |name: &CStr| {
                let p = libc::dlsym(handle, name.as_ptr());
                if p.is_null() {
                    Err(format!("libnccl.so.2 lacks {name:?}"))
                } else {
                    Ok(p)
                }
            };
            Ok(Lib {
                get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueId>(sym(c"ncclGetUniqueId")?),
                comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRank>(sym(c"ncclCommInitRank")?),
                all_reduce: std::mem::transmute::<*mut c_void, Reduce>(sym(c"ncclAllReduce")?),
                reduce_scatter: std::mem::transmute::<*mut c_void, Reduce>(sym(c"ncclReduceScatter")?),
                all_gather: std::mem::transmute::<*mut c_void, AllGather>(sym(c"ncclAllGather")?),
                get_error_string: std::mem::transmute::<*mut c_void, GetErrorString>(sym(c"ncclGetErrorString")?),
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn check(lib: &Lib, what: &str, rc: c_int) -> Result<(), String> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static C string for every result code.
    let text = unsafe { CStr::from_ptr((lib.get_error_string)(rc)) };
    Err(format!(
        "NCCL {what}: {} (code {rc})",
        text.to_string_lossy()
    ))
}

fn data_type(kind: Kind) -> Result<c_int, String> {
    Ok(match kind {
        Kind::Int8 => 0,
        Kind::Uint8 => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        other => return Err(format!("NCCL has no data type for {other:?}")),
    })
}

/// A new id for rank 0 to hand to the others.
pub(super) fn unique_id() -> Result<[u8; 128], String> {
    let lib = lib()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: `id` is valid for writes.
    check(lib, "ncclGetUniqueId", unsafe {
        (lib.get_unique_id)(&mut id)
    })?;
    Ok(id.internal)
}

pub(super) struct Nccl {
    lib: &'static Lib,
    comm: Comm,
    pub(super) device: usize,
}

// SAFETY: the communicator is used from one thread at a time (the training loop's).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the communicator of `id` on the current device (`device`).
    pub(super) fn init(id: &[u8], rank: usize, size: usize, device: usize) -> Result<Nccl, String> {
        let lib = lib()?;
        let internal: [u8; 128] = id
            .try_into()
            .map_err(|_| format!("rank 0 sent a {}-byte NCCL id; expected 128", id.len()))?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` is valid for writes; the id is passed by value as nccl.h declares.
        let rc = unsafe {
            (lib.comm_init_rank)(
                &mut comm,
                size as c_int,
                UniqueId { internal },
                rank as c_int,
            )
        };
        check(lib, "ncclCommInitRank", rc)?;
        Ok(Nccl { lib, comm, device })
    }

    /// Torch's current stream on the device.
    fn stream(&self) -> Stream {
        cxxlm_cuda::current_stream(self.device).unwrap_or(std::ptr::null_mut())
    }

    fn on_device(&self, t: &Tensor) -> Result<(), String> {
        if t.device() != tch::Device::Cuda(self.device) || !t.is_contiguous() {
            return Err(format!(
                "NCCL needs contiguous tensors on cuda:{}; got {:?}",
                self.device,
                t.device()
            ));
        }
        Ok(())
    }

    pub(super) fn all_reduce_sum(&self, t: &Tensor) -> Result<(), String> {
        self.on_device(t)?;
        // SAFETY: in-place reduction over `numel` elements of a live contiguous tensor.
        let rc = unsafe {
            (self.lib.all_reduce)(
                t.data_ptr(),
                t.data_ptr(),
                t.numel(),
                data_type(t.kind())?,
                SUM,
                self.comm,
                self.stream(),
            )
        };
        check(self.lib, "ncclAllReduce", rc)
    }

    pub(super) fn reduce_scatter_mean(&self, t: &Tensor, size: i64) -> Result<Tensor, String> {
        let t = t.contiguous();
        self.on_device(&t)?;
        let mut shape = t.size();
        shape[0] /= size;
        let out = t.new_empty(shape.as_slice(), (t.kind(), t.device()));
        // SAFETY: `t` holds `size` x `out.numel()` elements; both stay alive until the
        // stream has run the kernel (later frees are ordered after it on that stream).
        let rc = unsafe {
            (self.lib.reduce_scatter)(
                t.data_ptr(),
                out.data_ptr(),
                out.numel(),
                data_type(t.kind())?,
                AVG,
                self.comm,
                self.stream(),
            )
        };
        check(self.lib, "ncclReduceScatter", rc)?;
        Ok(out)
    }

    pub(super) fn all_gather(&self, t: &Tensor, size: usize) -> Result<Tensor, String> {
        let t = t.contiguous();
        self.on_device(&t)?;
        let mut shape = t.size();
        shape[0] *= size as i64;
        let out = t.new_empty(shape.as_slice(), (t.kind(), t.device()));
        // SAFETY: `out` holds `size` x `t.numel()` elements; see reduce_scatter_mean.
        let rc = unsafe {
            (self.lib.all_gather)(
                t.data_ptr(),
                out.data_ptr(),
                t.numel(),
                data_type(t.kind())?,
                self.comm,
                self.stream(),
            )
        };
        check(self.lib, "ncclAllGather", rc)?;
        Ok(out)
    }

    pub(super) fn barrier(&self) -> Result<(), String> {
        let one = Tensor::ones([1], (Kind::Float, tch::Device::Cuda(self.device)));
        self.all_reduce_sum(&one)?;
        tch::Cuda::synchronize(self.device as i64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_library_torch_loaded_has_every_function_we_call() {
        // Only where torch was built with CUDA (its library then brings NCCL).
        let cuda_torch = std::fs::read_to_string("/proc/self/maps")
            .is_ok_and(|maps| maps.contains("libtorch_cuda.so"));
        if cuda_torch {
            super::lib().unwrap();
        }
    }
}
