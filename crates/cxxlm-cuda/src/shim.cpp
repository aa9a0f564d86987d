// What libtorch has and tch does not bind: CUDA graphs (at::cuda::CUDAGraph: capture the
// work torch enqueues between begin and end, on a side stream into the graph's own memory
// pool, then replay it with one launch), torch's streams (for our own kernels, and for
// collectives beside the computation) and events between them, and the attention
// kernels' forward with the statistics their backward needs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/core/Event.h>

#include <cstring>
#include <exception>

namespace {

struct Capture {
    explicit Capture(c10::cuda::CUDAStream previous) : previous(previous) {}
    at::cuda::CUDAGraph graph;
    c10::cuda::CUDAStream previous;
};

void report(const std::exception& e, char* error, size_t len) {
    std::strncpy(error, e.what(), len - 1);
    error[len - 1] = '\0';
}

}  // namespace

extern "C" {

// Starts capturing what torch enqueues on `device`; null (and `error` filled) on failure.
void* cxxlm_graph_begin(int device, char* error, size_t len) {
    try {
        auto previous = c10::cuda::getCurrentCUDAStream(device);
        c10::cuda::device_synchronize();
        auto* capture = new Capture(previous);
        c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, device));
        try {
            capture->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
        } catch (...) {
            c10::cuda::setCurrentCUDAStream(previous);
            delete capture;
            throw;
        }
        return capture;
    } catch (const std::exception& e) {
        report(e, error, len);
        return nullptr;
    }
}

// Ends the capture and makes the previous stream current again; 0 on success.
int cxxlm_graph_end(void* capture, char* error, size_t len) {
    auto* c = static_cast<Capture*>(capture);
    try {
        c->graph.capture_end();
        c10::cuda::setCurrentCUDAStream(c->previous);
        return 0;
    } catch (const std::exception& e) {
        c10::cuda::setCurrentCUDAStream(c->previous);
        report(e, error, len);
        return 1;
    }
}

// Enqueues the captured work on the current stream; 0 on success.
int cxxlm_graph_replay(void* capture, char* error, size_t len) {
    try {
        static_cast<Capture*>(capture)->graph.replay();
        return 0;
    } catch (const std::exception& e) {
        report(e, error, len);
        return 1;
    }
}

void cxxlm_graph_free(void* capture) { delete static_cast<Capture*>(capture); }

// Since the last reset, on `device`: the most memory torch's allocator has handed out
// (PyTorch's max_memory_allocated) and the most it has held from the device
// (max_memory_reserved); and the reset.
void cxxlm_peak_memory(int device, uint64_t* out) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    out[0] = stats.allocated_bytes[0].peak;  // StatType::AGGREGATE
    out[1] = stats.reserved_bytes[0].peak;
}
void cxxlm_reset_peak(int device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

// Since the process began, on `device`: how often torch's allocator found no cached block
// and freed them all to retry (a synchronization, then fresh cudaMallocs), and its
// cudaMalloc and cudaFree calls.
void cxxlm_allocator_counts(int device, int64_t* out) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    out[0] = stats.num_alloc_retries;
    out[1] = stats.num_device_alloc;
    out[2] = stats.num_device_free;
}

// The stream torch enqueues work on for `device` (a cudaStream_t).
void* cxxlm_current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

// Streams as torch knows them (heap c10::cuda::CUDAStream): torch's current one on
// `device`, or one of its pool's (non-blocking, to run beside the current one); null
// where torch refuses.
void* cxxlm_stream_current(int device) {
    try {
        return new c10::cuda::CUDAStream(c10::cuda::getCurrentCUDAStream(device));
    } catch (...) {
        return nullptr;
    }
}
void* cxxlm_stream_from_pool(int device) {
    try {
        return new c10::cuda::CUDAStream(c10::cuda::getStreamFromPool(false, device));
    } catch (...) {
        return nullptr;
    }
}
void cxxlm_stream_free(void* stream) { delete static_cast<c10::cuda::CUDAStream*>(stream); }

// Makes `stream` torch's current stream on its device: what torch enqueues goes there.
void cxxlm_stream_make_current(void* stream) {
    c10::cuda::setCurrentCUDAStream(*static_cast<c10::cuda::CUDAStream*>(stream));
}

// An event at the end of what `stream` holds now, that records when the device reaches it
// where `timed` (null, and `error` filled, on failure).
void* cxxlm_event_record(void* stream, int timed, char* error, size_t len) {
    try {
        auto* event = new c10::Event(c10::DeviceType::CUDA,
                                     timed ? c10::EventFlag::BACKEND_DEFAULT : c10::EventFlag::PYTORCH_DEFAULT);
        try {
            event->record(*static_cast<c10::cuda::CUDAStream*>(stream));
        } catch (...) {
            delete event;
            throw;
        }
        return event;
    } catch (const std::exception& e) {
        report(e, error, len);
        return nullptr;
    }
}

// What `stream` is given from now on waits for `event`; 0 on success.
int cxxlm_stream_wait(void* stream, void* event, char* error, size_t len) {
    try {
        static_cast<c10::Event*>(event)->block(*static_cast<c10::cuda::CUDAStream*>(stream));
        return 0;
    } catch (const std::exception& e) {
        report(e, error, len);
        return 1;
    }
}

