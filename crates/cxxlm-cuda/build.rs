#[path = "../torch_link.rs"]
mod torch_link;

/// Links libtorch, and compiles `src/shim.cpp` (CUDA graphs, torch's stream, attention
/// with its statistics) where libtorch has CUDA and the CUDA headers it needs are at hand:
/// the torch wheel's `nvidia/cu13/include` completed by the `nvidia-cuda-crt` wheel
/// (`scripts/setup.sh`).
fn main() {
    println!("cargo:rustc-check-cfg=cfg(cxxlm_cuda)");
    println!("cargo:rerun-if-changed=src/shim.cpp");
    let Some(lib) = torch_link::link(None) else {
        return;
    };
    let torch = lib.join("..");
    let cuda = torch.join("../nvidia/cu13/include");
    if !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    if !cuda.join("crt/host_config.h").exists() {
        println!(
            "cargo:warning=no CUDA graphs or fused kernels: {} lacks crt/host_config.h (pip install nvidia-cuda-crt==13.0.88)",
            cuda.display()
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(&cuda)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("cxxlm_cuda_shim");
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=cxxlm_cuda");
}
