//! The shape of a captured CUDA graph (its nodes by type, its edges by kind, the nodes
//! that nothing depends on), and making its programmatic edges plain.
//!
//! A stream capture of one stream gives a chain with plain edges, except where a
//! library launches for programmatic dependent launch: cuDNN's run-time compiled
//! operation-graph kernels leave a programmatic edge in the capture, and the kernel
//! after it may then start before they finish. Ours do not wait for their inputs in
//! the device code (`griddepcontrol.wait`), so such an edge into one of ours is a race:
//! replays of one graph gave different outputs until the edges were made plain.

use std::collections::HashSet;
use std::fmt;

use cudarc::driver::sys;

use crate::error::{CudaError, CudaResult};

/// Whether captures keep programmatic edges (`APERTURE_GRAPH_EDGES=keep`, for
/// measurements only) instead of making them plain.
const EDGES_ENV: &str = "APERTURE_GRAPH_EDGES";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct GraphShape {
    pub kernels: usize,
    pub copies: usize,
    pub memsets: usize,
    pub other_nodes: usize,
    pub plain_edges: usize,
    pub programmatic_edges: usize,
    pub roots: usize,
    pub leaves: usize,
}

impl GraphShape {
    /// Reads the shape of `graph` (a captured or built graph, not an executable one).
    pub(crate) fn of(graph: sys::CUgraph) -> CudaResult<Self> {
        let nodes = nodes(graph)?;
        let mut types = Vec::with_capacity(nodes.len());
        for &n in &nodes {
            let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `n` is a node of `graph`; one value is written.
            check(
                unsafe { sys::cuGraphNodeGetType(n, &mut ty) },
                "cuGraphNodeGetType",
            )?;
            types.push(ty);
        }
        let (from, to, data) = edges(graph)?;
        let index = |n: &sys::CUgraphNode| nodes.iter().position(|m| m == n);
        let edges: Vec<(Option<usize>, Option<usize>, bool)> = from
            .iter()
            .zip(&to)
            .zip(&data)
            .map(|((f, t), d)| (index(f), index(t), d.type_ != 0))
            .collect();
        Ok(Self::from_parts(&types, &edges))
    }

    /// The shape of a graph given as its nodes' types and its edges (source and target
    /// node index, whether the edge is programmatic; type 0 is the plain dependency).
    fn from_parts(
        types: &[sys::CUgraphNodeType],
        edges: &[(Option<usize>, Option<usize>, bool)],
    ) -> Self {
        use sys::CUgraphNodeType as T;
        let mut shape = Self::default();
        for ty in types {
            match ty {
                T::CU_GRAPH_NODE_TYPE_KERNEL => shape.kernels += 1,
                T::CU_GRAPH_NODE_TYPE_MEMCPY => shape.copies += 1,
                T::CU_GRAPH_NODE_TYPE_MEMSET => shape.memsets += 1,
                _ => shape.other_nodes += 1,
            }
        }
        for &(_, _, programmatic) in edges {
            if programmatic {
                shape.programmatic_edges += 1;
            } else {
                shape.plain_edges += 1;
            }
        }
        let sources: HashSet<usize> = edges.iter().filter_map(|e| e.0).collect();
        let targets: HashSet<usize> = edges.iter().filter_map(|e| e.1).collect();
        shape.roots = (0..types.len()).filter(|i| !targets.contains(i)).count();
        shape.leaves = (0..types.len()).filter(|i| !sources.contains(i)).count();
        shape
    }
}

/// What every captured graph goes through before it is instantiated: its shape logged
/// (debug level, as `what`) and its programmatic edges made plain.
pub(crate) fn before_instantiation(graph: sys::CUgraph, what: &str) -> CudaResult<()> {
    if tracing::enabled!(tracing::Level::DEBUG) {
        match GraphShape::of(graph) {
            Ok(shape) => tracing::debug!("{what}: {shape}"),
            Err(e) => tracing::debug!("{what}: {e}"),
        }
    }
    make_edges_plain(graph).map(|_| ())
}

/// Replaces every programmatic edge of `graph` by a plain one (the later node starts
/// after the earlier one has finished), unless `APERTURE_GRAPH_EDGES=keep`. Returns how
/// many edges changed. Call before instantiating.
fn make_edges_plain(graph: sys::CUgraph) -> CudaResult<usize> {
    if std::env::var(EDGES_ENV).as_deref() == Ok("keep") {
        return Ok(0);
    }
    let (from, to, data) = edges(graph)?;
    let mut changed = 0;
    for ((f, t), d) in from.iter().zip(&to).zip(&data) {
        if d.type_ == 0 {
            continue;
        }
        if changed == 0 {
            tracing::debug!(
                "programmatic edge {} -> {} (port {}) made plain",
                kernel_name(*f),
                kernel_name(*t),
                d.from_port
            );
        }
        // SAFETY: one edge of `graph`, removed with the data it was read with, then added
        // back with the default (plain) data.
        unsafe {
            check(
                sys::cuGraphRemoveDependencies_v2(graph, f, t, d, 1),
                "cuGraphRemoveDependencies",
            )?;
            let plain = std::mem::zeroed::<sys::CUgraphEdgeData>();
            check(
                sys::cuGraphAddDependencies_v2(graph, f, t, &plain, 1),
                "cuGraphAddDependencies",
            )?;
        }
        changed += 1;
    }
    if changed > 0 {
        tracing::debug!("{changed} programmatic edges made plain");
    }
    Ok(changed)
}

