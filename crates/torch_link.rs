//! Build script shared by the crates that link libtorch (through `torch-sys`): find its
//! libraries at run time without `LD_LIBRARY_PATH` where it was built, and keep
//! `libtorch_cuda` linked (nothing references it by symbol, so the linker would drop it
//! and CUDA would read as unavailable).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // The wheel's version, for reports (`torch/version.py` beside `torch/lib`).
    let version_py = std::path::Path::new(&lib).join("../version.py");
    if let Ok(text) = std::fs::read_to_string(version_py) {
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix("__version__ = ")) {
            println!(
                "cargo:rustc-env=CXXLM_LIBTORCH_VERSION={}",
                v.trim_matches(['\'', '"'])
            );
        }
    }
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
