//! Logging for every role: `RUST_LOG` (or `logging.level`) decides what is written, as text or
//! JSON, to stderr.
//!
//! The data plane writes an audit line for every call, and a `write` system call per line on
//! the request path costs more than the rest of the line; handing each line to a writer thread
//! costs as much again in wake-ups. So lines are appended to a shared buffer, and a flusher
//! thread writes the buffer out every [`FLUSH_EVERY`]. A line is never dropped: a buffer that
//! grows past [`FLUSH_AT`] is written out by the thread that filled it, and dropping the
//! returned guard writes what is left. What a crash can lose is at most the last
//! [`FLUSH_EVERY`] of lines.
//!
//! Every line is one line: control characters anywhere in it (a tool name, a header, an error
//! an upstream sent) are escaped before it is buffered, so no value can forge a log line or
//! send terminal escapes. Colours are off for the same reason (they are escapes too).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::{Config, ConfigError, LogFormat};

/// How often buffered lines are written out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this large is written out at once.
pub const FLUSH_AT: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Buffer {
    lines: Mutex<(Vec<u8>, bool)>,
    /// Wakes the flusher early to stop.
    stop: Condvar,
}

impl Buffer {
    /// Writes out what is buffered. The stderr lock is taken before the buffer is released,
    /// so lines leave in the order they were logged whoever writes them out.
    fn flush(&self) {
        let mut lines = self.lines.lock().unwrap();
        if lines.0.is_empty() {
            return;
        }
        let taken = std::mem::take(&mut lines.0);
        let mut stderr = std::io::stderr().lock();
        drop(lines);
        let _ = stderr.write_all(&taken);
        let _ = stderr.flush();
    }
}

/// What `tracing-subscriber` writes each line to.
#[derive(Debug, Clone)]
struct BufferedStderr(Arc<Buffer>);

/// Appends `line` to `out` with its control characters escaped: ASCII controls (`\n`, `\r`,
/// `\u00XX`; tabs are kept), DEL, and the Unicode line breaks NEL, LINE SEPARATOR and
/// PARAGRAPH SEPARATOR (`\u0085`, `\u2028`, `\u2029`). A final `\n` ends the line and stays.
/// The escapes are valid JSON string escapes, so JSON lines stay JSON.
pub fn escape_line(line: &[u8], out: &mut Vec<u8>) {
    let (body, end) = match line.split_last() {
        Some((b'\n', body)) => (body, true),
        _ => (line, false),
    };
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            0xc2 if body.get(i + 1) == Some(&0x85) => {
                out.extend_from_slice(b"\\u0085");
                i += 1;
            }
            0xe2 if body.get(i + 1) == Some(&0x80) && matches!(body.get(i + 2), Some(0xa8 | 0xa9)) => {
                out.extend_from_slice(if body[i + 2] == 0xa8 { b"\\u2028" } else { b"\\u2029" });
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    if end {
        out.push(b'\n');
    }
}

impl Write for BufferedStderr {
    /// `tracing-subscriber` writes each event whole, in one call: the bytes are one line.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut lines = self.0.lines.lock().unwrap();
        escape_line(bytes, &mut lines.0);
        // Full, or the flusher has stopped (tasks still log while the process shuts down).
        let now = lines.0.len() >= FLUSH_AT || lines.1;
        drop(lines);
        if now {
            self.0.flush();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BufferedStderr {
    type Writer = BufferedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Keeps the flusher running; dropping it writes out what is buffered.
#[derive(Debug)]
pub struct LogGuard {
    buffer: Arc<Buffer>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.buffer.lines.lock().unwrap().1 = true;
        self.buffer.stop.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        self.buffer.flush();
    }
}

/// Starts logging to stderr.
pub fn init(config: &Config) -> Result<LogGuard, ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => {
            tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| ConfigError::new("RUST_LOG", e.to_string()))?
        }
        _ => tracing_subscriber::EnvFilter::try_new(&config.logging.level)
            .map_err(|e| ConfigError::new("logging.level", e.to_string()))?,
    };
    let buffer = Arc::new(Buffer::default());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(BufferedStderr(buffer.clone())).with_ansi(false);
    let result = match config.logging.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| ConfigError::new("logging", e.to_string()))?;
    let flusher = {
        let buffer = buffer.clone();
        std::thread::Builder::new()
            .name("reflow-log".into())
            .spawn(move || loop {
                let mut lines = buffer.lines.lock().unwrap();
                if !lines.1 {
                    lines = buffer.stop.wait_timeout(lines, FLUSH_EVERY).unwrap().0;
                }
                let stopping = lines.1;
                drop(lines);
                buffer.flush();
                if stopping {
                    return;
                }
            })
            .map_err(|e| ConfigError::new("logging", format!("cannot start the log flusher: {e}")))?
    };
    Ok(LogGuard { buffer, flusher: Some(flusher) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_in_order_and_a_full_buffer_is_written_out_by_its_writer() {
        let buffer = Arc::new(Buffer::default());
        let mut writer = BufferedStderr(buffer.clone());
        writer.write_all(b"first\n").unwrap();
        writer.write_all(b"second\n").unwrap();
        assert_eq!(buffer.lines.lock().unwrap().0, b"first\nsecond\n");
        writer.write_all(&vec![b'x'; FLUSH_AT]).unwrap();
        assert!(buffer.lines.lock().unwrap().0.is_empty(), "written out, not kept growing");
    }

    #[test]
    fn control_characters_cannot_forge_lines() {
        let mut out = Vec::new();
        let forged = "tool=evil\n2026-01-01 INFO reflow::audit allowed=true\r\x1b[2K\u{2028}\u{85}\u{2029}\0\tend\n";
        escape_line(forged.as_bytes(), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "tool=evil\\n2026-01-01 INFO reflow::audit allowed=true\\r\\u001b[2K\\u2028\\u0085\\u2029\\u0000\tend\n"
        );
        assert_eq!(text.matches('\n').count(), 1, "one line");
        // Escaped JSON stays JSON.
        let mut out = Vec::new();
        escape_line("{\"name\":\"a\u{2028}b\"}\n".as_bytes(), &mut out);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["name"], "a\u{2028}b");
        // Text other than controls is untouched, multi-byte characters included.
        let mut out = Vec::new();
        escape_line("héllo — ✓\n".as_bytes(), &mut out);
        assert_eq!(out, "héllo — ✓\n".as_bytes());
    }

    #[test]
    fn a_logged_field_with_a_newline_stays_on_its_line() {
        let buffer = Arc::new(Buffer::default());
        let subscriber =
            tracing_subscriber::fmt().with_writer(BufferedStderr(buffer.clone())).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(name = %"evil\nINFO forged line", "policy decision");
        });
        let text = String::from_utf8(buffer.lines.lock().unwrap().0.clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("evil\\nINFO forged line"), "{text}");
    }
}
