//! Triton's logging extension: `GET` / `POST /v2/logging` and the gRPC `LogSettings` call
//! read and change the process's log level while it serves (turning verbose logs on
//! for a misbehaving deployment without a restart).
//!
//! The settings are Triton's: `log_file`, `log_info`, `log_warnings`, `log_errors`,
//! `log_verbose_level`, `log_format`. Here the levels are thresholds (a level on means
//! every more severe one is on too), verbose level 1 is `debug` and 2 or more `trace`,
//! logs go to standard error (`log_file` must stay empty) in the format the process
//! started with (`default` text lines or `json`, one object per line; fixed while it
//! runs).
//! The process's logger is behind [`LogControl`]: `aperture serve` passes one that
//! reloads its filter (a change replaces `RUST_LOG`'s directives by one level).

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::error::{Result, ServerError};

/// One setting's value as the protocols carry it.
#[derive(Clone, Debug, PartialEq)]
pub enum SettingValue {
    Bool(bool),
    Uint(u32),
    Str(String),
}

/// The most verbose level that is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Triton's log settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LogSettings {
    pub file: String,
    pub info: bool,
    pub warnings: bool,
    pub errors: bool,
    pub verbose_level: u32,
    pub format: String,
}

/// The text format's name (Triton's default).
pub const FORMAT: &str = "default";

impl LogSettings {
    /// The settings that mean `level`.
    pub fn at(level: LogLevel) -> Self {
        Self {
            file: String::new(),
            errors: level >= LogLevel::Error,
            warnings: level >= LogLevel::Warn,
            info: level >= LogLevel::Info,
            verbose_level: match level {
                LogLevel::Trace => 2,
                LogLevel::Debug => 1,
                _ => 0,
            },
            format: FORMAT.to_string(),
        }
    }

    /// The level these settings mean, or why they mean none (a level off while a less
    /// severe one is on, a log file, another format).
    pub fn level(&self) -> Result<LogLevel> {
        if !self.file.is_empty() {
            return Err(ServerError::invalid(format!(
                "log_file {:?}: aperture logs to standard error only (redirect it instead)",
                self.file
            )));
        }
        let on = [
            ("log_errors", self.errors),
            ("log_warnings", self.warnings),
            ("log_info", self.info),
            ("log_verbose_level", self.verbose_level > 0),
        ];
        // Levels are thresholds: once one is off, every less severe one must be off.
        if let Some(i) = on.iter().position(|(_, v)| !v) {
            if let Some((name, _)) = on[i + 1..].iter().find(|(_, v)| *v) {
                return Err(ServerError::invalid(format!(
                    "{name} cannot be on while {} is off: log levels are thresholds here",
                    on[i].0
                )));
            }
        }
        Ok(
            match (self.errors, self.warnings, self.info, self.verbose_level) {
                (_, _, _, v) if v >= 2 => LogLevel::Trace,
                (_, _, _, 1) => LogLevel::Debug,
                (_, _, true, _) => LogLevel::Info,
                (_, true, _, _) => LogLevel::Warn,
                (true, _, _, _) => LogLevel::Error,
                _ => LogLevel::Off,
            },
        )
    }

    /// These settings in the logger's format.
    pub fn with_format(mut self, format: &str) -> Self {
        self.format = format.to_string();
        self
    }

    /// These settings with `changes` applied (unknown names and wrong types refused; the
    /// format cannot change while the process runs).
    pub fn updated(&self, changes: &[(String, SettingValue)]) -> Result<Self> {
        let mut s = self.clone();
        for (name, value) in changes {
            let wrong = |want: &str| {
                ServerError::invalid(format!("log setting {name} takes {want}, got {value:?}"))
            };
            match (name.as_str(), value) {
                ("log_file", SettingValue::Str(v)) => s.file = v.clone(),
                ("log_format", SettingValue::Str(v)) => s.format = v.clone(),
                ("log_info", SettingValue::Bool(v)) => s.info = *v,
                ("log_warnings", SettingValue::Bool(v)) => s.warnings = *v,
                ("log_errors", SettingValue::Bool(v)) => s.errors = *v,
                ("log_verbose_level", SettingValue::Uint(v)) => s.verbose_level = *v,
                ("log_file" | "log_format", _) => return Err(wrong("a string")),
                ("log_info" | "log_warnings" | "log_errors", _) => return Err(wrong("a boolean")),
                ("log_verbose_level", _) => return Err(wrong("an unsigned integer")),
                _ => {
                    return Err(ServerError::invalid(format!(
                        "unknown log setting {name:?} (log_file, log_info, log_warnings, log_errors, log_verbose_level, log_format)"
                    )))
                }
            }
        }
        if s.format != self.format {
            return Err(ServerError::invalid(format!(
                "log_format {:?}: the logger writes {:?} and keeps it while running (choose it at start: aperture --log-format)",
                s.format, self.format
            )));
        }
        s.level()?;
        Ok(s)
    }

