//! One chat session driven by an arbitrary script of byte chunks, message
//! batches, timers and EMQX replies (see
//! `exproto_protocol::chat::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    exproto_protocol::chat::fuzz::run_session(data);
});
