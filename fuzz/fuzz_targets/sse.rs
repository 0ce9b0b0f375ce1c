//! The SSE parser: any byte stream, cut into chunks anywhere, gives the same events as the same
//! bytes in one chunk, and no event exceeds the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflow_data_plane::upstream::event_stream::EventParser;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else { return };
    let mut whole = EventParser::new(LIMIT);
    let mut expected = Vec::new();
    let whole_result = whole.feed(body, &mut expected);
    let mut chunked = EventParser::new(LIMIT);
    let mut got = Vec::new();
    let mut chunked_result = Ok(());
    for chunk in body.chunks(usize::from(cut % 16) + 1) {
        chunked_result = chunked.feed(chunk, &mut got);
        if chunked_result.is_err() {
            break;
        }
    }
    assert_eq!(whole_result.is_err(), chunked_result.is_err());
    if whole_result.is_ok() {
        assert_eq!(expected, got);
        assert!(expected.iter().all(|e| e.data.len() <= LIMIT));
    }
});