/// The device function a kernel node runs, for logs ("?" where the driver cannot say).
fn kernel_name(node: sys::CUgraphNode) -> String {
    // SAFETY: plain data; the driver fills it for kernel nodes and fails otherwise.
    let mut params = unsafe { std::mem::zeroed::<sys::CUDA_KERNEL_NODE_PARAMS>() };
    // SAFETY: `node` is a live node; the name is a driver-owned C string.
    unsafe {
        if sys::cuGraphKernelNodeGetParams_v2(node, &mut params) != sys::CUresult::CUDA_SUCCESS {
            return "?".into();
        }
        let mut name: *const std::ffi::c_char = std::ptr::null();
        let found = if !params.func.is_null() {
            sys::cuFuncGetName(&mut name, params.func)
        } else {
            sys::cuKernelGetName(&mut name, params.kern)
        };
        if found != sys::CUresult::CUDA_SUCCESS || name.is_null() {
            return "?".into();
        }
        let full = std::ffi::CStr::from_ptr(name).to_string_lossy();
        full.chars().take(80).collect()
    }
}

impl fmt::Display for GraphShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} kernels, {} copies, {} memsets, {} other nodes; {} plain and {} programmatic edges; {} roots, {} leaves",
            self.kernels,
            self.copies,
            self.memsets,
            self.other_nodes,
            self.plain_edges,
            self.programmatic_edges,
            self.roots,
            self.leaves
        )
    }
}

/// A driver call's result, naming the call when it failed.
fn check(r: sys::CUresult, call: &str) -> CudaResult<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver(format!(
            "{call} on a captured graph: {r:?}"
        )))
    }
}

fn nodes(graph: sys::CUgraph) -> CudaResult<Vec<sys::CUgraphNode>> {
    let mut count = 0usize;
    // SAFETY: asks for the count only.
    check(
        unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count) },
        "cuGraphGetNodes",
    )?;
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut nodes = vec![std::ptr::null_mut(); count];
    // SAFETY: `nodes` holds `count` entries.
    check(
        unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count) },
        "cuGraphGetNodes",
    )?;
    nodes.truncate(count);
    Ok(nodes)
}

type Edges = (
    Vec<sys::CUgraphNode>,
    Vec<sys::CUgraphNode>,
    Vec<sys::CUgraphEdgeData>,
);

fn edges(graph: sys::CUgraph) -> CudaResult<Edges> {
    let mut count = 0usize;
    let none = std::ptr::null_mut();
    // SAFETY: asks for the count only.
    check(
        unsafe { sys::cuGraphGetEdges_v2(graph, none, none, std::ptr::null_mut(), &mut count) },
        "cuGraphGetEdges",
    )?;
    // A graph of one node has no edges, and the driver refuses a second call asking for
    // none (CUDA_ERROR_INVALID_VALUE).
    if count == 0 {
        return Ok((Vec::new(), Vec::new(), Vec::new()));
    }
    let mut from: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
    let mut to: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
    // SAFETY: plain data; every field is written by the driver.
    let mut data = vec![unsafe { std::mem::zeroed::<sys::CUgraphEdgeData>() }; count];
    // SAFETY: the three arrays hold `count` entries each.
    check(
        unsafe {
            sys::cuGraphGetEdges_v2(
                graph,
                from.as_mut_ptr(),
                to.as_mut_ptr(),
                data.as_mut_ptr(),
                &mut count,
            )
        },
        "cuGraphGetEdges",
    )?;
    from.truncate(count);
    to.truncate(count);
    data.truncate(count);
    Ok((from, to, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::CUgraphNodeType as T;

    #[test]
    fn a_chain_has_one_root_and_one_leaf() {
        let types = [
            T::CU_GRAPH_NODE_TYPE_KERNEL,
            T::CU_GRAPH_NODE_TYPE_KERNEL,
            T::CU_GRAPH_NODE_TYPE_MEMSET,
        ];
        let edges = [(Some(0), Some(1), true), (Some(1), Some(2), false)];
        let shape = GraphShape::from_parts(&types, &edges);
        assert_eq!(
            shape,
            GraphShape {
                kernels: 2,
                memsets: 1,
                plain_edges: 1,
                programmatic_edges: 1,
                roots: 1,
                leaves: 1,
                ..GraphShape::default()
            }
        );
    }

    #[test]
    fn a_branch_left_unjoined_shows_as_a_second_leaf() {
        // 0 -> 1 -> 2, and 0 -> 3 with nothing after 3.
        let types = [T::CU_GRAPH_NODE_TYPE_KERNEL; 4];
        let edges = [
            (Some(0), Some(1), false),
            (Some(1), Some(2), false),
            (Some(0), Some(3), false),
        ];
        let shape = GraphShape::from_parts(&types, &edges);
        assert_eq!((shape.roots, shape.leaves), (1, 2));
        assert_eq!(shape.to_string(), "4 kernels, 0 copies, 0 memsets, 0 other nodes; 3 plain and 0 programmatic edges; 1 roots, 2 leaves");
    }
}
