//! Writes every kernel module's translation unit, as the CUDA backend compiles it, into a
//! folder (`main_f16.cu`, `conv_bf16.cu`, ...), for `tools/kernel_ptx.py` to compile and
//! compare without a GPU:
//!
//!     cargo run -p aperture-cuda --example kernel_sources -- DIR

use aperture_cuda::kernels::{module_sources, Storage};

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: kernel_sources DIR");
        std::process::exit(2);
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    for (storage, name) in [
        (Storage::F32, "f32"),
        (Storage::F16, "f16"),
        (Storage::BF16, "bf16"),
    ] {
        for (module, source) in module_sources(storage) {
            let path = dir.join(format!("{module}_{name}.cu"));
            std::fs::write(&path, source)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
