#![no_main]
//! tokenizer.json: surgeon's reader (style detection, adding tokens) and the tokenizer it builds must
//! fail with an error on bad input, never panic.
use libfuzzer_sys::fuzz_target;
use surgeon_formats::tokenizer_extend as tk;

fuzz_target!(|data: &[u8]| {
    if tk::detect_style(data).is_err() {
        return;
    }
    if let Ok(ids) = tk::encode(data, "Hello, world! Привіт 123") {
        let _ = tk::decode(data, &ids);
    }
    let _ = tk::add_tokens(data, &["zqx".to_string(), " hello".to_string()]);
});
