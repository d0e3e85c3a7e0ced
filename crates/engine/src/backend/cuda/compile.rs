//! Run-time compilation of the kernels in `kernels/*.cu` with NVRTC, for the device's own architecture
//! (`sm_90` on an H200), to CUBIN, with an on-disk cache keyed by source, options, architecture and NVRTC
//! version. Nothing here needs a GPU: only the NVRTC library (`libnvrtc.so`).

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{EngineError, Result};
use crate::weights::DType;

/// The prelude prepended to every module (storage type, conversions, loads, reductions).
const COMMON: &str = include_str!("../../../../../kernels/common.cuh");

/// A kernel source file.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// Module name (for logs and cache file names).
    pub name: &'static str,
    /// The `.cu` text.
    pub text: &'static str,
}

/// Every kernel module of the backend.
pub const SOURCES: [Source; 6] = [
    Source {
        name: "elementwise",
        text: include_str!("../../../../../kernels/elementwise.cu"),
    },
    Source {
        name: "attention",
        text: include_str!("../../../../../kernels/attention.cu"),
    },
    Source {
        name: "gemv",
        text: include_str!("../../../../../kernels/gemv.cu"),
    },
    Source {
        name: "lora",
        text: include_str!("../../../../../kernels/lora.cu"),
    },
    Source {
        name: "prefill",
        text: include_str!("../../../../../kernels/prefill.cu"),
    },
    Source {
        name: "sampling",
        text: include_str!("../../../../../kernels/sampling.cu"),
    },
];

/// A Hopper module: kernels/wgmma.cuh (the wgmma helpers) followed by kernels/`name`.cu.
macro_rules! hopper_source {
    ($name:literal) => {
        Source {
            name: $name,
            text: concat!(
                "#line 1 \"wgmma.cuh\"\n",
                include_str!("../../../../../kernels/wgmma.cuh"),
                "#line 1 \"",
                $name,
                ".cu\"\n",
                include_str!(concat!("../../../../../kernels/", $name, ".cu"))
            ),
        }
    };
}

/// Modules for Hopper's arch-specific instructions (wgmma): compiled with [`Compiler::arch_specific`]
/// (`sm_90a`) for 16-bit storage on compute capability 9.0 only.
pub const HOPPER_SOURCES: [Source; 3] = [
    hopper_source!("skinny"),
    hopper_source!("prefill_sm90"),
    hopper_source!("gemm_sm90"),
];

/// Whether the NVRTC library can be loaded (cudarc panics on first use when it cannot).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library with libloading; no symbol is called.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(EngineError::Backend(
            "the NVRTC library (libnvrtc.so) cannot be loaded: add the CUDA toolkit's lib64 to LD_LIBRARY_PATH".into(),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { nvrtc_sys::nvrtcVersion(&raw mut major, &raw mut minor) }
        .result()
        .map_err(|e| EngineError::Backend(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The CUDA include directory passed to NVRTC: `LORAX_CUDA_INCLUDE`, else `/usr/local/cuda/include`, else
/// `$CUDA_HOME/include` or `$CUDA_PATH/include`; `None` when none exists (the kernels include no CUDA
/// header, so they compile without it).
pub fn include_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LORAX_CUDA_INCLUDE") {
        return Some(PathBuf::from(dir));
    }
    let mut candidates = vec![PathBuf::from("/usr/local/cuda/include")];
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            candidates.push(Path::new(&root).join("include"));
        }
    }
    candidates.into_iter().find(|d| d.is_dir())
}

/// Where compiled modules are kept: `LORAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/lorax/kernels`, else
/// `$HOME/.cache/lorax/kernels`. An empty `LORAX_KERNEL_CACHE` disables the cache.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LORAX_KERNEL_CACHE") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(Path::new(&x).join("lorax/kernels"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/lorax/kernels"))
}

/// The preprocessor define selecting a module's storage type.
pub fn dtype_define(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "-DLORAX_DTYPE_BF16",
        DType::F16 => "-DLORAX_DTYPE_F16",
        DType::F32 => "-DLORAX_DTYPE_F32",
    }
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A compiled module: its CUBIN and NVRTC's log (resource usage with `verbose`).
#[derive(Debug)]
pub struct Compiled {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (empty when read from the cache).
    pub log: String,
    /// Whether it came from the disk cache.
    pub cached: bool,
}

/// Compiles kernel modules for one architecture and storage type.
#[derive(Clone, Debug)]
pub struct Compiler {
    /// `sm_90` and the like.
    pub arch: String,
    /// Storage type of the modules.
    pub dtype: DType,
    /// Ask ptxas for its resource report (registers, spills) in the log.
    pub verbose: bool,
    include: Option<PathBuf>,
    cache: Option<PathBuf>,
    version: (i32, i32),
}

