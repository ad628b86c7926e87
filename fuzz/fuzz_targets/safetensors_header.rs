#![no_main]
//! surgeon's safetensors header parser must never panic, whatever the bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = surgeon_formats::safetensors_file::parse_header(std::path::Path::new("<fuzz>"), data);
});
