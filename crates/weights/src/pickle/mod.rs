//! Unpickling the `data.pkl` of a `torch.save` archive without running Python.

mod globals;
mod value;
mod vm;

#[cfg(test)]
pub(crate) use value::StorageRef;
pub(crate) use value::{TensorRef, Value};
pub(crate) use vm::{unpickle, unpickle_at, Unpickled};

#[cfg(test)]
mod tests;
