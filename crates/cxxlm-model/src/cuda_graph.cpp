// CUDA graphs through libtorch's at::cuda::CUDAGraph, which tch does not bind: capture
// the work torch enqueues between begin and end (on a side stream, into the graph's own
// memory pool), then replay it with one launch.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

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
}
