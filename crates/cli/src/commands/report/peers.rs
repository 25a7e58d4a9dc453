//! The PyTorch peers through tools/torch_peers.py, when torch with CUDA is importable:
//! same weights folder, same input size; their rows join the report's.

use std::path::Path;
use std::process::Command;

use super::doc::Report;
use super::sweep::Plan;

const SCRIPT: &str = "tools/torch_peers.py";

fn torch_with_cuda() -> bool {
    Command::new("python3")
        .args([
            "-c",
            "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn list(b: &[usize]) -> String {
    b.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// Adds the peers' rows, or a note saying why there are none.
pub fn restormer(weights: &Path, size: usize, plan: &Plan, report: &mut Report) {
    if !Path::new(SCRIPT).is_file() {
        report.notes.push(format!(
            "PyTorch peers: {SCRIPT} not found (run from the repository root)."
        ));
        return;
    }
    if !torch_with_cuda() {
        report
            .notes
            .push("PyTorch peers: `import torch` with CUDA failed here; no peer rows.".into());
        return;
    }
    if !weights.is_dir() {
        report
            .notes
            .push("PyTorch peers: need a weights folder (config.json + model.safetensors).".into());
        return;
    }
    plan.bar.set_message("PyTorch peers");
    let eager: Vec<usize> = plan.batches.iter().copied().filter(|b| *b <= 32).collect();
    // torch.compile costs ~40-90 s per batch size: batch 1 and the largest up to 8.
    let mut compile: Vec<usize> = eager.iter().copied().filter(|b| *b <= 8).collect();
    compile = [compile.first().copied(), compile.last().copied()]
        .into_iter()
        .flatten()
        .collect();
    compile.dedup();
    let out =
        std::env::temp_dir().join(format!("aperture-report-peers-{}.json", std::process::id()));
    let status = Command::new("python3")
        .arg(SCRIPT)
        .arg("bench")
        .arg("--weights")
        .arg(weights)
        .arg("--json")
        .arg(&out)
        .args([
            "--size",
            &size.to_string(),
            "--iters",
            &plan.iters.max(1).to_string(),
        ])
        .args(["--eager-fp32", &list(&eager), "--eager-fp16", &list(&eager)])
        .args(["--compile-fp16", &list(&compile)])
        .args(["--compile-default-fp16", &list(&compile)])
        .status();
    match status
        .map_err(anyhow::Error::from)
        .and_then(|_| Report::from_json_file(&out))
    {
        Ok(peers) => {
            report.rows.extend(peers.rows);
            report.notes.push(
                "PyTorch peers: tools/torch_peers.py (eager fp32, eager fp16, torch.compile fp16 in modes reduce-overhead and default).".into(),
            );
        }
        Err(e) => report.notes.push(format!("PyTorch peers failed: {e:#}")),
    }
    let _ = std::fs::remove_file(&out);
}
