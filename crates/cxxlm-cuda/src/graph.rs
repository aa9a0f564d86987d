//! GPU work captured once and replayed with one launch: libtorch's CUDA graphs, through
//! `shim.cpp` (tch binds none). A decoding step is hundreds of small kernels whose
//! launches, not their arithmetic, set its time; replayed as a graph it costs one.
//! Builds without the CUDA headers have no graphs: [`CudaGraph::capture`] says so.

#[cfg(cxxlm_cuda)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        pub fn cxxlm_graph_begin(device: c_int, error: *mut c_char, len: usize) -> *mut c_void;
        pub fn cxxlm_graph_end(graph: *mut c_void, error: *mut c_char, len: usize) -> c_int;
        pub fn cxxlm_graph_replay(graph: *mut c_void, error: *mut c_char, len: usize) -> c_int;
        pub fn cxxlm_graph_free(graph: *mut c_void);
    }
}

pub struct CudaGraph {
    #[cfg(cxxlm_cuda)]
    graph: *mut std::ffi::c_void,
}

#[cfg(cxxlm_cuda)]
use crate::call;

impl CudaGraph {
    /// Captures what `work` enqueues on CUDA device `device` (nothing runs yet), with
    /// what it returns: tensors that every [`CudaGraph::replay`] writes again.
    #[cfg(cxxlm_cuda)]
    pub fn capture<T>(device: usize, work: impl FnOnce() -> T) -> Result<(CudaGraph, T), String> {
        let mut graph = std::ptr::null_mut();
        // SAFETY: the shim's functions take a buffer and its length for the message.
        call(|e, n| {
            graph = unsafe { ffi::cxxlm_graph_begin(device as i32, e, n) };
            !graph.is_null()
        })?;
        let graph = CudaGraph { graph };
        // The capture must end (and the stream be restored) even if `work` panics.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        // SAFETY: as above, on the graph begin returned.
        let ended = call(|e, n| unsafe { ffi::cxxlm_graph_end(graph.graph, e, n) == 0 });
        let out = out.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        ended.map(|_| (graph, out))
    }

    #[cfg(not(cxxlm_cuda))]
    pub fn capture<T>(_device: usize, _work: impl FnOnce() -> T) -> Result<(CudaGraph, T), String> {
        Err("this build has no CUDA graphs (libtorch without CUDA, or no CUDA headers)".into())
    }

    /// Enqueues the captured work again on the current stream.
    pub fn replay(&self) -> Result<(), String> {
        #[cfg(cxxlm_cuda)]
        // SAFETY: a graph from a finished capture.
        return call(|e, n| unsafe { ffi::cxxlm_graph_replay(self.graph, e, n) == 0 });
        #[cfg(not(cxxlm_cuda))]
        unreachable!("no graph can be captured without CUDA graphs")
    }
}

#[cfg(cxxlm_cuda)]
impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the pointer came from cxxlm_graph_begin and is freed once.
        unsafe { ffi::cxxlm_graph_free(self.graph) }
    }
}
