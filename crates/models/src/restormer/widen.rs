//! Zero-padding the feed-forward hidden width (int(dim * 2.66): 127, 255, 510, 1021 in
//! the base model) up to a multiple the backend prefers. The extra channels carry
//! exact zeros: `gelu(0) * 0 = 0`, and `project_out` gives them zero weights, so the
//! output is unchanged while every row of the hidden activations stays aligned.

use aperture_engine::HostTensor;

use crate::error::Result;

/// `t` has `2 * hidden` entries along axis 0, the two gate halves `a | b`; returns
/// `2 * padded` entries laid out `a 0.. | b 0..`.
pub fn pad_gate_halves(t: &HostTensor, hidden: usize, padded: usize) -> Result<HostTensor> {
    let shape = t.shape();
    let inner: usize = shape[1..].iter().product();
    let src = t.to_f32_vec();
    let mut out = vec![0.0; 2 * padded * inner];
    for half in 0..2 {
        let from = &src[half * hidden * inner..(half + 1) * hidden * inner];
        out[half * padded * inner..][..hidden * inner].copy_from_slice(from);
    }
    let mut new_shape = shape.to_vec();
    new_shape[0] = 2 * padded;
    Ok(HostTensor::from_f32(new_shape, out)?)
}

/// `t` is `[out, hidden, kh, kw]`; returns `[out, padded, kh, kw]` with zero columns.
pub fn pad_input_channels(t: &HostTensor, hidden: usize, padded: usize) -> Result<HostTensor> {
    let shape = t.shape();
    let rows = shape[0];
    let k: usize = shape[2..].iter().product();
    let src = t.to_f32_vec();
    let mut out = vec![0.0; rows * padded * k];
    for r in 0..rows {
        out[r * padded * k..][..hidden * k].copy_from_slice(&src[r * hidden * k..][..hidden * k]);
    }
    let mut new_shape = shape.to_vec();
    new_shape[1] = padded;
    Ok(HostTensor::from_f32(new_shape, out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_keep_their_rows() {
        let t = HostTensor::from_f32(vec![4, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let p = pad_gate_halves(&t, 2, 3).unwrap();
        assert_eq!(p.shape(), &[6, 1]);
        assert_eq!(p.to_f32_vec(), vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0]);
    }

    #[test]
    fn input_channels_get_zero_columns() {
        let t = HostTensor::from_f32(vec![2, 2, 1, 1], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let p = pad_input_channels(&t, 2, 4).unwrap();
        assert_eq!(p.shape(), &[2, 4, 1, 1]);
        assert_eq!(p.to_f32_vec(), vec![1.0, 2.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
    }
}
