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

static HANDLE: OnceLock<(FilterHandle, LogFormat)> = OnceLock::new();

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text lines (colour codes only for a terminal).
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

impl LogFormat {
    /// The name the logging extension reports (`log_format`).
    fn name(self) -> &'static str {
        match self {
            LogFormat::Text => aperture_server::logging::FORMAT,
            LogFormat::Json => "json",
        }
    }
}

/// Installs the logger on standard error.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour codes only for a terminal: files and collectors get plain text.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    if installed.is_ok() {
        let _ = HANDLE.set((handle, format));
    }
}

/// The installed logger's level control (None before [`init`]).
pub fn control() -> Option<LogHandle> {
    HANDLE.get().map(|(h, format)| {
        LogHandle(Arc::new(Reloadable {
            filter: h.clone(),
            format: *format,
        }))
    })
}

/// A level control over a reloadable filter: reading gives the filter's most verbose
/// level, setting replaces the filter (and any per-target directives) by one level.
struct Reloadable {
    filter: FilterHandle,
    format: LogFormat,
}

impl LogControl for Reloadable {
    fn level(&self) -> LogLevel {
        // A filter that cannot say (per-span directives) may let anything through.
        let hint = self
            .filter
            .with_current(|f| f.max_level_hint())
            .ok()
            .flatten();
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
        self.filter
            .reload(EnvFilter::new(directive))
            .map_err(|e| e.to_string())
    }

    fn format(&self) -> &'static str {
        self.format.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_filter_changes_what_is_logged() {
        let (filter, handle) = reload::Layer::new(EnvFilter::new("warn"));
        let subscriber = tracing_subscriber::registry().with(filter);
        let control = Reloadable {
            filter: handle,
            format: LogFormat::Json,
        };
        assert_eq!(control.format(), "json");
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
        let control = Reloadable {
            filter: handle,
            format: LogFormat::Text,
        };
        assert_eq!(control.level(), LogLevel::Debug);
        assert_eq!(control.format(), "default");
    }
}
