//! Values produced by the pickle machine.

use std::cell::RefCell;
use std::rc::Rc;

use crate::elem::ElemType;

/// A storage referenced by a persistent id: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StorageRef {
    /// The element type, or the storage class name when it is not one we can decode.
    pub elem: Result<ElemType, String>,
    /// Name of the archive entry under `data/` holding the bytes.
    pub key: String,
    /// Elements to skip at the start of that storage (legacy files' storage views).
    pub offset: usize,
}

/// A tensor view on a storage, as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    /// Offset into the storage, in elements.
    pub offset: usize,
    pub size: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

pub(crate) type Shared<T> = Rc<RefCell<T>>;

/// The items of a tuple or list. Dropping is iterative (see [`drop_iteratively`]) so a
/// hostile pickle of deeply nested containers cannot overflow the stack.
#[derive(Clone, Debug, Default)]
pub(crate) struct Seq(pub Vec<Value>);

/// The entries of a dict, in insertion order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pairs(pub Vec<(Value, Value)>);

impl std::ops::Deref for Seq {
    type Target = Vec<Value>;
    fn deref(&self) -> &Vec<Value> {
        &self.0
    }
}

impl std::ops::DerefMut for Seq {
    fn deref_mut(&mut self) -> &mut Vec<Value> {
        &mut self.0
    }
}

impl std::ops::Deref for Pairs {
    type Target = Vec<(Value, Value)>;
    fn deref(&self) -> &Vec<(Value, Value)> {
        &self.0
    }
}

impl std::ops::DerefMut for Pairs {
    fn deref_mut(&mut self) -> &mut Vec<(Value, Value)> {
        &mut self.0
    }
}

impl Drop for Seq {
    fn drop(&mut self) {
        drop_iteratively(std::mem::take(&mut self.0));
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        let flat = std::mem::take(&mut self.0)
            .into_iter()
            .flat_map(|(k, v)| [k, v])
            .collect();
        drop_iteratively(flat);
    }
}

/// Drops values with an explicit work list instead of recursion: containers this
/// is the last owner of are emptied onto the list before they are freed.
fn drop_iteratively(mut work: Vec<Value>) {
    while let Some(v) = work.pop() {
        match v {
            Value::Tuple(rc) => {
                if let Ok(mut seq) = Rc::try_unwrap(rc) {
                    work.append(&mut seq.0);
                }
            }
            Value::List(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    work.append(&mut cell.into_inner().0);
                }
            }
            Value::Dict(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    let mut pairs = cell.into_inner();
                    work.extend(
                        std::mem::take(&mut pairs.0)
                            .into_iter()
                            .flat_map(|(k, v)| [k, v]),
                    );
                }
            }
            _ => {}
        }
    }
}

/// A Python value. Lists and dicts are shared and mutable because pickle fills them
/// after memoising them, and later references (BINGET) must see the filled object.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(Shared<Seq>),
    /// Insertion-ordered; a later entry with the same key overrides an earlier one.
    Dict(Shared<Pairs>),
    /// A class or function reference `module.name` (GLOBAL / STACK_GLOBAL).
    Global(Rc<(String, String)>),
    Storage(Rc<StorageRef>),
    /// A tensor, or why this tensor cannot be loaded (reported only if it is needed).
    Tensor(Rc<Result<TensorRef, String>>),
    /// Anything we do not model (unknown classes, their instances, huge integers).
    Opaque(Rc<str>),
}

impl Value {
    pub(crate) fn new_dict() -> Value {
        Value::Dict(Rc::new(RefCell::new(Pairs::default())))
    }

    pub(crate) fn new_list(items: Vec<Value>) -> Value {
        Value::List(Rc::new(RefCell::new(Seq(items))))
    }

    pub(crate) fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(Seq(items)))
    }

    pub(crate) fn opaque(what: impl Into<String>) -> Value {
        Value::Opaque(Rc::from(what.into()))
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }

    /// Elements of a tuple or list.
    pub(crate) fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.to_vec()),
            Value::List(l) => Some(l.borrow().to_vec()),
            _ => None,
        }
    }

    /// Looks up a string key in a dict (the last entry wins, like Python's assignment).
    pub(crate) fn dict_get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// A short description for error messages (scalars with their value).
    pub(crate) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(_) => "str".into(),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("{}.{}", g.0, g.1),
            Value::Storage(_) => "storage".into(),
            Value::Tensor(_) => "tensor".into(),
            Value::Opaque(w) => w.to_string(),
        }
    }
}
