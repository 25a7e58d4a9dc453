//! Running kernel source on the host: g++ builds `source` (the kernels after
//! `topk_emulation/emu.h`, which emulates threads, warps and barriers with std::thread)
//! and the program's standard output comes back.

use std::path::PathBuf;
use std::process::Command;

/// The emulation header shared by the host runs.
pub fn emulation_header() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/topk_emulation/emu.h");
    std::fs::read_to_string(path).expect("tests/topk_emulation/emu.h is readable")
}

/// A file of `tests/` as text.
pub fn test_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The part of `src` from the first `from` up to the next `to` after it (each must be
/// there: the test names what it extracts).
#[allow(dead_code)] // each test binary compiles this module; not all of them extract
pub fn source_between<'a>(src: &'a str, from: &str, to: &str) -> &'a str {
    let start = src
        .find(from)
        .unwrap_or_else(|| panic!("the source has {from:?}"));
    let end = src[start..]
        .find(to)
        .map(|e| start + e)
        .unwrap_or_else(|| panic!("{from:?} is followed by {to:?}"));
    &src[start..end]
}

/// Builds `source` as `name` with g++ and runs it with `args`: its standard output, after
/// asserting that it built and exited with status 0 (g++ must be installed: the test
/// fails, not skips, without it).
pub fn build_and_run(name: &str, source: &str, args: &[&str]) -> String {
    assert!(
        Command::new("g++").arg("--version").output().is_ok(),
        "g++ is needed to run the kernel source on the host"
    );
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let cpp = tmp.join(format!("{name}.cpp"));
    let exe = tmp.join(name);
    std::fs::write(&cpp, source).expect("the emulation source can be written");
    let built = Command::new("g++")
        .args([
            "-std=c++17",
            "-O1",
            "-pthread",
            "-Wno-unknown-pragmas",
            "-o",
        ])
        .arg(&exe)
        .arg(&cpp)
        .output()
        .expect("g++ runs");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe)
        .args(args)
        .output()
        .expect("the emulation runs");
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{text}");
    text
}
