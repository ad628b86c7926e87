#![no_main]
//! safetensors header parsing must never panic. (Fuzzes the safetensors crate directly until surgeon-formats
//! has its own safetensors wrapper.)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = safetensors::SafeTensors::read_metadata(data);
    let _ = safetensors::SafeTensors::deserialize(data);
});
