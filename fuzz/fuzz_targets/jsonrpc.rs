//! JSON-RPC classification: any body a client can send is classified or refused, never a panic,
//! and classifying is stable (a classified request classifies again the same way).
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflow_data_plane::jsonrpc::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(Message::Request { id, method, params }) = Message::classify(value) {
        let again = reflow_data_plane::jsonrpc::request(id.clone(), &method, params.clone());
        assert_eq!(Message::classify(again), Ok(Message::Request { id, method, params }));
    }
});
