//! The report header's facts about the machine and the run.

use std::process::Command;

/// The command as typed, with the binary shown as `aperture`.
pub fn command_line() -> String {
    let mut parts = vec!["aperture".to_string()];
    for a in std::env::args().skip(1) {
        if a.is_empty() || a.contains([' ', '"', '\'', '$', '*']) {
            parts.push(format!("'{}'", a.replace('\'', "'\\''")));
        } else {
            parts.push(a);
        }
    }
    parts.join(" ")
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The commit the binary was built from (recorded at build time: the binary may run
/// where the repository is not, or is at another commit).
pub fn git_commit() -> Option<String> {
    Some(env!("APERTURE_GIT_COMMIT").to_string()).filter(|c| !c.is_empty())
}

/// "model name" of /proc/cpuinfo and the number of threads.
pub fn cpu_model() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{name} ({threads} threads)")
}

/// Driver and CUDA versions as nvidia-smi reports them.
pub fn gpu_versions() -> Option<(String, String)> {
    let text = output("nvidia-smi", &[])?;
    let after = |key: &str| {
        text.split(key)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    Some((after("Driver Version:")?, after("CUDA Version:")?))
}
