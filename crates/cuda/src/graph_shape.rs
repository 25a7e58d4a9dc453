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
        let mut shape = Self::default();
        for &n in &nodes {
            let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `n` is a node of `graph`; one value is written.
            check(unsafe { sys::cuGraphNodeGetType(n, &mut ty) })?;
            match ty {
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => shape.kernels += 1,
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => shape.copies += 1,
                sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => shape.memsets += 1,
                _ => shape.other_nodes += 1,
            }
        }
        let (from, to, data) = edges(graph)?;
        for d in &data {
            // Type 0 is the plain (full completion) dependency.
            if d.type_ == 0 {
                shape.plain_edges += 1;
            } else {
                shape.programmatic_edges += 1;
            }
        }
        let sources: HashSet<_> = from.iter().copied().collect();
        let targets: HashSet<_> = to.iter().copied().collect();
        shape.roots = nodes.iter().filter(|n| !targets.contains(n)).count();
        shape.leaves = nodes.iter().filter(|n| !sources.contains(n)).count();
        Ok(shape)
    }
}

/// Replaces every programmatic edge of `graph` by a plain one (the later node starts
/// after the earlier one has finished), unless `APERTURE_GRAPH_EDGES=keep`. Returns how
/// many edges changed. Call before instantiating.
pub(crate) fn make_edges_plain(graph: sys::CUgraph) -> CudaResult<usize> {
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
            check(sys::cuGraphRemoveDependencies_v2(graph, f, t, d, 1))?;
            let plain = std::mem::zeroed::<sys::CUgraphEdgeData>();
            check(sys::cuGraphAddDependencies_v2(graph, f, t, &plain, 1))?;
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

fn check(r: sys::CUresult) -> CudaResult<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver(format!("reading a graph's shape: {r:?}")))
    }
}

fn nodes(graph: sys::CUgraph) -> CudaResult<Vec<sys::CUgraphNode>> {
    let mut count = 0usize;
    // SAFETY: asks for the count only.
    check(unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count) })?;
    let mut nodes = vec![std::ptr::null_mut(); count];
    // SAFETY: `nodes` holds `count` entries.
    check(unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut count) })?;
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
    check(unsafe { sys::cuGraphGetEdges_v2(graph, none, none, std::ptr::null_mut(), &mut count) })?;
    let mut from: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
    let mut to: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
    // SAFETY: plain data; every field is written by the driver.
    let mut data = vec![unsafe { std::mem::zeroed::<sys::CUgraphEdgeData>() }; count];
    // SAFETY: the three arrays hold `count` entries each.
    check(unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut count,
        )
    })?;
    from.truncate(count);
    to.truncate(count);
    data.truncate(count);
    Ok((from, to, data))
}
