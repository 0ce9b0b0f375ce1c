//! Logging for every role: `RUST_LOG` (or `logging.level`) decides what is written, as text or
//! JSON, to stderr.
//!
//! Lines are handed to a writer thread rather than written by the thread that logs: the data
//! plane writes an audit line for every call, and a `write` system call per line on the
//! request path costs more than the rest of the line. The writer never drops a line (when it
//! falls behind, logging waits), and what is queued is flushed when the returned guard drops.

use crate::config::{Config, ConfigError, LogFormat};

/// Keeps the writer thread; dropping it flushes what is queued.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Starts logging to stderr.
pub fn init(config: &Config) -> Result<LogGuard, ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| ConfigError::new("RUST_LOG", e.to_string()))?
        }
        _ => tracing_subscriber::EnvFilter::try_new(&config.logging.level)
            .map_err(|e| ConfigError::new("logging.level", e.to_string()))?,
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("reflow-log")
        // The writer thread flushes whenever it has drained the queue: under load, many lines
        // leave in one write.
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(colours);
    let result = match config.logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| ConfigError::new("logging", e.to_string()))?;
    Ok(guard)
}
