//! An incremental `text/event-stream` parser.
//!
//! Written here rather than taken from a crate because a proxy needs control a generic client
//! does not give: it reads upstream bodies chunk by chunk as they arrive, must bound the memory
//! one event may take (a hostile upstream can send an endless line), and only needs the fields
//! MCP uses (`event`, `data`, `id`). Line endings may be `\n`, `\r\n` or `\r`, as the HTML
//! specification allows.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// `message` when the stream named none.
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// The stream broke the size limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an event exceeded {limit} bytes")]
pub struct TooLarge {
    pub limit: usize,
}

/// Feeds bytes in, takes events out.
#[derive(Debug)]
pub struct EventParser {
    limit: usize,
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` that starts the next chunk belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
    /// The reconnection time the stream asked for, in milliseconds.
    retry: Option<u64>,
    pending_bytes: usize,
}

impl EventParser {
    /// `limit` bounds the bytes of one event (its lines together).
    pub fn new(limit: usize) -> Self {
        EventParser {
            limit,
            line: Vec::new(),
            after_cr: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            id: None,
            retry: None,
            pending_bytes: 0,
        }
    }

    /// The last event id the stream set (kept across events, as the specification says): what
    /// a reconnection sends as `Last-Event-ID`.
    pub fn last_event_id(&self) -> Option<&str> {
        self.id.as_deref().filter(|id| !id.is_empty())
    }

    /// The reconnection delay the stream asked for (`retry:`), in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Parses `chunk`, appending every completed event to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), TooLarge> {
        for &byte in chunk {
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => {
                    self.line.push(byte);
                    self.pending_bytes += 1;
                    if self.pending_bytes > self.limit {
                        return Err(TooLarge { limit: self.limit });
                    }
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<Event>) {
        if self.line.is_empty() {
            if self.has_data {
                let event = if self.event.is_empty() { "message".to_string() } else { std::mem::take(&mut self.event) };
                out.push(Event { event, data: std::mem::take(&mut self.data), id: self.id.clone() });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            self.pending_bytes = 0;
            return;
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &str, piece: usize) -> Vec<Event> {
        let mut parser = EventParser::new(1 << 20);
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(piece) {
            parser.feed(chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn events_survive_any_chunking_and_line_ending() {
        for ending in ["\n", "\r\n", "\r"] {
            let input = [
                "event: endpoint",
                "data: /messages?id=1",
                "",
                ": keep-alive",
                "",
                "id: 7",
                "data: {\"a\":",
                "data: 1}",
                "",
                "",
            ]
            .join(ending);
            for piece in [1, 2, 3, 7, input.len()] {
                let events = parse_in_pieces(&input, piece);
                assert_eq!(
                    events,
                    vec![
                        Event { event: "endpoint".into(), data: "/messages?id=1".into(), id: None },
                        Event { event: "message".into(), data: "{\"a\":\n1}".into(), id: Some("7".into()) },
                    ],
                    "ending {ending:?}, piece {piece}"
                );
            }
        }
    }

    #[test]
    fn an_event_without_data_is_not_dispatched() {
        assert!(parse_in_pieces("event: ping\n\n", 4).is_empty());
    }

    #[test]
    fn the_last_event_id_and_the_retry_delay_are_kept_for_a_reconnection() {
        let mut parser = EventParser::new(1 << 10);
        let mut out = Vec::new();
        parser.feed(b"id: e-1\nretry: 250\ndata:\n\n", &mut out).unwrap();
        assert_eq!((parser.last_event_id(), parser.retry()), (Some("e-1"), Some(250)));
        parser.feed(b"data: {}\n\nretry: soon\n\n", &mut out).unwrap();
        assert_eq!((parser.last_event_id(), parser.retry()), (Some("e-1"), Some(250)), "kept; a bad retry is ignored");
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut parser = EventParser::new(16);
        let mut out = Vec::new();
        assert_eq!(parser.feed(&[b'x'; 17], &mut out), Err(TooLarge { limit: 16 }));
        let mut parser = EventParser::new(16);
        assert!(parser.feed(b"data: 0123456\n\ndata: 0123456\n\n", &mut out).is_ok());
        assert_eq!(out.len(), 2);
    }
}
