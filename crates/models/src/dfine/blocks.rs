//! Small building blocks shared by the D-FINE backbone, encoder and decoder: convolutions
//! with folded batch norm, linear layers (1x1 convolutions on `[B, 1, L, C]`), layer
//! norms and MLPs.

use aperture_engine::{Activation, Backend, ConvSpec, HostTensor};

use super::weights::{fold_batch_norm, merge_repvgg, Loader};
use crate::error::{ModelError, Result};

/// Maps an HF activation name to the engine's epilogue activation.
pub fn activation(name: &str) -> Result<Activation> {
    match name {
        "relu" => Ok(Activation::Relu),
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu" => Ok(Activation::Gelu),
        "identity" | "linear" => Ok(Activation::Identity),
        other => Err(ModelError::Config(format!(
            "activation '{other}' is not supported (relu, silu, gelu)"
        ))),
    }
}

/// A convolution with its batch norm folded in, an activation and an optional
/// learnable affine (`scale * y + bias`, HGNetV2's LAB) after it.
pub struct ConvUnit<B: Backend> {
    pub conv: B::Param,
    pub act: Activation,
    pub lab: Option<(f32, f32)>,
}

/// Geometry of a convolution followed by batch norm.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub padding: usize,
}

impl ConvShape {
    /// PyTorch's `padding=(k - 1) // 2`.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize, groups: usize) -> Self {
        Self {
            cin,
            cout,
            kernel,
            stride,
            groups,
            padding: (kernel.saturating_sub(1)) / 2,
        }
    }

    fn weight_shape(&self) -> Vec<usize> {
        vec![
            self.cout,
            self.cin / self.groups.max(1),
            self.kernel,
            self.kernel,
        ]
    }

    fn spec(&self) -> ConvSpec {
        ConvSpec {
            stride: self.stride,
            padding: self.padding,
            groups: self.groups,
        }
    }
}

/// Reads `weight_name` (OIHW, no bias) and the batch norm at `bn_prefix`, returns the
/// folded weight and bias.
pub fn folded(
    l: &mut Loader,
    weight_name: &str,
    bn_prefix: &str,
    s: ConvShape,
    eps: f32,
) -> Result<(HostTensor, Vec<f32>)> {
    let w = l.tensor(weight_name, &s.weight_shape());
    let (scale, shift) = l.batch_norm(bn_prefix, s.cout, eps);
    fold_batch_norm(&w, None, &scale, &shift)
}

impl<B: Backend> ConvUnit<B> {
    /// Convolution `weight_name` + batch norm `bn_prefix`, folded.
    pub fn load(
        b: &B,
        l: &mut Loader,
        weight_name: &str,
        bn_prefix: &str,
        s: ConvShape,
        eps: f32,
        act: Activation,
    ) -> Result<Self> {
        let (w, bias) = folded(l, weight_name, bn_prefix, s, eps)?;
        let bias = HostTensor::from_f32(vec![s.cout], bias)?;
        Ok(Self {
            conv: b.prepare_conv(&w, Some(&bias), s.spec())?,
            act,
            lab: None,
        })
    }