    /// Every setting by name, in Triton's order.
    pub fn entries(&self) -> Vec<(&'static str, SettingValue)> {
        vec![
            ("log_file", SettingValue::Str(self.file.clone())),
            ("log_info", SettingValue::Bool(self.info)),
            ("log_warnings", SettingValue::Bool(self.warnings)),
            ("log_errors", SettingValue::Bool(self.errors)),
            ("log_verbose_level", SettingValue::Uint(self.verbose_level)),
            ("log_format", SettingValue::Str(self.format.clone())),
        ]
    }

    /// The HTTP answer: every setting.
    pub fn to_json(&self) -> Value {
        let map: Map<String, Value> = self
            .entries()
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    SettingValue::Bool(b) => json!(b),
                    SettingValue::Uint(u) => json!(u),
                    SettingValue::Str(s) => json!(s),
                };
                (k.to_string(), v)
            })
            .collect();
        Value::Object(map)
    }
}

/// The changes an HTTP body asks for: a JSON object of settings.
pub fn changes_from_json(body: &[u8]) -> Result<Vec<(String, SettingValue)>> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ServerError::invalid(format!("failed to parse the log settings JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ServerError::invalid(
            "the log settings must be a JSON object of settings",
        ));
    };
    map.into_iter()
        .map(|(k, v)| {
            let value = match &v {
                Value::Bool(b) => SettingValue::Bool(*b),
                Value::String(s) => SettingValue::Str(s.clone()),
                Value::Number(n) => match n.as_u64().and_then(|u| u32::try_from(u).ok()) {
                    Some(u) => SettingValue::Uint(u),
                    None => {
                        return Err(ServerError::invalid(format!(
                            "log setting {k}: {n} is not an unsigned 32-bit integer"
                        )))
                    }
                },
                other => {
                    return Err(ServerError::invalid(format!(
                        "log setting {k}: {other} is not a boolean, number or string"
                    )))
                }
            };
            Ok((k, value))
        })
        .collect()
}

/// The process's logger, as the server changes it.
pub trait LogControl: Send + Sync {
    /// The level the logger runs at now.
    fn level(&self) -> LogLevel;
    /// Makes the logger run at `level`.
    fn set_level(&self, level: LogLevel) -> std::result::Result<(), String>;
    /// The format the logger writes (Triton's `log_format`).
    fn format(&self) -> &'static str {
        FORMAT
    }
}

/// A [`LogControl`] in the server's options.
#[derive(Clone)]
pub struct LogHandle(pub Arc<dyn LogControl>);

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogHandle({:?})", self.0.level())
    }
}

