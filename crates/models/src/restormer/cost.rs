//! Roofline numbers for a Restormer: the forward pass followed on the shape-only
//! [`TraceBackend`], counting multiply-accumulates and bytes per operation.

use std::collections::BTreeMap;

use aperture_engine::trace::{OpCost, TraceBackend};
use aperture_engine::{Backend, HostTensor};
use aperture_weights::StateDict;

use super::config::RestormerConfig;
use super::model::Restormer;
use super::params::parameter_shapes;
use crate::error::Result;

/// Costs of one forward pass over a `batch x C x height x width` input.
pub struct RestormerCost {
    pub per_op: BTreeMap<&'static str, OpCost>,
    pub total: OpCost,
    /// Bytes of all weights at the given element size.
    pub weight_bytes: u64,
    /// Bytes of the input and output images.
    pub io_bytes: u64,
}

pub fn forward_cost(
    cfg: &RestormerConfig,
    batch: usize,
    height: usize,
    width: usize,
    elem_bytes: u64,
) -> Result<RestormerCost> {
    let tensors = parameter_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| (name, HostTensor::zeros(shape)))
        .collect();
    let trace = TraceBackend::new(elem_bytes);
    let model = Restormer::prepare(&trace, cfg.clone(), &StateDict::from_tensors(tensors))?;
    let x = trace.upload_nchw(&HostTensor::zeros(vec![
        batch,
        cfg.inp_channels,
        height,
        width,
    ]))?;
    model.forward(&trace, &x)?;
    let weight_bytes = super::params::parameter_count(cfg) as u64 * elem_bytes;
    let io_bytes =
        (batch * height * width * (cfg.inp_channels + cfg.out_channels)) as u64 * elem_bytes;
    Ok(RestormerCost {
        per_op: trace.costs(),
        total: trace.total(),
        weight_bytes,
        io_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_model_is_620_gmac_at_512() {
        let cost = forward_cost(&RestormerConfig::default(), 1, 512, 512, 2).unwrap();
        let gmac = cost.total.macs as f64 / 1e9;
        assert!((gmac - 620.0).abs() < 5.0, "{gmac} GMAC");
    }
}