    /// RepVGG block: `conv1` (3x3) and `conv2` (1x1) with their norms, merged.
    pub fn load_repvgg(
        b: &B,
        l: &mut Loader,
        prefix: &str,
        ch: usize,
        eps: f32,
        act: Activation,
    ) -> Result<Self> {
        let (w3, b3) = folded(
            l,
            &format!("{prefix}.conv1.conv.weight"),
            &format!("{prefix}.conv1.norm"),
            ConvShape::new(ch, ch, 3, 1, 1),
            eps,
        )?;
        let (w1, b1) = folded(
            l,
            &format!("{prefix}.conv2.conv.weight"),
            &format!("{prefix}.conv2.norm"),
            ConvShape::new(ch, ch, 1, 1, 1),
            eps,
        )?;
        let (w, bias) = merge_repvgg(&w3, &b3, &w1, &b1)?;
        let bias = HostTensor::from_f32(vec![ch], bias)?;
        Ok(Self {
            conv: b.prepare_conv(&w, Some(&bias), ConvSpec::same(3))?,
            act,
            lab: None,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        self.forward_residual(b, x, None)
    }

    /// `lab(act(conv(x))) + residual`.
    pub fn forward_residual(
        &self,
        b: &B,
        x: &B::Tensor,
        residual: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        match self.lab {
            None => Ok(b.conv2d(x, &self.conv, self.act, residual)?),
            Some((scale, shift)) => {
                let y = b.affine(&b.conv2d(x, &self.conv, self.act, None)?, scale, shift)?;
                match residual {
                    Some(r) => Ok(b.add(&y, r)?),
                    None => Ok(y),
                }
            }
        }
    }
}

/// `nn.Linear` as a 1x1 convolution over `[B, 1, L, C]`.
pub struct Linear<B: Backend> {
    pub param: B::Param,
}

impl<B: Backend> Linear<B> {
    pub fn load(b: &B, l: &mut Loader, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Self::load_alias(b, l, &[prefix], cin, cout)
    }

    /// Tries each prefix in turn (weights tied under two names).
    pub fn load_alias(
        b: &B,
        l: &mut Loader,
        prefixes: &[&str],
        cin: usize,
        cout: usize,
    ) -> Result<Self> {
        let wn: Vec<String> = prefixes.iter().map(|p| format!("{p}.weight")).collect();
        let bn: Vec<String> = prefixes.iter().map(|p| format!("{p}.bias")).collect();
        let w = l.first_of(
            &wn.iter().map(String::as_str).collect::<Vec<_>>(),
            &[cout, cin],
        );
        let bias = l.first_of(&bn.iter().map(String::as_str).collect::<Vec<_>>(), &[cout]);
        Self::from_host(b, &w, &bias)
    }

    pub fn from_host(b: &B, w: &HostTensor, bias: &HostTensor) -> Result<Self> {
        let (cout, cin) = (w.shape()[0], w.shape()[1]);
        let w4 = w.clone().reshape(vec![cout, cin, 1, 1])?;
        Ok(Self {
            param: b.prepare_conv(&w4, Some(bias), ConvSpec::same(1))?,
        })
    }

    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        act: Activation,
        residual: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        Ok(b.conv2d(x, &self.param, act, residual)?)
    }
}

/// `nn.LayerNorm` over channels.
pub struct LayerNorm<B: Backend> {
    weight: B::Param,
    bias: B::Param,
    eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(b: &B, l: &mut Loader, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        let w = l.tensor(&format!("{prefix}.weight"), &[dim]);
        let bias = l.tensor(&format!("{prefix}.bias"), &[dim]);
        Ok(Self {
            weight: b.prepare_vector(&w)?,
            bias: b.prepare_vector(&bias)?,
            eps,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        Ok(b.layer_norm(x, &self.weight, Some(&self.bias), self.eps)?)
    }
}

/// An MLP of linear layers with an activation between them (none after the last).
pub struct Mlp<B: Backend> {
    layers: Vec<Linear<B>>,
    act: Activation,
}

impl<B: Backend> Mlp<B> {
    /// `prefixes[i]` holds `layers.{i}`; dims are `[in, hidden.., out]`.
    pub fn load(
        b: &B,
        l: &mut Loader,
        prefixes: &[&str],
        dims: &[usize],
        act: Activation,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        for i in 0..dims.len().saturating_sub(1) {
            let names: Vec<String> = prefixes.iter().map(|p| format!("{p}.layers.{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            layers.push(Linear::load_alias(b, l, &refs, dims[i], dims[i + 1])?);
        }
        Ok(Self { layers, act })
    }

    /// Builds from already-read layers (e.g. a replicated last layer).
    pub fn from_layers(layers: Vec<Linear<B>>, act: Activation) -> Self {
        Self { layers, act }
    }

    /// Runs the MLP; `residual` is added to the last layer's output.
    pub fn forward(&self, b: &B, x: &B::Tensor, residual: Option<&B::Tensor>) -> Result<B::Tensor> {
        let n = self.layers.len();
        let mut h: Option<B::Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let input = h.as_ref().unwrap_or(x);
            let last = i + 1 == n;
            let y = layer.forward(
                b,
                input,
                if last { Activation::Identity } else { self.act },
                if last { residual } else { None },
            )?;
            h = Some(y);
        }
        h.ok_or_else(|| ModelError::Config("an MLP needs at least one layer".into()))
    }
}

/// Copies an activation (backend tensors are not `Clone` in general).
pub fn copy<B: Backend>(b: &B, x: &B::Tensor) -> Result<B::Tensor> {
    let [_, _, _, c] = b.dims(x);
    Ok(b.slice_channels(x, 0, c)?)
}

/// Layer widths of HF's `DFineMLP(input, hidden, output, num_layers)`.
pub fn mlp_dims(input: usize, hidden: usize, output: usize, layers: usize) -> Vec<usize> {
    let mut d = vec![input];
    d.extend(std::iter::repeat_n(hidden, layers.saturating_sub(1)));
    d.push(output);
    d
}
