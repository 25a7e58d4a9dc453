//! Blocks of convolutions whose outputs meet in one channel concatenation (D-FINE's
//! RepNCSPELAN4, HGNetV2's HG block): a list of [`ConvNode`]s, each reading the block
//! input or an earlier node's output (all of its channels or a range of them), and the
//! list of tensors to concatenate. [`eval_conv_nodes`] evaluates such a block with plain
//! backend operations; it is the default of [`Backend::conv_nodes_concat`] and the
//! reference a GPU backend's in-place version is checked against.

use crate::backend::{Activation, Backend};
use crate::error::{EngineError, Result};

/// A tensor of a node block: the block input or the output of node `i` (an earlier one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeRef {
    Input,
    Node(usize),
}

/// What a node reads: channels `start..start + len` of a tensor of the block, or every
/// channel from `start` on when `len` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeSource {
    pub of: NodeRef,
    pub start: usize,
    pub len: Option<usize>,
}

impl NodeSource {
    /// All channels of `of`.
    pub fn whole(of: NodeRef) -> Self {
        Self {
            of,
            start: 0,
            len: None,
        }
    }

    /// Channels `start..start + len` of `of`.
    pub fn channels(of: NodeRef, start: usize, len: usize) -> Self {
        Self {
            of,
            start,
            len: Some(len),
        }
    }

    /// `(start, len)` within a tensor of `channels` channels, checked to lie inside it and
    /// to be non-empty.
    pub fn range(&self, channels: usize) -> Result<(usize, usize)> {
        let len = match self.len {
            Some(l) => l,
            None => channels.checked_sub(self.start).ok_or_else(|| {
                EngineError::Shape(format!(
                    "channels from {} of {}, which has {channels}",
                    self.start,
                    describe(self.of)
                ))
            })?,
        };
        let end = self.start.checked_add(len);
        if end.is_none_or(|e| e > channels) {
            return Err(EngineError::Shape(format!(
                "channels {}..{} of {}, which has {channels}",
                self.start,
                self.start.saturating_add(len),
                describe(self.of)
            )));
        }
        if len == 0 {
            return Err(EngineError::Shape(format!(
                "an empty channel range ({}..{}) of {}",
                self.start,
                self.start,
                describe(self.of)
            )));
        }
        Ok((self.start, len))
    }
}

impl From<NodeRef> for NodeSource {
    fn from(of: NodeRef) -> Self {
        Self::whole(of)
    }
}

/// One convolution of a node block: `act(conv(input) + bias) + residual`, the residual
/// being all of an earlier tensor of the block (the output's dims).
pub struct ConvNode<'a, P> {
    pub input: NodeSource,
    pub conv: &'a P,
    pub act: Activation,
    pub residual: Option<NodeRef>,
}

// Manual impls: `P` itself need not be `Clone` (the node only borrows it).
impl<P> Clone for ConvNode<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for ConvNode<'_, P> {}

impl<P> std::fmt::Debug for ConvNode<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvNode")
            .field("input", &self.input)
            .field("act", &self.act)
            .field("residual", &self.residual)
            .finish_non_exhaustive()
    }
}

fn describe(r: NodeRef) -> String {
    match r {
        NodeRef::Input => "the block input".into(),
        NodeRef::Node(i) => format!("node {i}"),
    }
}

