//! The process's logger: `RUST_LOG`'s filter (default `warn`) behind a reload handle, so
//! that `aperture serve`'s log settings (Triton's logging extension) can change the level
//! while the server runs.

use std::sync::{Arc, OnceLock};

use aperture_server::logging::{LogControl, LogHandle, LogLevel};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static HANDLE: OnceLock<FilterHandle> = OnceLock::new();

/// Installs the logger (standard error; colour codes only for a terminal, so log files
/// and collectors get plain text).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let (filter, handle) = reload::Layer::new(filter);
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok()
    {
        let _ = HANDLE.set(handle);
    }
}

/// The installed logger's level control (None before [`init`]).
pub fn control() -> Option<LogHandle> {
    HANDLE
        .get()
        .map(|h| LogHandle(Arc::new(Reloadable(h.clone()))))
}

/// A level control over a reloadable filter: reading gives the filter's most verbose
/// level, setting replaces the filter (and any per-target directives) by one level.
struct Reloadable(FilterHandle);

impl LogControl for Reloadable {
    fn level(&self) -> LogLevel {
        // A filter that cannot say (per-span directives) may let anything through.
        let hint = self.0.with_current(|f| f.max_level_hint()).ok().flatten();
        match hint.unwrap_or(LevelFilter::TRACE) {
            LevelFilter::OFF => LogLevel::Off,
            LevelFilter::ERROR => LogLevel::Error,
            LevelFilter::WARN => LogLevel::Warn,
            LevelFilter::INFO => LogLevel::Info,
            LevelFilter::DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }

    fn set_level(&self, level: LogLevel) -> Result<(), String> {
        let directive = match level {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        };
        self.0
            .reload(EnvFilter::new(directive))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_filter_changes_what_is_logged() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("warn"));
        let subscriber = tracing_subscriber::registry().with(filter);
        let control = Reloadable(handle);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(control.level(), LogLevel::Warn);
            assert!(tracing::enabled!(tracing::Level::WARN));
            assert!(!tracing::enabled!(tracing::Level::INFO));
            control.set_level(LogLevel::Debug).unwrap();
            assert_eq!(control.level(), LogLevel::Debug);
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            assert!(!tracing::enabled!(tracing::Level::TRACE));
            control.set_level(LogLevel::Off).unwrap();
            assert_eq!(control.level(), LogLevel::Off);
            assert!(!tracing::enabled!(tracing::Level::ERROR));
        });
    }

    #[test]
    fn per_target_directives_report_their_most_verbose_level() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("warn,aperture_cuda=debug"));
        let _subscriber = tracing_subscriber::registry().with(filter);
        assert_eq!(Reloadable(handle).level(), LogLevel::Debug);
    }
}