/// The settings now, after `changes` (none: a read) are applied to `control`.
pub fn settings(
    control: Option<&LogHandle>,
    changes: &[(String, SettingValue)],
) -> Result<LogSettings> {
    let control = control.ok_or_else(|| {
        ServerError::Unsupported("this server has no log control (log settings unavailable)".into())
    })?;
    let now = || LogSettings::at(control.0.level()).with_format(control.0.format());
    if !changes.is_empty() {
        let wanted = now().updated(changes)?;
        control.0.set_level(wanted.level()?).map_err(|e| {
            ServerError::Internal(format!("the log level could not be changed: {e}"))
        })?;
    }
    Ok(now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(name: &str, v: SettingValue) -> Vec<(String, SettingValue)> {
        vec![(name.to_string(), v)]
    }

    #[test]
    fn levels_round_trip_through_settings() {
        for level in [
            LogLevel::Off,
            LogLevel::Error,
            LogLevel::Warn,
            LogLevel::Info,
            LogLevel::Debug,
            LogLevel::Trace,
        ] {
            assert_eq!(LogSettings::at(level).level().unwrap(), level);
        }
        let mut s = LogSettings::at(LogLevel::Info);
        s.verbose_level = 7;
        assert_eq!(s.level().unwrap(), LogLevel::Trace);
    }

    #[test]
    fn changes_move_the_threshold() {
        let warn = LogSettings::at(LogLevel::Warn);
        let s = warn
            .updated(&change("log_verbose_level", SettingValue::Uint(1)))
            .unwrap_err();
        assert!(
            s.to_string()
                .contains("log_verbose_level cannot be on while log_info is off"),
            "{s}"
        );
        let info = warn
            .updated(&change("log_info", SettingValue::Bool(true)))
            .unwrap();
        assert_eq!(info.level().unwrap(), LogLevel::Info);
        let quiet = info
            .updated(&[
                ("log_info".into(), SettingValue::Bool(false)),
                ("log_warnings".into(), SettingValue::Bool(false)),
            ])
            .unwrap();
        assert_eq!(quiet.level().unwrap(), LogLevel::Error);
    }

    #[test]
    fn bad_names_types_files_and_formats_are_refused() {
        let s = LogSettings::at(LogLevel::Warn);
        let cases = [
            change("log_colour", SettingValue::Bool(true)),
            change("log_info", SettingValue::Uint(1)),
            change("log_verbose_level", SettingValue::Bool(true)),
            change("log_file", SettingValue::Str("/tmp/x.log".into())),
            change("log_format", SettingValue::Str("ISO8601".into())),
            change("log_errors", SettingValue::Bool(false)),
        ];
        for c in cases {
            assert!(s.updated(&c).is_err(), "{c:?} was accepted");
        }
        // Empty file and the one format are accepted as they are.
        assert!(s
            .updated(&[
                ("log_file".into(), SettingValue::Str(String::new())),
                ("log_format".into(), SettingValue::Str(FORMAT.into())),
            ])
            .is_ok());
    }

    #[test]
    fn the_format_is_the_loggers_and_stays() {
        let json = LogSettings::at(LogLevel::Warn).with_format("json");
        assert!(json
            .updated(&change("log_format", SettingValue::Str("json".into())))
            .is_ok());
        let e = json
            .updated(&change("log_format", SettingValue::Str(FORMAT.into())))
            .unwrap_err();
        assert!(e.to_string().contains("keeps it while running"), "{e}");
    }

    #[test]
    fn json_bodies_become_changes() {
        let c = changes_from_json(br#"{"log_verbose_level": 1, "log_info": true, "log_file": ""}"#)
            .unwrap();
        assert!(c.contains(&("log_verbose_level".into(), SettingValue::Uint(1))));
        assert!(c.contains(&("log_info".into(), SettingValue::Bool(true))));
        assert!(c.contains(&("log_file".into(), SettingValue::Str(String::new()))));
        for bad in [
            &b"[1]"[..],
            b"{\"log_verbose_level\": -1}",
            b"{\"log_info\": null}",
            b"{",
        ] {
            assert!(changes_from_json(bad).is_err());
        }
    }

    #[test]
    fn the_json_answer_names_every_setting() {
        let v = LogSettings::at(LogLevel::Debug).to_json();
        assert_eq!(
            v,
            json!({"log_file": "", "log_info": true, "log_warnings": true, "log_errors": true,
                   "log_verbose_level": 1, "log_format": "default"})
        );
    }

    struct Fake(std::sync::Mutex<LogLevel>);
    impl LogControl for Fake {
        fn level(&self) -> LogLevel {
            *self.0.lock().unwrap()
        }
        fn set_level(&self, level: LogLevel) -> std::result::Result<(), String> {
            *self.0.lock().unwrap() = level;
            Ok(())
        }
    }

    #[test]
    fn settings_read_and_change_the_control() {
        let h = LogHandle(Arc::new(Fake(std::sync::Mutex::new(LogLevel::Warn))));
        assert_eq!(
            settings(Some(&h), &[]).unwrap(),
            LogSettings::at(LogLevel::Warn)
        );
        let s = settings(Some(&h), &change("log_info", SettingValue::Bool(true))).unwrap();
        assert_eq!(s, LogSettings::at(LogLevel::Info));
        assert_eq!(h.0.level(), LogLevel::Info);
        // A refused change leaves the level alone.
        assert!(settings(Some(&h), &change("log_errors", SettingValue::Bool(false))).is_err());
        assert_eq!(h.0.level(), LogLevel::Info);
        assert!(settings(None, &[]).is_err());
    }
}
