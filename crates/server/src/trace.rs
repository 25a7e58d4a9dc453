//! Triton's trace extension: which requests get traced (server-wide settings, and per
//! model overrides of the level, rate and count), the timestamps of a traced request,
//! and the trace file (Triton's JSON layout, so its trace tools read it).
//!
//! Timestamps recorded: REQUEST_START and REQUEST_END (the request inside the server,
//! image decoding included), QUEUE_START (queued for the batcher), COMPUTE_START,
//! COMPUTE_INPUT_END, COMPUTE_OUTPUT_START and COMPUTE_END (its batch: inputs gathered,
//! the model run, outputs split), in nanoseconds since the Unix epoch.
//!
//! Where the traces go is fixed when the server starts (`--trace-file`): the API may
//! change what is traced but never point the server at another path. With
//! `log_frequency` 0 the traces are written to that file at shutdown (or to
//! `${trace_file}.${idx}` every [`MAX_BUFFERED`] traces, so that memory stays bounded);
//! with `log_frequency` N, to `${trace_file}.${idx}` every N traces; when `trace_count`
//! runs out, what is collected goes to the next indexed file at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::error::{Result, ServerError};

/// Traces held in memory at most before they are written, whatever `log_frequency` says.
pub const MAX_BUFFERED: usize = 65_536;

/// Server-wide trace settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSettings {
    /// `trace_level` TIMESTAMPS (else OFF).
    pub timestamps: bool,
    /// Trace one request in `rate`.
    pub rate: u64,
    /// Traces left to take; -1: no limit.
    pub count: i64,
    /// Write every `log_frequency` traces to an indexed file; 0: at shutdown.
    pub log_frequency: u64,
    /// Where traces go (set at start only); None: tracing cannot be turned on.
    pub file: Option<PathBuf>,
}

impl Default for TraceSettings {
    /// Triton's defaults: off, one request in 1,000, no limit, written at shutdown.
    fn default() -> Self {
        Self {
            timestamps: false,
            rate: 1000,
            count: -1,
            log_frequency: 0,
            file: None,
        }
    }
}

impl TraceSettings {
    /// Every setting as the protocol carries it: a list for `trace_level`, one string for
    /// the others.
    pub fn entries(&self) -> Vec<(&'static str, Vec<String>)> {
        let level = if self.timestamps { "TIMESTAMPS" } else { "OFF" };
        let file = self
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        vec![
            ("trace_file", vec![file]),
            ("trace_level", vec![level.to_string()]),
            ("trace_rate", vec![self.rate.to_string()]),
            ("trace_count", vec![self.count.to_string()]),
            ("log_frequency", vec![self.log_frequency.to_string()]),
            ("trace_mode", vec!["triton".to_string()]),
        ]
    }

    /// The HTTP answer: `trace_level` an array, the rest strings.
    pub fn to_json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .entries()
            .into_iter()
            .map(|(k, v)| {
                let value = match (k, v.as_slice()) {
                    ("trace_level", _) => json!(v),
                    (_, [one]) => json!(one),
                    _ => json!(v),
                };
                (k.to_string(), value)
            })
            .collect();
        Value::Object(map)
    }
}

/// One requested change: new values for a setting, or none (back to the server's value
/// for a model, to the value set at start for the server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceChange {
    pub name: String,
    pub values: Option<Vec<String>>,
}

/// Parses an HTTP trace-setting body: `{"trace_rate": "10", "trace_level": ["TIMESTAMPS"],
/// "trace_count": null, ...}` (numbers are taken as well as strings).
pub fn changes_from_json(body: &[u8]) -> Result<Vec<TraceChange>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::invalid(format!("trace settings are not valid JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(ServerError::invalid(
            "trace settings must be a JSON object of setting names to values",
        ));
    };
    map.into_iter()
        .map(|(name, value)| {
            let scalar = |v: &Value| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(ServerError::invalid(format!(
                    "trace setting {name} must be a string or an array of strings, got {other}"
                ))),
            };
            let values = match &value {
                Value::Null => None,
                Value::Array(items) => Some(items.iter().map(scalar).collect::<Result<_>>()?),
                v => Some(vec![scalar(v)?]),
            };
            Ok(TraceChange { name, values })
        })
        .collect()
}

