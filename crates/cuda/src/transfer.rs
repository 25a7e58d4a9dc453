//! The host side of a captured graph's input or output. The graph reads and writes f32
//! NCHW staging buffers; for 16-bit models the values cross PCIe in the activations'
//! storage type instead (half the bytes), through a device buffer of that type next to
//! the staging buffer and one widening or narrowing kernel. The values the graph sees
//! are bit-identical either way: the host rounds to nearest even, as the graph's first
//! kernel would, and outputs came from the storage type to begin with.

use aperture_engine::{HostTensor, Result};

use crate::backend::CudaBackend;
use crate::kernels::Arg;
use crate::pinned::{Pinned, Wire};
use crate::pool::DeviceBuffer;

pub(crate) struct Transfer {
    pinned: Pinned,
    /// The storage-type twin of the f32 staging buffer (16-bit models only).
    narrow: Option<DeviceBuffer>,
}

impl Transfer {
    /// Room for `values` values between the host and an f32 staging buffer.
    pub(crate) fn new(be: &CudaBackend, values: usize) -> Result<Self> {
        let wire = Wire::for_storage(be.storage);
        let narrow = match wire {
            Wire::F32 => None,
            _ => Some(be.pool.alloc(values.max(1) * wire.size())?),
        };
        Ok(Self {
            pinned: Pinned::new(values, wire)?,
            narrow,
        })
    }

    /// Enqueues `x` (its leading values when the staging buffer is larger) into the f32
    /// staging buffer at `staging` on the backend's stream.
    pub(crate) fn send(&mut self, be: &CudaBackend, x: &HostTensor, staging: u64) -> Result<()> {
        match &self.narrow {
            None => self.pinned.upload(&be.ctx, x, staging),
            Some(buf) => {
                self.pinned.upload(&be.ctx, x, buf.ptr())?;
                convert(be, "widen_to_f32", buf.ptr(), staging, x.numel())
            }
        }
    }

    /// Enqueues the first `len` values of the f32 staging buffer at `staging` (after the
    /// stream's earlier work) and returns them once they have arrived.
    pub(crate) fn receive(
        &mut self,
        be: &CudaBackend,
        staging: u64,
        len: usize,
    ) -> Result<Vec<f32>> {
        match &self.narrow {
            None => self.pinned.download(&be.ctx, staging, len),
            Some(buf) => {
                let src = buf.ptr();
                convert(be, "narrow_from_f32", staging, src, len)?;
                self.pinned.download(&be.ctx, src, len)
            }
        }
    }
}

fn convert(be: &CudaBackend, kernel: &str, src: u64, dst: u64, n: usize) -> Result<()> {
    let args = [Arg::Ptr(src), Arg::Ptr(dst), Arg::I64(n as i64)];
    Ok(be.launch_1d(kernel, n, &args)?)
}