// Seconds from timed event `start` to timed event `end`, both reached (negative, and
// `error` filled, on failure).
double cxxlm_event_seconds_between(void* start, void* end, char* error, size_t len) {
    try {
        return static_cast<c10::Event*>(start)->elapsedTime(*static_cast<c10::Event*>(end)) / 1e3;
    } catch (const std::exception& e) {
        report(e, error, len);
        return -1.0;
    }
}

// CUDA releases the event once the work before it is done.
void cxxlm_event_free(void* event) { delete static_cast<c10::Event*>(event); }

// `t`'s memory is used on `stream` too: torch's allocator hands it out again only after
// what `stream` holds now has run.
void cxxlm_record_stream(const at::Tensor* t, void* stream) {
    try {
        c10::cuda::CUDACachingAllocator::recordStream(t->storage().data_ptr(),
                                                      *static_cast<c10::cuda::CUDAStream*>(stream));
    } catch (...) {
        // Memory the caching allocator did not hand out is not its to hold back.
    }
}

// Causal attention over (B, H, T, D) views, by the kernel SDPA would choose (cuDNN or
// flash), or within segments of (N, H, D) token rows by flash attention's variable-length
// kernel; and what its backward needs.
enum class Kernel { Cudnn, Flash, FlashSegments };

struct Attention {
    Kernel kernel;
    at::Tensor logsumexp, cum_q, cum_k, seed, offset;
    int64_t max_q, max_k;
};

void* cxxlm_attention_forward(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, at::Tensor** out,
                              char* error, size_t len) {
    try {
        auto choice = at::_fused_sdp_choice(*q, *k, *v, {}, 0.0, true, std::nullopt, q->size(1) != k->size(1));
        auto* a = new Attention();
        bool cudnn = choice == 3;  // sdp::SDPBackend::cudnn_attention
        a->kernel = cudnn ? Kernel::Cudnn : Kernel::Flash;
        auto r = cudnn ? at::_scaled_dot_product_cudnn_attention(*q, *k, *v, std::nullopt, true, 0.0, true)
                       : at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, true);
        *out = new at::Tensor(std::get<0>(r));
        a->logsumexp = std::get<1>(r);
        a->cum_q = std::get<2>(r);
        a->cum_k = std::get<3>(r);
        a->max_q = std::get<4>(r).expect_int();
        a->max_k = std::get<5>(r).expect_int();
        a->seed = std::get<6>(r);
        a->offset = std::get<7>(r);
        return a;
    } catch (const std::exception& e) {
        report(e, error, len);
        return nullptr;
    }
}

// Causal attention within segments: q (N, H, D), k and v (N, H_kv, D) with unit stride in
// D, `starts` the int32 offsets where segments begin in the N rows, then N; `longest` the
// longest segment.
void* cxxlm_attention_forward_segments(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                       const at::Tensor* starts, int64_t longest, at::Tensor** out, char* error,
                                       size_t len) {
    try {
        auto r = at::_flash_attention_forward(*q, *k, *v, *starts, *starts, longest, longest, 0.0, true, false);
        auto* a = new Attention();
        a->kernel = Kernel::FlashSegments;
        *out = new at::Tensor(std::get<0>(r));
        a->logsumexp = std::get<1>(r);
        a->seed = std::get<2>(r);    // rng_state
        a->offset = std::get<3>(r);  // unused
        a->cum_q = a->cum_k = *starts;
        a->max_q = a->max_k = longest;
        return a;
    } catch (const std::exception& e) {
        report(e, error, len);
        return nullptr;
    }
}

// The gradients of q, k and v from that of the output (in the forward's layout); 0 on
// success.
int cxxlm_attention_backward(void* saved, const at::Tensor* dout, const at::Tensor* q, const at::Tensor* k,
                             const at::Tensor* v, const at::Tensor* out, at::Tensor** dq, at::Tensor** dk,
                             at::Tensor** dv, char* error, size_t len) {
    try {
        auto* a = static_cast<Attention*>(saved);
        std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
        switch (a->kernel) {
            case Kernel::Cudnn:
                r = at::_scaled_dot_product_cudnn_attention_backward(*dout, *q, *k, *v, *out, a->logsumexp, a->seed,
                                                                     a->offset, at::Tensor(), a->cum_q, a->cum_k,
                                                                     a->max_q, a->max_k, 0.0, true);
                break;
            case Kernel::Flash:
                r = at::_scaled_dot_product_flash_attention_backward(*dout, *q, *k, *v, *out, a->logsumexp, a->cum_q,
                                                                     a->cum_k, a->max_q, a->max_k, 0.0, true,
                                                                     a->seed, a->offset);
                break;
            case Kernel::FlashSegments:
                r = at::_flash_attention_backward(*dout, *q, *k, *v, *out, a->logsumexp, a->cum_q, a->cum_k, a->max_q,
                                                  a->max_k, 0.0, true, a->seed, a->offset);
                break;
        }
        *dq = new at::Tensor(std::get<0>(r));
        *dk = new at::Tensor(std::get<1>(r));
        *dv = new at::Tensor(std::get<2>(r));
        return 0;
    } catch (const std::exception& e) {
        report(e, error, len);
        return 1;
    }
}

void cxxlm_attention_free(void* saved) { delete static_cast<Attention*>(saved); }
}
