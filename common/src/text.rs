//! Small text and time helpers every role shares.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Cuts `text` to at most `max` bytes on a character boundary, keeping the end (where the
/// reason for a failure usually is), marked with a leading `…`.
pub fn keep_tail(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    *text = format!("…{}", &text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_kept_on_a_character_boundary() {
        let mut text = "ééé failed: disk full".to_string();
        keep_tail(&mut text, 12);
        assert_eq!(text, "…d: disk full");
        let mut short = "ok".to_string();
        keep_tail(&mut short, 12);
        assert_eq!(short, "ok");
        let mut wide = "éééé".to_string();
        keep_tail(&mut wide, 3);
        assert_eq!(wide, "…é");
    }
}
