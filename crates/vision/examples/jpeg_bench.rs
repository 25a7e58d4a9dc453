//! Time JPEG decoding (`decode_bytes`, the path the server uses) and check it
//! against Pillow's output first.
//!
//! ```text
//! python3 crates/vision/examples/jpeg_bench_images.py /tmp/jpegbench
//! cargo run --release -p aperture-vision --example jpeg_bench -- /tmp/jpegbench [N]
//! ```
//!
//! For every `NAME.jpg` in the folder (with `NAME.rgb`, Pillow's RGB bytes, next
//! to it when present) it decodes once and refuses to time an output that
//! differs from Pillow's, then decodes N times (default 50) and prints the median
//! milliseconds per image, the fastest decode (steadier than the median on a
//! busy machine), megapixels/s and compressed MB/s.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use aperture_vision::{decode_bytes, DecodeLimits};

fn bench(path: &Path, n: usize) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let limits = DecodeLimits::default();
    let img = decode_bytes(&bytes, &limits)
        .map_err(|e| e.to_string())?
        .into_rgb8();
    let reference = path.with_extension("rgb");
    if let Ok(want) = std::fs::read(&reference) {
        if img.as_raw() != &want {
            return Err(format!("{}: output differs from Pillow's", path.display()));
        }
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let img = decode_bytes(&bytes, &limits).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(img);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mpx = f64::from(img.width()) * f64::from(img.height()) / 1e6;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Ok(format!(
        "{name:<34} {:>6} KB {:>8.3} ms {:>8.3} ms {:>7.1} Mpx/s {:>6.1} MB/s",
        bytes.len() / 1024,
        median * 1e3,
        times[0] * 1e3,
        mpx / median,
        bytes.len() as f64 / 1e6 / median,
    ))
}

fn run(args: &[String]) -> Result<(), String> {
    let (dir, n) = match args {
        [dir] => (dir, 50),
        [dir, n] => (dir, n.parse().map_err(|e| format!("bad count '{n}': {e}"))?),
        _ => return Err("usage: jpeg_bench DIR [N]".into()),
    };
    let n = usize::max(n, 1);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no .jpg files in {dir}"));
    }
    println!("{n} decodes each: median, min, Mpx/s and MB/s at the median");
    for f in &files {
        println!("{}", bench(f, n)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jpeg_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
