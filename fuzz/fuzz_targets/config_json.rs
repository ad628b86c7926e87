#![no_main]
//! config.json: any bytes must parse into an architecture or fail with an error, never panic; an
//! accepted architecture must also be writable back as config.json.
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(arch) = surgeon_formats::config::parse_config(Path::new("<fuzz>"), &value) {
        let _ = arch.num_layers();
        let _ = surgeon_formats::config::config_json(&arch, surgeon_formats::DType::F32);
    }
});