/// A model's own values (None: the server's).
#[derive(Clone, Debug, Default)]
struct Overrides {
    timestamps: Option<bool>,
    rate: Option<u64>,
    count: Option<i64>,
}

/// The timestamps of one traced request, shared with the batcher that runs it.
#[derive(Debug, Default)]
pub struct Stamps(Mutex<Vec<(&'static str, Instant)>>);

impl Stamps {
    pub fn mark(&self, name: &'static str) {
        self.mark_at(name, Instant::now());
    }

    pub fn mark_at(&self, name: &'static str, at: Instant) {
        lock(&self.0).push((name, at));
    }

    /// The marks so far, earliest first.
    pub fn in_order(&self) -> Vec<(&'static str, Instant)> {
        let mut marks = lock(&self.0).clone();
        marks.sort_by_key(|&(_, at)| at);
        marks
    }
}

/// A request being traced: hand [`ActiveTrace::stamps`] to the batcher, then give it
/// back to [`Tracer::finish`].
pub struct ActiveTrace {
    id: u64,
    model: String,
    version: u64,
    request_id: String,
    stamps: Arc<Stamps>,
    /// The trace that took the last of `trace_count`: written out at once.
    last: bool,
}

impl ActiveTrace {
    pub fn stamps(&self) -> Arc<Stamps> {
        self.stamps.clone()
    }

    pub fn mark(&self, name: &'static str) {
        self.stamps.mark(name);
    }
}

/// When a request started and finished arriving, under its protocol's names
/// (HTTP_RECV_START / _END, GRPC_WAITREAD_START / _END): Triton's trace tools group
/// traces by these.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub names: (&'static str, &'static str),
    pub start: Instant,
    pub end: Instant,
}

/// The instant a gRPC request's head arrived (set by an interceptor, before its message
/// is read).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

struct State {
    global: TraceSettings,
    /// The settings given at start (what clearing a server setting returns to).
    initial: TraceSettings,
    models: HashMap<String, Overrides>,
    /// Requests seen per model (the sampling counters).
    seen: HashMap<String, u64>,
    /// Trace objects not written yet: two per trace (its model, its timestamps).
    pending: Vec<Value>,
    next_index: u64,
    next_id: u64,
}

/// Everything the trace extension keeps for a server.
pub struct Tracer {
    state: Mutex<State>,
    /// Some level is TIMESTAMPS (the server's or a model's): while false, requests pass
    /// without taking the lock.
    on: AtomicBool,
    /// A fixed pair of clocks: timestamps are monotonic and read as epoch nanoseconds.
    base: Instant,
    base_ns: u128,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An integer setting value (one string), at least `min`.
fn integer(name: &str, values: &[String], min: i64) -> Result<i64> {
    let [one] = values else {
        return Err(ServerError::invalid(format!(
            "trace setting {name} takes one value, got {}",
            values.len()
        )));
    };
    one.trim()
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= min)
        .ok_or_else(|| {
            ServerError::invalid(format!(
                "trace setting {name} must be an integer >= {min}, got {one:?}"
            ))
        })
}

/// `trace_level` values: OFF alone, or TIMESTAMPS (TENSORS is not traced here).
fn level(values: &[String]) -> Result<bool> {
    let upper: Vec<String> = values.iter().map(|v| v.trim().to_uppercase()).collect();
    if upper.iter().any(|v| v == "TENSORS") {
        return Err(ServerError::Unsupported(
            "trace level TENSORS is not supported; TIMESTAMPS and OFF are".into(),
        ));
    }
    if let Some(bad) = upper.iter().find(|v| *v != "OFF" && *v != "TIMESTAMPS") {
        return Err(ServerError::invalid(format!(
            "unknown trace level {bad:?} (expected OFF or TIMESTAMPS)"
        )));
    }
    match (
        upper.iter().any(|v| v == "OFF"),
        upper.iter().any(|v| v == "TIMESTAMPS"),
    ) {
        (true, true) => Err(ServerError::invalid(
            "trace level OFF cannot be combined with another level",
        )),
        (_, timestamps) => Ok(timestamps),
    }
}

impl Tracer {
    pub fn new(settings: TraceSettings) -> Self {
        let base_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self {
            on: AtomicBool::new(settings.timestamps),
            state: Mutex::new(State {
                initial: settings.clone(),
                global: settings,
                models: HashMap::new(),
                seen: HashMap::new(),
                pending: Vec::new(),
                next_index: 0,
                next_id: 1,
            }),
            base: Instant::now(),
            base_ns,
        }
    }

    /// Applies `changes` (all or none) to the server's settings, or to `model`'s, and
    /// returns the settings in force there afterwards.
    pub fn settings(&self, model: Option<&str>, changes: &[TraceChange]) -> Result<TraceSettings> {
        let mut st = lock(&self.state);
        let mut global = st.global.clone();
        let mut own = model
            .map(|m| st.models.get(m).cloned().unwrap_or_default())
            .unwrap_or_default();
        for c in changes {
            let values = c.values.as_deref().filter(|v| !v.is_empty());
            match (c.name.as_str(), values, model) {
                ("trace_file", Some(v), _) => {
                    let current = global.file.as_ref().map(|p| p.display().to_string());
                    if v.len() != 1 || current.as_deref() != Some(v[0].as_str()) {
                        return Err(ServerError::invalid(
                            "trace_file is set when the server starts (--trace-file) and cannot be changed through the API",
                        ));
                    }
                }
                ("trace_file", None, _) => {}
                ("log_frequency", _, Some(_)) => {
                    return Err(ServerError::invalid(
                        "log_frequency applies to the server's trace file: set it without a model name",
                    ))
                }
                ("log_frequency", Some(v), None) => {
                    global.log_frequency = integer("log_frequency", v, 0)? as u64
                }
                ("log_frequency", None, None) => global.log_frequency = st.initial.log_frequency,
                ("trace_level", v, m) => {
                    let value = v.map(level).transpose()?;
                    match m {
                        Some(_) => own.timestamps = value,
                        None => global.timestamps = value.unwrap_or(st.initial.timestamps),
                    }
                }
                ("trace_rate", v, m) => {
                    let value = v.map(|v| integer("trace_rate", v, 1)).transpose()?;
                    let value = value.map(|r| r as u64);
                    match m {
                        Some(_) => own.rate = value,
                        None => global.rate = value.unwrap_or(st.initial.rate),
                    }
                }
                ("trace_count", v, m) => {
                    let value = v.map(|v| integer("trace_count", v, -1)).transpose()?;
                    match m {
                        Some(_) => own.count = value,
                        None => global.count = value.unwrap_or(st.initial.count),
                    }
                }
                ("trace_mode", Some(v), _) if v.len() == 1 && v[0] == "triton" => {}
                ("trace_mode", None, _) => {}
                (name, _, _) => {
                    return Err(ServerError::invalid(format!(
                        "unknown trace setting {name:?} (trace_file, trace_level, trace_rate, trace_count, log_frequency)"
                    )))
                }
            }
        }
        let turned_on = global.timestamps || own.timestamps == Some(true);
        if turned_on && global.file.is_none() {
            return Err(ServerError::invalid(
                "tracing needs a trace file: start the server with --trace-file PATH",
            ));
        }
        st.global = global;
        if let Some(m) = model {
            st.models.insert(m.to_string(), own);
        }
        let on = st.global.timestamps || st.models.values().any(|o| o.timestamps == Some(true));
        self.on.store(on, Ordering::Relaxed);
        Ok(effective(&st, model))
    }

    /// Starts a trace for a request of `model` when the sampling says so.
    pub fn start(&self, model: &str, version: u64, request_id: &str) -> Option<ActiveTrace> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = lock(&self.state);
        let own = st.models.get(model);
        let timestamps = own
            .and_then(|o| o.timestamps)
            .unwrap_or(st.global.timestamps);
        let rate = own.and_then(|o| o.rate).unwrap_or(st.global.rate);
        let count = own.and_then(|o| o.count).unwrap_or(st.global.count);
        if !timestamps || st.global.file.is_none() || count == 0 {
            return None;
        }
        let seen = match st.seen.get_mut(model) {
            Some(seen) => seen,
            None => st.seen.entry(model.to_string()).or_insert(0),
        };
        *seen += 1;
        if !(*seen).is_multiple_of(rate) {
            return None;
        }
        // The count belongs to whoever set it: the model's own, or the server's.
        let own_count = st.models.get(model).and_then(|o| o.count).is_some();
        let left = if own_count {
            st.models.get_mut(model).and_then(|o| o.count.as_mut())
        } else {
            Some(&mut st.global.count)
        };
        let mut last = false;
        if let Some(left) = left.filter(|c| **c > 0) {
            *left -= 1;
            last = *left == 0;
        }
        let id = st.next_id;
        st.next_id += 1;
        Some(ActiveTrace {
            id,
            model: model.to_string(),
            version,
            request_id: request_id.to_string(),
            stamps: Arc::new(Stamps::default()),
            last,
        })
    }

    /// Records a finished trace, writing out what is due.
    pub fn finish(&self, trace: ActiveTrace) {
        let timestamps: Vec<Value> = trace
            .stamps
            .in_order()
            .iter()
            .map(|&(name, at)| json!({ "name": name, "ns": self.epoch_ns(at) }))
            .collect();
        let mut st = lock(&self.state);
        st.pending.push(json!({
            "id": trace.id,
            "model_name": trace.model,
            "model_version": trace.version,
            "request_id": trace.request_id,
        }));
        st.pending
            .push(json!({ "id": trace.id, "timestamps": timestamps }));
        let traces = st.pending.len() / 2;
        let frequency = st.global.log_frequency as usize;
        let due = trace.last || (frequency > 0 && traces >= frequency) || traces >= MAX_BUFFERED;
        if due {
            let out = take_indexed(&mut st);
            drop(st);
            if let Some((path, objects)) = out {
                write_traces(path, &objects);
            }
        }
    }

    /// Writes what is still held: to the trace file itself with `log_frequency` 0, else
    /// to the next indexed file. Call once at shutdown.
    pub fn flush(&self) {
        let mut st = lock(&self.state);
        if st.pending.is_empty() {
            return;
        }
        let out = if st.global.log_frequency == 0 && st.next_index == 0 {
            st.global
                .file
                .clone()
                .map(|p| (p, std::mem::take(&mut st.pending)))
        } else {
            take_indexed(&mut st)
        };
        drop(st);
        if let Some((path, objects)) = out {
            write_traces(path, &objects);
        }
    }

    fn epoch_ns(&self, at: Instant) -> u64 {
        let ns = self.base_ns + at.saturating_duration_since(self.base).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// The settings in force for `model` (the server's where it has none of its own).
fn effective(st: &State, model: Option<&str>) -> TraceSettings {
    let mut s = st.global.clone();
    if let Some(o) = model.and_then(|m| st.models.get(m)) {
        s.timestamps = o.timestamps.unwrap_or(s.timestamps);
        s.rate = o.rate.unwrap_or(s.rate);
        s.count = o.count.unwrap_or(s.count);
    }
    s
}

/// The held traces and the next indexed file for them.
fn take_indexed(st: &mut State) -> Option<(PathBuf, Vec<Value>)> {
    let file = st.global.file.clone()?;
    let mut name = file.into_os_string();
    name.push(format!(".{}", st.next_index));
    st.next_index += 1;
    Some((PathBuf::from(name), std::mem::take(&mut st.pending)))
}

/// Writes one JSON array of trace objects; a failure is logged (the traces are lost, the
/// server goes on).
fn write_traces(path: PathBuf, objects: &[Value]) {
    let text = Value::Array(objects.to_vec()).to_string();
    match std::fs::write(&path, text) {
        Ok(()) => {
            tracing::info!(path = %path.display(), objects = objects.len(), "trace file written")
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not write the trace file")
        }
    }
}

#[cfg(test)]
mod tests;
