//! Kernels compiled at run time: NVRTC turns CUDA C++ into a cubin for the device at hand
//! and the CUDA driver loads and launches it. Both libraries are opened with `dlopen`, so
//! that binaries start on hosts without them; NVRTC alone (compiling, no launching) needs
//! no GPU. NVRTC comes with the torch wheel (`nvidia/cu13/lib`, beside the CUDA runtime
//! that libtorch loaded); the driver with the GPU.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::OnceLock;

/// Opens the first of `names` that loads.
fn open(names: &[CString]) -> Result<*mut c_void, String> {
    for name in names {
        // SAFETY: dlopen with a valid C string.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            return Ok(handle);
        }
    }
    Err(format!(
        "cannot load any of {}",
        names
            .iter()
            .map(|n| n.to_string_lossy())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The symbol `name` of `handle` as the function pointer type `F`.
///
/// # Safety
/// `F` must be the symbol's C signature.
unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &CStr) -> Result<F, String> {
    let ptr = libc::dlsym(handle, name.as_ptr());
    if ptr.is_null() {
        return Err(format!("symbol {} not found", name.to_string_lossy()));
    }
    Ok(std::mem::transmute_copy(&ptr))
}

/// Opens NVRTC: from the loader's path, else from the directory of the CUDA runtime that
/// libtorch loaded (the wheel keeps them together). NVRTC opens its builtins library by
/// name, which the loader would not find there, so that one is loaded first.
fn open_nvrtc() -> Result<*mut c_void, String> {
    let mut names = vec![c"libnvrtc.so.13".to_owned()];
    // SAFETY: dlsym over the global scope, dladdr on what it returned, dlopen of a path.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"cudaRuntimeGetVersion".as_ptr());
        let mut info: libc::Dl_info = std::mem::zeroed();
        if !f.is_null() && libc::dladdr(f, &mut info) != 0 && !info.dli_fname.is_null() {
            let runtime = CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned();
            if let Some(dir) = std::path::Path::new(&runtime).parent() {
                let path = |name: &str| CString::new(dir.join(name).to_string_lossy().as_bytes());
                if let (Ok(builtins), Ok(nvrtc)) =
                    (path("libnvrtc-builtins.so.13.0"), path("libnvrtc.so.13"))
                {
                    libc::dlopen(builtins.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
                    names.push(nvrtc);
                }
            }
        }
    }
    open(&names)
}

type Program = *mut c_void;

struct Nvrtc {
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    log: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> c_int,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut Program) -> c_int,
    error: unsafe extern "C" fn(c_int) -> *const c_char,
}

// SAFETY: function pointers into a library that stays loaded.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

fn nvrtc() -> Result<&'static Nvrtc, String> {
    static API: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
    API.get_or_init(|| {
        let h = open_nvrtc()?;
        // SAFETY: NVRTC's documented signatures.
        unsafe {
            Ok(Nvrtc {
                create: symbol(h, c"nvrtcCreateProgram")?,
                compile: symbol(h, c"nvrtcCompileProgram")?,
                log_size: symbol(h, c"nvrtcGetProgramLogSize")?,
                log: symbol(h, c"nvrtcGetProgramLog")?,
                cubin_size: symbol(h, c"nvrtcGetCUBINSize")?,
                cubin: symbol(h, c"nvrtcGetCUBIN")?,
                destroy: symbol(h, c"nvrtcDestroyProgram")?,
                error: symbol(h, c"nvrtcGetErrorString")?,
            })
        }
    })
    .as_ref()
    .map_err(|e| format!("NVRTC: {e}"))
}

