//! Framer, parser, commands and escapes on arbitrary bytes: decode,
//! re-encode, decode again (see `exproto_protocol::chat::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    exproto_protocol::chat::fuzz::decode_line(data);
});
