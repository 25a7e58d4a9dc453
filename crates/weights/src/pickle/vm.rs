//! A small pickle virtual machine covering the opcodes `torch.save` emits (protocol 2,
//! and the protocol 3-5 additions for files saved with a higher `pickle_protocol`).
//!
//! Nothing is imported or executed: GLOBAL yields a name, and REDUCE/NEWOBJ either
//! build one of the few values we understand (dicts, tensors) or an opaque marker.

use std::collections::HashMap;
use std::rc::Rc;

use super::globals::{call_global, persistent_load};
use super::value::{StorageRef, Value};

#[derive(Debug)]
pub(crate) struct PickleError {
    pub offset: usize,
    pub reason: String,
}

type Res<T> = Result<T, String>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<usize, Value>,
    storages: Vec<StorageRef>,
}

/// The result of one pickle in a byte stream.
pub(crate) struct Unpickled {
    pub value: Value,
    /// Offset just past the STOP opcode (legacy files chain several pickles).
    pub end: usize,
    /// Every storage the pickle referred to, needed to walk legacy files' data.
    pub storages: Vec<StorageRef>,
}

/// Runs `data` to its STOP opcode and returns the unpickled value.
pub(crate) fn unpickle(data: &[u8]) -> Result<Value, PickleError> {
    unpickle_at(data, 0).map(|u| u.value)
}