/// Compiles CUDA C++ `source` into a cubin for compute capability `arch` (90 for H100).
pub fn compile(source: &str, arch: u32) -> Result<Vec<u8>, String> {
    let api = nvrtc()?;
    let src = CString::new(source).map_err(|_| "kernel source holds a NUL byte")?;
    let options: Vec<CString> = [
        format!("--gpu-architecture=sm_{arch}"),
        "-std=c++17".to_string(),
    ]
    .into_iter()
    .map(|o| CString::new(o).expect("options hold no NUL"))
    .collect();
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let check = |code: c_int, what: &str| {
        if code == 0 {
            Ok(())
        } else {
            // SAFETY: NVRTC returns a static string for any code.
            let text = unsafe { CStr::from_ptr((api.error)(code)) };
            Err(format!("NVRTC {what}: {}", text.to_string_lossy()))
        }
    };
    let mut program: Program = std::ptr::null_mut();
    // SAFETY: valid C strings and a program handle NVRTC fills in; no headers.
    check(
        unsafe {
            (api.create)(
                &mut program,
                src.as_ptr(),
                c"kernels.cu".as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        },
        "create",
    )?;
    // SAFETY: `program` is live until destroyed below; buffers are sized as NVRTC says.
    let result = unsafe {
        let compiled = (api.compile)(program, option_ptrs.len() as c_int, option_ptrs.as_ptr());
        let mut log_len = 0usize;
        (api.log_size)(program, &mut log_len);
        let mut log = vec![0u8; log_len.max(1)];
        (api.log)(program, log.as_mut_ptr().cast());
        let log = String::from_utf8_lossy(&log[..log_len.saturating_sub(1)]).into_owned();
        check(compiled, "compile")
            .map_err(|e| format!("{e}\n{log}"))
            .and_then(|_| {
                let mut len = 0usize;
                check((api.cubin_size)(program, &mut len), "cubin size")?;
                let mut cubin = vec![0u8; len];
                check((api.cubin)(program, cubin.as_mut_ptr().cast()), "cubin")?;
                Ok(cubin)
            })
    };
    // SAFETY: destroyed once.
    unsafe { (api.destroy)(&mut program) };
    result
}

type CuResult = c_int;

struct Driver {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    retain_primary: unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult,
    set_current: unsafe extern "C" fn(*mut c_void) -> CuResult,
    load: unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult,
    function: unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    launch: unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    error: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

// SAFETY: function pointers into a library that stays loaded.
unsafe impl Send for Driver {}
unsafe impl Sync for Driver {}

fn driver() -> Result<&'static Driver, String> {
    static API: OnceLock<Result<Driver, String>> = OnceLock::new();
    API.get_or_init(|| {
        let h = open(&[c"libcuda.so.1".to_owned()])?;
        // SAFETY: the CUDA driver API's documented signatures.
        let api = unsafe {
            Driver {
                init: symbol(h, c"cuInit")?,
                device_get: symbol(h, c"cuDeviceGet")?,
                attribute: symbol(h, c"cuDeviceGetAttribute")?,
                retain_primary: symbol(h, c"cuDevicePrimaryCtxRetain")?,
                set_current: symbol(h, c"cuCtxSetCurrent")?,
                load: symbol(h, c"cuModuleLoadData")?,
                function: symbol(h, c"cuModuleGetFunction")?,
                launch: symbol(h, c"cuLaunchKernel")?,
                error: symbol(h, c"cuGetErrorString")?,
            }
        };
        // SAFETY: cuInit takes flags 0.
        api.check(unsafe { (api.init)(0) }, "init")?;
        Ok(api)
    })
    .as_ref()
    .map_err(|e| format!("CUDA driver: {e}"))
}

impl Driver {
    fn check(&self, code: CuResult, what: &str) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        let mut text: *const c_char = std::ptr::null();
        // SAFETY: the driver points `text` at a static string, or leaves it null.
        unsafe { (self.error)(code, &mut text) };
        let text = if text.is_null() {
            format!("error {code}")
        } else {
            // SAFETY: non-null, NUL-terminated.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(format!("CUDA {what}: {text}"))
    }

    /// Makes `device`'s primary context (the one libtorch uses) current on this thread.
    fn enter(&self, device: usize) -> Result<c_int, String> {
        let mut dev = 0;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: out-parameters of the driver API.
        unsafe {
            self.check((self.device_get)(&mut dev, device as c_int), "device")?;
            self.check((self.retain_primary)(&mut ctx, dev), "context")?;
            self.check((self.set_current)(ctx), "context")?;
        }
        Ok(dev)
    }
}

/// The compute capability of CUDA device `device` as one number (90 for 9.0).
pub fn compute_capability(device: usize) -> Result<u32, String> {
    let api = driver()?;
    let dev = api.enter(device)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR are 75 / 76.
    unsafe {
        api.check((api.attribute)(&mut major, 75, dev), "attribute")?;
        api.check((api.attribute)(&mut minor, 76, dev), "attribute")?;
    }
    Ok((major * 10 + minor) as u32)
}

/// A kernel of a loaded module (modules stay loaded for the life of the process).
#[derive(Clone, Copy)]
pub struct Function(*mut c_void);

// SAFETY: CUDA functions are usable from any thread of the process.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// Loads `cubin` into `device`'s primary context and finds the kernels `names`.
pub fn load(device: usize, cubin: &[u8], names: &[&str]) -> Result<Vec<Function>, String> {
    let api = driver()?;
    api.enter(device)?;
    let mut module = std::ptr::null_mut();
    // SAFETY: a cubin image the driver copies.
    api.check(
        unsafe { (api.load)(&mut module, cubin.as_ptr().cast()) },
        "module load",
    )?;
    names
        .iter()
        .map(|name| {
            let c = CString::new(*name).expect("kernel names hold no NUL");
            let mut f = std::ptr::null_mut();
            // SAFETY: a loaded module and a valid name.
            api.check(unsafe { (api.function)(&mut f, module, c.as_ptr()) }, name)?;
            Ok(Function(f))
        })
        .collect()
}

/// One kernel argument, passed by value.
#[derive(Clone, Copy)]
pub enum Arg {
    Ptr(*mut c_void),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Function {
    /// Enqueues the kernel on `stream` over `grid` blocks of `block` threads.
    ///
    /// # Safety
    /// `stream` must be a live stream of the module's context, and `args` the kernel's
    /// parameters, with pointers to device memory as large as the kernel reaches.
    pub unsafe fn launch(
        &self,
        stream: *mut c_void,
        grid: u32,
        block: u32,
        args: &[Arg],
    ) -> Result<(), String> {
        let api = driver()?;
        let mut values = args.to_vec();
        let mut pointers: Vec<*mut c_void> = values
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(p) => p as *mut *mut c_void as *mut c_void,
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::I64(v) => v as *mut i64 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
            })
            .collect();
        // SAFETY: `pointers` address argument values that live until the call returns
        // (the driver copies them); the rest is the caller's promise.
        api.check(
            unsafe {
                (api.launch)(
                    self.0,
                    grid,
                    1,
                    1,
                    block,
                    1,
                    1,
                    0,
                    stream,
                    pointers.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "launch",
        )
    }
}