impl Compiler {
    /// A compiler for compute capability `(major, minor)`.
    pub fn new(cc: (i32, i32), dtype: DType) -> Result<Self> {
        Ok(Self {
            arch: format!("sm_{}{}", cc.0, cc.1),
            dtype,
            verbose: false,
            include: include_dir(),
            cache: cache_dir(),
            version: nvrtc_version()?,
        })
    }

    /// This compiler for the architecture-specific target (`sm_90a` for `sm_90`), which
    /// [`HOPPER_SOURCES`] need; a module built for it runs on that architecture only.
    #[must_use]
    pub fn arch_specific(&self) -> Self {
        let mut c = self.clone();
        if !c.arch.ends_with('a') {
            c.arch.push('a');
        }
        c
    }

    /// Uses `dir` as the cache (`None`: no cache).
    #[must_use]
    pub fn with_cache(mut self, dir: Option<PathBuf>) -> Self {
        self.cache = dir;
        self
    }

    fn options(&self) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={}", self.arch),
            "--std=c++17".to_string(),
            dtype_define(self.dtype).to_string(),
        ];
        if let Some(dir) = &self.include {
            o.push(format!("--include-path={}", dir.display()));
        }
        if self.verbose {
            o.push("--ptxas-options=-v".to_string());
        }
        // Extra preprocessor defines for experiments (say `-DATTN_TC_MINB=4`), part of the cache key.
        if let Ok(defines) = std::env::var("LORAX_CUDA_DEFINES") {
            o.extend(
                defines
                    .split_whitespace()
                    .filter(|d| d.starts_with("-D"))
                    .map(str::to_string),
            );
        }
        o
    }

    /// The full text NVRTC compiles for `src`.
    pub fn full_source(src: &Source) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", src.name, src.text)
    }

    /// Compiles `src` (or reads it from the cache).
    pub fn compile(&self, src: &Source) -> Result<Compiled> {
        let text = Self::full_source(src);
        let options = self.options();
        let version = format!("nvrtc {}.{}", self.version.0, self.version.1);
        let mut parts: Vec<&[u8]> = vec![text.as_bytes(), self.arch.as_bytes(), version.as_bytes()];
        parts.extend(options.iter().map(String::as_bytes));
        let key = fnv1a(&parts);
        let file = self
            .cache
            .as_ref()
            .map(|d| d.join(format!("{}-{}-{key:016x}.cubin", src.name, self.arch)));
        if let Some(f) = &file {
            if let Ok(cubin) = std::fs::read(f) {
                if !cubin.is_empty() {
                    return Ok(Compiled {
                        cubin,
                        log: String::new(),
                        cached: true,
                    });
                }
            }
        }
        let (cubin, log) = compile_cubin(src.name, &text, &options)?;
        if let Some(f) = &file {
            if let Err(e) = write_atomically(f, &cubin) {
                tracing::warn!(file = %f.display(), error = %e, "cannot write the kernel cache");
            }
        }
        Ok(Compiled {
            cubin,
            log,
            cached: false,
        })
    }
}

fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

fn log_text(raw: &[c_char]) -> String {
    // SAFETY: c_char and u8 have the same size; NVRTC's log is NUL-terminated text.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len()) };
    CStr::from_bytes_until_nul(bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned())
}

