//! `aperture info`: architecture, parameters and the roofline numbers of a model.

use std::path::PathBuf;

use anyhow::{bail, Context};
use aperture_engine::Precision;
use aperture_models::restormer::{forward_cost, load_restormer, parameter_count, RestormerConfig};
use aperture_models::{detect_architecture, Architecture};
use clap::Args;

#[derive(Args)]
pub struct InfoArgs {
    /// Weights file or model folder. Without it, the published Restormer base config.
    model: Option<PathBuf>,
    /// Input height and width (e.g. 512 or 520x776).
    #[arg(long, default_value = "512")]
    size: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Storage precision for the byte counts.
    #[arg(long, default_value = "fp16")]
    precision: Precision,
    /// Dense matrix throughput for the compute floor, TFLOP/s (H100 SXM bf16/fp16 measured ~800).
    #[arg(long, default_value_t = 800.0)]
    peak_tflops: f64,
    /// Memory bandwidth for the memory floor, GB/s (H100 SXM device copy measured ~3000).
    #[arg(long, default_value_t = 3000.0)]
    bandwidth_gbs: f64,
}

/// Parses "512" or "520x776" into (height, width).
pub fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .with_context(|| format!("invalid size '{s}' (use 512 or HxW)"))
    };
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (parse(h)?, parse(w)?),
        None => (parse(s)?, parse(s)?),
    };
    if h == 0 || w == 0 {
        bail!("size must be positive, got '{s}'");
    }
    Ok((h, w))
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let (h, w) = parse_size(&args.size)?;
    let config = match &args.model {
        None => RestormerConfig::default(),
        Some(path) => match detect_architecture(path)? {
            Architecture::Restormer => load_restormer(path)?.0,
            other => bail!(
                "'aperture info' does not describe {} models yet",
                other.name()
            ),
        },
    };
    // The network works on sizes padded to a multiple of 8.
    let (ph, pw) = (h.div_ceil(8) * 8, w.div_ceil(8) * 8);
    let elem = match args.precision {
        Precision::Fp32 | Precision::Tf32 => 4,
        Precision::Fp16 | Precision::Bf16 => 2,
    };
    let cost = forward_cost(&config, args.batch, ph, pw, elem)?;
    let params = parameter_count(&config);
    let flop = 2.0 * cost.total.macs as f64;
    let min_bytes = (cost.weight_bytes + cost.io_bytes) as f64;
    let plan_bytes = (cost.total.bytes + cost.total.weight_bytes) as f64;
    let ms = |secs: f64| secs * 1e3;
    println!("architecture   Restormer");
    println!(
        "config         dim {}, blocks {:?}, refinement {}, heads {:?}, ffn {}, bias {}, LayerNorm {:?}",
        config.dim,
        config.num_blocks,
        config.num_refinement_blocks,
        config.heads,
        config.ffn_expansion_factor,
        config.bias,
        config.layer_norm_type
    );
    println!(
        "parameters     {} ({:.1} MiB at {})",
        group(params as u64),
        (params * elem as usize) as f64 / 1048576.0,
        args.precision
    );
    println!(
        "input          {}x{}x{}x{} (padded to {ph}x{pw})",
        args.batch, config.inp_channels, h, w
    );
    println!(
        "compute        {:.1} GMAC = {:.3} TFLOP",
        cost.total.macs as f64 / 1e9,
        flop / 1e12
    );
    println!(
        "min bytes      {:.1} MB (weights + input + output, {} each once)",
        min_bytes / 1e6,
        args.precision
    );
    println!(
        "op traffic     {:.2} GB (every operation reads its inputs and writes its output once)",
        plan_bytes / 1e9
    );
    println!(
        "floors         compute {:.3} ms at {} TFLOP/s; memory {:.3} ms (min bytes), {:.3} ms (op traffic) at {} GB/s",
        ms(flop / (args.peak_tflops * 1e12)),
        args.peak_tflops,
        ms(min_bytes / (args.bandwidth_gbs * 1e9)),
        ms(plan_bytes / (args.bandwidth_gbs * 1e9)),
        args.bandwidth_gbs
    );
    println!();
    println!(
        "{:<18} {:>6} {:>10} {:>10} {:>8}",
        "operation", "calls", "GMAC", "GB", "AI"
    );
    for (op, c) in &cost.per_op {
        let gb = (c.bytes + c.weight_bytes) as f64 / 1e9;
        let ai = if gb > 0.0 {
            2.0 * c.macs as f64 / (gb * 1e9)
        } else {
            0.0
        };
        println!(
            "{op:<18} {:>6} {:>10.2} {:>10.3} {:>8.1}",
            c.calls,
            c.macs as f64 / 1e9,
            gb,
            ai
        );
    }
    println!("(AI: arithmetic intensity, FLOP per byte)");
    Ok(())
}

/// 26126644 -> "26,126,644".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512").unwrap(), (512, 512));
        assert_eq!(parse_size("520x776").unwrap(), (520, 776));
        assert!(parse_size("0").is_err());
        assert!(parse_size("abc").is_err());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(26126644), "26,126,644");
        assert_eq!(group(999), "999");
    }
}
