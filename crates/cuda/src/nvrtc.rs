//! Kernel compilation with NVRTC for the device's architecture, cached on disk.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::error::{CudaError, CudaResult};

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher is not stable across
/// releases).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `$XDG_CACHE_HOME/aperture`, else `~/.cache/aperture`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("aperture"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("aperture"))
}

/// File name of the cached binary for a source, its options and the compiler version.
pub fn cache_file_name(source: &str, options: &[String], nvrtc_version: (i32, i32)) -> String {
    let opts = options.join("\u{1}");
    let ver = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    let key = fnv1a64(&[source.as_bytes(), opts.as_bytes(), ver.as_bytes()]);
    format!("kernels-{key:016x}.cubin")
}

pub fn nvrtc_version() -> CudaResult<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Unavailable(format!("NVRTC does not answer: {e:?}")))?;
    Ok((major, minor))
}

/// Include folders for cuda_fp16.h / cuda_bf16.h where NVRTC does not bring them.
fn include_options() -> Vec<String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs.into_iter()
        .filter(|d| d.join("cuda_fp16.h").exists())
        .map(|d| format!("-I{}", d.display()))
        .collect()
}

fn compile(source: &str, options: &[String], arch: &str) -> CudaResult<Vec<u8>> {
    let src = CString::new(source).map_err(|_| CudaError::Compile {
        arch: arch.into(),
        log: "source holds a NUL byte".into(),
    })?;
    let prog = result::create_program(&src, None).map_err(|e| CudaError::Compile {
        arch: arch.into(),
        log: format!("{e:?}"),
    })?;
    // SAFETY: `prog` is a live program until destroyed at the end of this block.
    unsafe {
        let compiled = result::compile_program(prog, options);
        let out = match compiled {
            Ok(()) => {
                let mut size = 0usize;
                let r = sys::nvrtcGetCUBINSize(prog, &mut size).result();
                let mut buf = vec![0u8; size];
                r.and_then(|_| sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _).result())
                    .map(|_| buf)
                    .map_err(|e| CudaError::Compile {
                        arch: arch.into(),
                        log: format!("no CUBIN: {e:?}"),
                    })
            }
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        String::from_utf8_lossy(&l.iter().map(|&c| c as u8).collect::<Vec<u8>>())
                            .into_owned()
                    })
                    .unwrap_or_default();
                Err(CudaError::Compile {
                    arch: arch.into(),
                    log: format!("{e:?}\n{log}"),
                })
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Compiles `source` to a CUBIN for `sm_{major}{minor}`, or reads it from the cache.
/// Returns the binary and whether it came from the cache.
pub fn compile_cached(source: &str, capability: (i32, i32)) -> CudaResult<(Vec<u8>, bool)> {
    compile_for(source, &format!("sm_{}{}", capability.0, capability.1))
}

/// [`compile_cached`] for the architecture-specific target `sm_{major}{minor}a` (Hopper's
/// `wgmma` and `setmaxnreg` exist only there; the binary runs on exactly that
/// architecture).
pub fn compile_cached_specific(
    source: &str,
    capability: (i32, i32),
) -> CudaResult<(Vec<u8>, bool)> {
    compile_for(source, &format!("sm_{}{}a", capability.0, capability.1))
}

fn compile_for(source: &str, arch: &str) -> CudaResult<(Vec<u8>, bool)> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    options.extend(include_options());
    let version = nvrtc_version()?;
    let path = cache_dir().map(|d| d.join(cache_file_name(source, &options, version)));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok((bytes, true));
            }
        }
    }
    announce_first_compile(arch, path.as_deref());
    let started = std::time::Instant::now();
    let cubin = compile(source, &options, arch)?;
    tracing::info!(
        "compiled {} kernel bytes for {arch} in {:.1} s",
        source.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(p) = &path {
        // A cache that cannot be written only costs a recompilation next time.
        if let Err(e) = write_atomic(p, &cubin) {
            eprintln!("warning: could not cache kernels in {}: {e}", p.display());
        }
    }
    Ok((cubin, false))
}

/// One line on stderr at the first compilation of a process: a start without a kernel
/// cache spends a minute or more in NVRTC (the Hopper convolution module alone takes
/// ~80 s on one core), which otherwise looks like a hang.
fn announce_first_compile(arch: &str, cached_at: Option<&Path>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cache = match cached_at.and_then(Path::parent) {
            Some(dir) => format!("cached in {} for later starts", dir.display()),
            None => "no cache folder (set XDG_CACHE_HOME or HOME)".to_string(),
        };
        eprintln!(
            "note: compiling GPU kernels for {arch} ({cache}); the first start of a build can take a minute or two"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_parts_and_is_stable() {
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        // FNV-1a of the empty input is the offset basis, mixed with one separator.
        let want = (0xcbf2_9ce4_8422_2325u64 ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
        assert_eq!(fnv1a64(&[b""]), want);
    }

    #[test]
    fn cache_key_depends_on_source_options_and_version() {
        let o = vec!["--gpu-architecture=sm_90".to_string()];
        let base = cache_file_name("src", &o, (13, 0));
        assert_eq!(base, cache_file_name("src", &o, (13, 0)));
        assert_ne!(base, cache_file_name("src2", &o, (13, 0)));
        assert_ne!(
            base,
            cache_file_name("src", &["--gpu-architecture=sm_80".to_string()], (13, 0))
        );
        assert_ne!(base, cache_file_name("src", &o, (13, 1)));
        assert!(base.starts_with("kernels-") && base.ends_with(".cubin"));
    }

    #[test]
    fn cache_dir_prefers_xdg() {
        // Only reads the environment; both branches give a folder named "aperture".
        if let Some(d) = cache_dir() {
            assert_eq!(d.file_name().and_then(|f| f.to_str()), Some("aperture"));
        }
    }
}