/// One NVRTC compilation to CUBIN; the program is destroyed on every path.
fn compile_cubin(name: &str, text: &str, options: &[String]) -> Result<(Vec<u8>, String)> {
    let err = |what: &str, e: nvrtc::NvrtcError| EngineError::Backend(format!("NVRTC {what} ({name}.cu): {e:?}"));
    let src = CString::new(text).map_err(|_| EngineError::Backend(format!("{name}.cu contains a NUL byte")))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| EngineError::Backend("bad module name".into()))?;
    let prog = nvrtc::create_program(&src, Some(&cname)).map_err(|e| err("create", e))?;
    struct Guard(nvrtc_sys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: created by create_program above and destroyed only here.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let guard = Guard(prog);
    // SAFETY: `prog` is a live program; options are plain strings.
    let compiled = unsafe { nvrtc::compile_program(guard.0, options) };
    // SAFETY: as above.
    let log = unsafe { nvrtc::get_program_log(guard.0) }
        .map(|raw| log_text(&raw))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(EngineError::Backend(format!(
            "NVRTC could not compile {name}.cu ({e:?}) with {options:?}:\n{log}"
        )));
    }
    let mut size = 0usize;
    // SAFETY: live program, valid out-pointer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(guard.0, &raw mut size) }
        .result()
        .map_err(|e| err("cubin size", e))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes, as NVRTC asked.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(guard.0, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| err("cubin", e))?;
    Ok((cubin, log))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_are_stable_and_separate_parts() {
        assert_eq!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"ab", b"c"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn every_module_has_the_prelude_and_a_line_marker() {
        for s in SOURCES.iter().chain(&HOPPER_SOURCES) {
            let full = Compiler::full_source(s);
            assert!(full.starts_with("// Shared prelude"));
            assert!(full.contains(&format!("#line 1 \"{}.cu\"", s.name)));
        }
    }

    /// The text from the `{` at or after `from` to its matching `}` (exclusive), or None when unbalanced.
    fn body_at(text: &str, from: usize) -> Option<&str> {
        let open = from + text[from..].find('{')?;
        let mut depth = 0usize;
        for (i, ch) in text[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(&text[open + 1..open + i]);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Offset of the first `pdl_enter()`/`pdl_wait()` in `code`.
    fn wait_in(code: &str) -> Option<usize> {
        ["pdl_enter()", "pdl_wait()"].iter().filter_map(|w| code.find(w)).min()
    }

    /// The identifier that ends at `at` in `code`.
    fn ident_before(code: &str, at: usize) -> &str {
        let start = code[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        &code[start..at]
    }

    /// Checks that `body` waits for the kernels ahead before any `return`: itself, or in the first device
    /// function of `text` it calls that waits (one level down). Returns what failed.
    fn check_waits(text: &str, body: &str) -> std::result::Result<(), String> {
        let ordered = |code: &str, wait: usize| match code.find("return") {
            Some(ret) if ret < wait => Err("may return before pdl_wait".to_string()),
            _ => Ok(()),
        };
        if let Some(wait) = wait_in(body) {
            return ordered(body, wait);
        }
        for (at, _) in body.match_indices(['(', '<']) {
            let name = ident_before(body, at);
            if name.is_empty() {
                continue;
            }
            let callee = text.find(&format!("void {name}(")).and_then(|d| body_at(text, d));
            if let Some((callee, wait)) = callee.and_then(|c| wait_in(c).map(|w| (c, w))) {
                ordered(&body[..at], usize::MAX)?;
                return ordered(callee, wait).map_err(|e| format!("{name} {e}"));
            }
        }
        Err("never calls pdl_wait".into())
    }

    /// A kernel is launched by name from the module's list in `KERNELS` (mod.rs), loaded at start-up: one
    /// written in a `.cu` file but left out of the list fails only when first launched, on a GPU. Every
    /// kernel whose name is written out (not made by a macro's `NAME`) must be listed for its module.
    #[test]
    fn every_named_kernel_is_loaded() {
        let mut named = 0;
        for s in SOURCES.iter().chain(&HOPPER_SOURCES) {
            let (_, list) = super::super::KERNELS
                .iter()
                .find(|(m, _)| *m == s.name)
                .unwrap_or_else(|| panic!("module {} has no kernel list", s.name));
            for (at, _) in s.text.match_indices("extern \"C\" __global__") {
                let mut rest = s.text[at + "extern \"C\" __global__".len()..].trim_start();
                rest = rest.strip_prefix("void").unwrap_or(rest).trim_start();
                loop {
                    if let Some(r) = ["__cluster_dims__(", "__launch_bounds__("]
                        .iter()
                        .find_map(|attr| rest.strip_prefix(attr))
                    {
                        rest = r.split_once(')').map_or(r, |(_, after)| after).trim_start();
                        continue;
                    }
                    // A macro for attributes (an upper-case name and a space: `GM_CLUSTER_DIMS`).
                    let word = rest
                        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                        .unwrap_or(rest.len());
                    if word > 0 && rest[word..].starts_with(' ') {
                        rest = rest[word..].trim_start();
                        continue;
                    }
                    break;
                }
                rest = rest.trim_start_matches(['\\', ' ', '\n']);
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.is_empty() || name == "NAME" || !rest[name.len()..].starts_with('(') {
                    continue;
                }
                named += 1;
                assert!(
                    list.contains(&name.as_str()),
                    "{}.cu: kernel `{name}` is not in KERNELS",
                    s.name
                );
            }
        }
        assert!(named >= 20, "found only {named} named kernels: the scan is broken");
    }

    /// Kernels are launched with programmatic dependent launch (mod.rs `launch_pdl`): one that touched the
    /// previous kernel's output before `pdl_wait()` would race with it. Every kernel entry point must wait,
    /// directly or in the device function it calls, before any early return.
    #[test]
    fn every_kernel_waits_for_its_predecessor() {
        let mut kernels = 0;
        for s in SOURCES.iter().chain(&HOPPER_SOURCES) {
            for (at, _) in s.text.match_indices("extern \"C\" __global__") {
                let body = body_at(s.text, at).unwrap_or_else(|| panic!("{}.cu: unbalanced kernel at {at}", s.name));
                if body.chars().all(|c| c.is_whitespace() || c == '\\') {
                    continue; // a stub for a storage type the kernel does not support; never launched
                }
                kernels += 1;
                let head = s.text[at..].split('(').next().unwrap_or_default();
                if let Err(e) = check_waits(s.text, body) {
                    panic!("{}.cu: `{head}` {e}", s.name);
                }
            }
        }
        assert!(kernels >= 20, "found only {kernels} kernels: the scan is broken");
    }
}