/// Checks the references of a node block: every node reads (input and residual) only
/// the block input or earlier nodes, `concat` names at least one tensor and only
/// existing ones. Channel ranges are checked where the tensors' sizes are known
/// ([`NodeSource::range`]).
pub fn check_conv_nodes<P>(nodes: &[ConvNode<'_, P>], concat: &[NodeRef]) -> Result<()> {
    let earlier = |i: usize, r: NodeRef, what: &str| {
        match r {
        NodeRef::Node(k) if k >= i => Err(EngineError::Invalid(format!(
            "node {i} reads node {k} as its {what}: nodes may read only the block input and earlier nodes"
        ))),
        _ => Ok(()),
    }
    };
    for (i, node) in nodes.iter().enumerate() {
        earlier(i, node.input.of, "input")?;
        if let Some(r) = node.residual {
            earlier(i, r, "residual")?;
        }
    }
    if concat.is_empty() {
        return Err(EngineError::Invalid(
            "a node block concatenates at least one tensor".into(),
        ));
    }
    if let Some(k) = concat.iter().find_map(|r| match r {
        NodeRef::Node(k) if *k >= nodes.len() => Some(*k),
        _ => None,
    }) {
        return Err(EngineError::Invalid(format!(
            "the concatenation names node {k}, but the block has {} nodes",
            nodes.len()
        )));
    }
    Ok(())
}

/// For each node, the index of the last node that reads it (input or residual), or
/// `None` when no node does.
pub fn last_reads<P>(nodes: &[ConvNode<'_, P>]) -> Vec<Option<usize>> {
    let mut last = vec![None; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for r in std::iter::once(node.input.of).chain(node.residual) {
            if let NodeRef::Node(k) = r {
                if let Some(l) = last.get_mut(k) {
                    *l = Some(i);
                }
            }
        }
    }
    last
}

/// Prefixes an error with the node it came from (the variant stays).
fn at_node(i: usize, e: EngineError) -> EngineError {
    let m = |s: String| format!("node {i}: {s}");
    match e {
        EngineError::Shape(s) => EngineError::Shape(m(s)),
        EngineError::Unsupported(s) => EngineError::Unsupported(m(s)),
        EngineError::Invalid(s) => EngineError::Invalid(m(s)),
        EngineError::Device(s) => EngineError::Device(m(s)),
        EngineError::OutOfMemory(s) => EngineError::OutOfMemory(m(s)),
    }
}

/// The outputs `y_1, .., y_n` of the chains of an HG-block aggregation
/// ([`Backend::conv_chain_concat`]): `y_j` is the chain `layers[j]` of plain `conv2d`s
/// applied to `y_{j-1}`, `y_0 = x`.
pub fn run_conv_chains<B: Backend + ?Sized>(
    b: &B,
    x: &B::Tensor,
    layers: &[Vec<(&B::Param, Activation)>],
) -> Result<Vec<B::Tensor>> {
    let mut outs: Vec<B::Tensor> = Vec::with_capacity(layers.len());
    for chain in layers {
        let mut h: Option<B::Tensor> = None;
        for (conv, act) in chain {
            let input = h.as_ref().or(outs.last()).unwrap_or(x);
            h = Some(b.conv2d(input, conv, *act, None)?);
        }
        outs.push(h.ok_or_else(|| {
            EngineError::Invalid("a chain of the aggregation has no convolution".into())
        })?);
    }
    Ok(outs)
}

/// [`Backend::conv_nodes_concat`] with plain operations: per node `slice_channels` (for
/// a channel range) and `conv2d`, then `concat_channels_n` of the tensors `concat`
/// names. Node outputs nothing reads any more are dropped as the block goes.
pub fn eval_conv_nodes<B: Backend>(
    b: &B,
    x: &B::Tensor,
    nodes: &[ConvNode<'_, B::Param>],
    concat: &[NodeRef],
) -> Result<B::Tensor> {
    check_conv_nodes(nodes, concat)?;
    let last = last_reads(nodes);
    let kept: Vec<bool> = (0..nodes.len())
        .map(|i| concat.contains(&NodeRef::Node(i)))
        .collect();
    let mut outs: Vec<Option<B::Tensor>> = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let y = {
            let get = |r: NodeRef| -> Result<&B::Tensor> {
                match r {
                    NodeRef::Input => Ok(x),
                    NodeRef::Node(k) => outs.get(k).and_then(Option::as_ref).ok_or_else(|| {
                        EngineError::Invalid(format!(
                            "node {k} was dropped before node {i} read it"
                        ))
                    }),
                }
            };
            let t = get(node.input.of)?;
            let c = b.dims(t)[3];
            let (start, len) = node.input.range(c).map_err(|e| at_node(i, e))?;
            let sliced = if (start, len) == (0, c) {
                None
            } else {
                Some(b.slice_channels(t, start, len)?)
            };
            let input = sliced.as_ref().unwrap_or(t);
            let residual = node.residual.map(get).transpose()?;
            b.conv2d(input, node.conv, node.act, residual)
                .map_err(|e| at_node(i, e))?
        };
        outs.push(Some(y));
        for (k, out) in outs.iter_mut().enumerate() {
            let read_after = last[k].is_some_and(|l| l > i);
            if !kept[k] && !read_after {
                *out = None;
            }
        }
    }
    let parts = concat
        .iter()
        .map(|r| match r {
            NodeRef::Input => Ok(x),
            NodeRef::Node(k) => outs.get(*k).and_then(Option::as_ref).ok_or_else(|| {
                EngineError::Invalid(format!("node {k} is missing from the concatenation"))
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    b.concat_channels_n(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ConvSpec;
    use crate::cpu::{CpuBackend, CpuParam};
    use crate::tensor::HostTensor;

    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                scale * (2.0 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
            })
            .collect()
    }

    fn conv(b: &CpuBackend, seed: u64, ci: usize, co: usize, k: usize) -> CpuParam {
        let scale = 1.0 / ((ci * k * k) as f32).sqrt();
        let w =
            HostTensor::from_f32(vec![co, ci, k, k], values(seed, co * ci * k * k, scale)).unwrap();
        let bias = HostTensor::from_f32(vec![co], values(seed + 1, co, 0.5)).unwrap();
        b.prepare_conv(&w, Some(&bias), ConvSpec::same(k)).unwrap()
    }

    fn input(b: &CpuBackend, c: usize) -> crate::cpu::CpuTensor {
        let x = HostTensor::from_f32(vec![2, c, 5, 7], values(99, 2 * c * 35, 1.0)).unwrap();
        b.upload_nchw(&x).unwrap()
    }

    /// An ELAN-shaped block: y = 1x1(x) (8 channels, concatenated), a CSP branch on
    /// y's channels 4..8 (two 1x1s, a 3x3 bottleneck, the residual), a 3x3 into the
    /// concatenation, a second branch on that, another 3x3 into the concatenation.
    #[test]
    fn the_default_matches_plain_operations_on_an_elan_shaped_block() {
        let b = CpuBackend::new();
        let silu = Activation::Silu;
        let x = input(&b, 6);
        let p: Vec<CpuParam> = vec![
            conv(&b, 1, 6, 8, 1),  // 0: y
            conv(&b, 3, 4, 3, 1),  // 1: csp1 conv1 on y[4..8]
            conv(&b, 5, 3, 3, 3),  // 2: bottleneck
            conv(&b, 7, 4, 3, 1),  // 3: csp1 conv2 on y[4..8] + residual 2
            conv(&b, 9, 3, 3, 3),  // 4: b1
            conv(&b, 11, 3, 3, 1), // 5: csp2 conv1
            conv(&b, 13, 3, 3, 3), // 6: bottleneck
            conv(&b, 15, 3, 3, 1), // 7: csp2 conv2 + residual 6
            conv(&b, 17, 3, 3, 3), // 8: b2
        ];
        let node = |i: usize, input: NodeSource, residual: Option<NodeRef>| ConvNode {
            input,
            conv: &p[i],
            act: silu,
            residual,
        };
        let n = NodeRef::Node;
        let nodes = vec![
            node(0, NodeSource::whole(NodeRef::Input), None),
            node(1, NodeSource::channels(n(0), 4, 4), None),
            node(2, n(1).into(), None),
            node(3, NodeSource::channels(n(0), 4, 4), Some(n(2))),
            node(4, n(3).into(), None),
            node(5, n(4).into(), None),
            node(6, n(5).into(), None),
            node(7, n(4).into(), Some(n(6))),
            node(8, n(7).into(), None),
        ];
        let got = b
            .conv_nodes_concat(&x, &nodes, &[n(0), n(4), n(8)])
            .unwrap();

        let y = b.conv2d(&x, &p[0], silu, None).unwrap();
        let second = b.slice_channels(&y, 4, 4).unwrap();
        let h = b.conv2d(&second, &p[1], silu, None).unwrap();
        let h = b.conv2d(&h, &p[2], silu, None).unwrap();
        let c1 = b.conv2d(&second, &p[3], silu, Some(&h)).unwrap();
        let b1 = b.conv2d(&c1, &p[4], silu, None).unwrap();
        let h = b.conv2d(&b1, &p[5], silu, None).unwrap();
        let h = b.conv2d(&h, &p[6], silu, None).unwrap();
        let c2 = b.conv2d(&b1, &p[7], silu, Some(&h)).unwrap();
        let b2 = b.conv2d(&c2, &p[8], silu, None).unwrap();
        let want = b.concat_channels_n(&[&y, &b1, &b2]).unwrap();
        assert_eq!(b.dims(&got), [2, 5, 7, 14]);
        assert_eq!(
            b.download_nchw(&got).unwrap().to_f32_vec(),
            b.download_nchw(&want).unwrap().to_f32_vec()
        );
    }

    /// The block input in the concatenation (twice), a range from a start to the end,
    /// the input as a residual, and a node nothing reads.
    #[test]
    fn the_default_takes_the_input_ranges_to_the_end_and_input_residuals() {
        let b = CpuBackend::new();
        let x = input(&b, 4);
        let p = [
            conv(&b, 21, 3, 4, 3),
            conv(&b, 23, 4, 4, 1),
            conv(&b, 25, 4, 2, 1),
        ];
        let nodes = [
            ConvNode {
                input: NodeSource {
                    of: NodeRef::Input,
                    start: 1,
                    len: None,
                },
                conv: &p[0],
                act: Activation::Relu,
                residual: Some(NodeRef::Input),
            },
            ConvNode {
                input: NodeRef::Node(0).into(),
                conv: &p[1],
                act: Activation::Identity,
                residual: None,
            },
            ConvNode {
                input: NodeRef::Input.into(),
                conv: &p[2],
                act: Activation::Gelu,
                residual: None,
            },
        ];
        let concat = [NodeRef::Input, NodeRef::Node(1), NodeRef::Input];
        let got = b.conv_nodes_concat(&x, &nodes, &concat).unwrap();
        let tail = b.slice_channels(&x, 1, 3).unwrap();
        let a = b.conv2d(&tail, &p[0], Activation::Relu, Some(&x)).unwrap();
        let y = b.conv2d(&a, &p[1], Activation::Identity, None).unwrap();
        let want = b.concat_channels_n(&[&x, &y, &x]).unwrap();
        assert_eq!(
            b.download_nchw(&got).unwrap().to_f32_vec(),
            b.download_nchw(&want).unwrap().to_f32_vec()
        );
    }

    /// Nodes, concatenation, and what the error must say.
    type BadBlock<'a> = (Vec<ConvNode<'a, CpuParam>>, Vec<NodeRef>, &'static str);

    fn error_of(
        b: &CpuBackend,
        x: &crate::cpu::CpuTensor,
        nodes: &[ConvNode<'_, CpuParam>],
        concat: &[NodeRef],
    ) -> EngineError {
        match b.conv_nodes_concat(x, nodes, concat) {
            Ok(_) => panic!("{nodes:?} with {concat:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn every_invalid_block_is_reported() {
        let b = CpuBackend::new();
        let x = input(&b, 4);
        let p = conv(&b, 31, 4, 4, 1);
        let q = conv(&b, 33, 2, 2, 1);
        let node = |input: NodeSource, residual: Option<NodeRef>| ConvNode {
            input,
            conv: &p,
            act: Activation::Identity,
            residual,
        };
        let at = |s, l| NodeSource::channels(NodeRef::Input, s, l);
        let ok = node(NodeRef::Input.into(), None);
        let cases: Vec<BadBlock<'_>> = vec![
            (
                vec![ok, node(NodeRef::Node(1).into(), None)],
                vec![NodeRef::Node(1)],
                "node 1 reads node 1 as its input",
            ),
            (
                vec![node(NodeRef::Node(1).into(), None), ok],
                vec![NodeRef::Node(1)],
                "node 0 reads node 1 as its input",
            ),
            (
                vec![ok, node(NodeRef::Input.into(), Some(NodeRef::Node(2))), ok],
                vec![NodeRef::Node(1)],
                "node 1 reads node 2 as its residual",
            ),
            (vec![ok], vec![], "at least one tensor"),
            (
                vec![ok],
                vec![NodeRef::Input, NodeRef::Node(1)],
                "names node 1, but the block has 1 nodes",
            ),
            (
                vec![node(at(2, 3), None)],
                vec![NodeRef::Node(0)],
                "shape mismatch: node 0: channels 2..5 of the block input, which has 4",
            ),
            (
                vec![node(at(1, 0), None)],
                vec![NodeRef::Node(0)],
                "shape mismatch: node 0: an empty channel range (1..1) of the block input",
            ),
            (
                vec![
                    ok,
                    node(
                        NodeSource {
                            of: NodeRef::Node(0),
                            start: 5,
                            len: None,
                        },
                        None,
                    ),
                ],
                vec![NodeRef::Node(1)],
                "shape mismatch: node 1: channels from 5 of node 0, which has 4",
            ),
            (
                vec![ConvNode {
                    input: NodeSource::channels(NodeRef::Input, 0, 2),
                    conv: &q,
                    act: Activation::Identity,
                    residual: Some(NodeRef::Input),
                }],
                vec![NodeRef::Node(0)],
                "shape mismatch: node 0: residual",
            ),
        ];
        for (nodes, concat, want) in cases {
            let e = error_of(&b, &x, &nodes, &concat).to_string();
            assert!(e.contains(want), "{e:?} does not say {want:?}");
        }
    }

    #[test]
    fn last_reads_follow_inputs_and_residuals() {
        let b = CpuBackend::new();
        let p = conv(&b, 41, 4, 4, 1);
        let node = |input: NodeRef, residual: Option<NodeRef>| ConvNode {
            input: input.into(),
            conv: &p,
            act: Activation::Identity,
            residual,
        };
        let nodes = [
            node(NodeRef::Input, None),
            node(NodeRef::Node(0), None),
            node(NodeRef::Input, Some(NodeRef::Node(0))),
            node(NodeRef::Node(1), None),
        ];
        assert_eq!(last_reads(&nodes), vec![Some(2), Some(3), None, None]);
    }
}
