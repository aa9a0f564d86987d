//! Shared by the build scripts of the crates that link libtorch (through `torch-sys`): find
//! its libraries at run time without `LD_LIBRARY_PATH` where it was built, and keep
//! `libtorch_cuda` linked (nothing references it by symbol, so the linker would drop it
//! and CUDA would read as unavailable).

use std::path::PathBuf;

/// Links as described (for the binary `only_bin` alone, when given); returns
/// libtorch's `lib` directory.
pub fn link(only_bin: Option<&str>) -> Option<PathBuf> {
    let arg = match only_bin {
        Some(bin) => format!("cargo:rustc-link-arg-bin={bin}="),
        None => "cargo:rustc-link-arg=".to_string(),
    };
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").ok()?);
    println!("{arg}-Wl,-rpath,{}", lib.display());
    // The wheel's version, for reports (`torch/version.py` beside `torch/lib`).
    if let Ok(text) = std::fs::read_to_string(lib.join("../version.py")) {
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix("__version__ = ")) {
            println!(
                "cargo:rustc-env=CXXLM_LIBTORCH_VERSION={}",
                v.trim_matches(['\'', '"'])
            );
        }
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("{arg}-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    Some(lib)
}