/// Runs the pickle starting at `start`.
pub(crate) fn unpickle_at(data: &[u8], start: usize) -> Result<Unpickled, PickleError> {
    let mut m = Machine {
        data,
        pos: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: Vec::new(),
    };
    loop {
        let at = m.pos;
        match m.step() {
            Ok(Some(value)) => {
                return Ok(Unpickled {
                    value,
                    end: m.pos,
                    storages: m.storages,
                })
            }
            Ok(None) => {}
            Err(reason) => return Err(PickleError { offset: at, reason }),
        }
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Res<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "unexpected end of data (needed {n} bytes, {} left)",
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    fn fixed<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    fn u32_len(&mut self) -> Res<usize> {
        Ok(u32::from_le_bytes(self.fixed()?) as usize)
    }

    fn u64_len(&mut self) -> Res<usize> {
        usize::try_from(u64::from_le_bytes(self.fixed()?))
            .map_err(|_| "length does not fit in memory".to_string())
    }

    /// A text argument up to (not including) the next newline.
    fn line(&mut self) -> Res<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated text argument")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> Res<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|e| format!("invalid UTF-8 string: {e}"))?;
        Ok(Value::Str(s.to_string()))
    }

    fn bytes(&mut self, n: usize) -> Res<Value> {
        Ok(Value::Bytes(Rc::from(self.take(n)?)))
    }

    /// Pushes a persistent_load result, remembering storages.
    fn push_loaded(&mut self, v: Value) {
        if let Value::Storage(s) = &v {
            self.storages.push(s.as_ref().clone());
        }
        self.push(v);
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Res<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Res<&Value> {
        self.stack.last().ok_or_else(|| "stack underflow".into())
    }

    /// Pops everything above the most recent MARK, and the mark itself.
    fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let m = self.marks.pop().ok_or("MARK expected but none is open")?;
        if m > self.stack.len() {
            return Err("corrupt MARK".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, i: usize) -> Res<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} is not defined"))
    }

    fn memo_put(&mut self, i: usize) -> Res<()> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn long(bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() > 8 {
            return Value::opaque("integer wider than 64 bits");
        }
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut b = [if negative { 0xff } else { 0 }; 8];
        b[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(b))
    }

    fn append(&mut self, items: Vec<Value>) -> Res<()> {
        match self.top()? {
            Value::List(l) => l.borrow_mut().extend(items),
            Value::Opaque(_) => {}
            other => return Err(format!("APPEND to a {}", other.kind())),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Res<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            Value::Opaque(_) => {}
            other => return Err(format!("SETITEM on a {}", other.kind())),
        }
        Ok(())
    }

    /// Instantiates `cls(*args)` for NEWOBJ / OBJ / INST: dicts stay dicts, the rest is opaque.
    fn new_object(cls: &Value) -> Value {
        match cls {
            Value::Global(g) if is_dict_class(&g.0, &g.1) => Value::new_dict(),
            other => Value::opaque(format!("instance of {}", other.kind())),
        }
    }

    fn step(&mut self) -> Res<Option<Value>> {
        let op = self.u8()?;
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    return Err(format!("unsupported pickle protocol {proto}"));
                }
            }
            0x95 => {
                self.fixed::<8>()?; // FRAME: a length hint only
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'I' => {
                let s = self.line()?;
                let v = match s.as_str() {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    t => Value::Int(t.trim().parse().map_err(|_| format!("invalid INT {t:?}"))?),
                };
                self.push(v);
            }
            b'J' => {
                let v = i32::from_le_bytes(self.fixed()?);
                self.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.fixed()?);
                self.push(Value::Int(v as i64));
            }
            b'L' => {
                let s = self.line()?;
                let t = s.trim_end_matches('L');
                let v = t
                    .parse::<i64>()
                    .map(Value::Int)
                    .unwrap_or_else(|_| Value::opaque("integer wider than 64 bits"));
                self.push(v);
            }
            0x8a => {
                let n = self.u8()? as usize;
                let v = Self::long(self.take(n)?);
                self.push(v);
            }
            0x8b => {
                let n = self.u32_len()?;
                let v = Self::long(self.take(n)?);
                self.push(v);
            }
            b'F' => {
                let s = self.line()?;
                let v = s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("invalid FLOAT {s:?}"))?;
                self.push(Value::Float(v));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.fixed()?);
                self.push(Value::Float(v));
            }
            b'S' => {
                let s = self.line()?;
                let t = s.trim();
                let unquoted = t
                    .get(1..t.len().saturating_sub(1))
                    .filter(|_| t.len() >= 2)
                    .unwrap_or(t);
                self.push(Value::Str(unquoted.to_string()));
            }
            b'V' => {
                let s = self.line()?;
                self.push(Value::Str(s));
            }
            b'T' => {
                let n = self.u32_len()?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b'U' => {
                let n = self.u8()? as usize;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b'X' => {
                let n = self.u32_len()?;
                let v = self.utf8(n)?;
                self.push(v);
            }
            0x8c => {
                let n = self.u8()? as usize;
                let v = self.utf8(n)?;
                self.push(v);
            }
            0x8d => {
                let n = self.u64_len()?;
                let v = self.utf8(n)?;
                self.push(v);
            }
            b'B' => {
                let n = self.u32_len()?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b'C' => {
                let n = self.u8()? as usize;
                let v = self.bytes(n)?;
                self.push(v);
            }
            0x8e | 0x96 => {
                let n = self.u64_len()?;
                let v = self.bytes(n)?;
                self.push(v);
            }
            b']' => self.push(Value::new_list(Vec::new())),
            b'}' => self.push(Value::new_dict()),
            b')' => self.push(Value::tuple(Vec::new())),
            0x8f => self.push(Value::new_list(Vec::new())), // EMPTY_SET, kept as a list
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::new_list(items));
            }
            b'd' => {
                let items = self.pop_mark()?;
                self.push(Value::new_dict());
                self.set_items(items)?;
            }
            b't' | 0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::tuple(items));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.push(Value::Global(Rc::new((m, n)))),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = call(&func, args);
                self.push(v);
            }
            b'b' => {
                // BUILD sets an object's state; nothing we model needs it (OrderedDict
                // carries `_metadata` there), so the state is dropped.
                self.pop()?;
                self.top()?;
            }
            0x81 => {
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.push(Self::new_object(&cls));
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let _args = self.pop()?;
                let cls = self.pop()?;
                self.push(Self::new_object(&cls));
            }
            b'o' => {
                let items = self.pop_mark()?;
                let cls = items.first().ok_or("OBJ without a class")?;
                let v = Self::new_object(cls);
                self.push(v);
            }
            b'i' => {
                let module = self.line()?;
                let name = self.line()?;
                self.pop_mark()?;
                self.push(Self::new_object(&Value::Global(Rc::new((module, name)))));
            }
            b'p' => {
                let s = self.line()?;
                let i = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid PUT index {s:?}"))?;
                self.memo_put(i)?;
            }
            b'q' => {
                let i = self.u8()? as usize;
                self.memo_put(i)?;
            }
            b'r' => {
                let i = self.u32_len()?;
                self.memo_put(i)?;
            }
            0x94 => {
                let i = self.memo.len();
                self.memo_put(i)?;
            }
            b'g' => {
                let s = self.line()?;
                let i = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid GET index {s:?}"))?;
                let v = self.memo_get(i)?;
                self.push(v);
            }
            b'h' => {
                let i = self.u8()? as usize;
                let v = self.memo_get(i)?;
                self.push(v);
            }
            b'j' => {
                let i = self.u32_len()?;
                let v = self.memo_get(i)?;
                self.push(v);
            }
            b'P' => {
                let s = self.line()?;
                let v = persistent_load(&Value::Str(s));
                self.push_loaded(v);
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent_load(&pid);
                self.push_loaded(v);
            }
            other => {
                return Err(format!(
                    "unsupported opcode 0x{other:02x}{} (not one torch.save writes)",
                    if other.is_ascii_graphic() {
                        format!(" ('{}')", other as char)
                    } else {
                        String::new()
                    }
                ))
            }
        }
        Ok(None)
    }
}

fn is_dict_class(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("builtins", "dict")
            | ("__builtin__", "dict")
            | ("collections", "defaultdict")
    )
}

/// REDUCE: `func(*args)` for the callables we understand, an opaque value otherwise.
pub(crate) fn call(func: &Value, args: Value) -> Value {
    let Value::Global(g) = func else {
        return Value::opaque(format!("result of calling {}", func.kind()));
    };
    let (module, name) = (g.0.as_str(), g.1.as_str());
    if is_dict_class(module, name) {
        let dict = Value::new_dict();
        // OrderedDict([(k, v), ...]) keeps its items; defaultdict(factory) has none.
        if let (Value::Dict(d), Some(first)) =
            (&dict, args.items().and_then(|a| a.into_iter().next()))
        {
            if let Some(pairs) = first.items() {
                for p in pairs {
                    if let Some([k, v]) = p.items().as_deref() {
                        d.borrow_mut().push((k.clone(), v.clone()));
                    }
                }
            }
        }
        return dict;
    }
    call_global(module, name, args)
}
