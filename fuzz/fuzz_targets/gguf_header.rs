#![no_main]
//! Any byte string must parse or fail with an error, never panic; parsed tensors must dequantise or fail.
use libfuzzer_sys::fuzz_target;
use surgeon_formats::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::parse(data) {
        for t in f.tensors() {
            if t.byte_len <= 1 << 20 {
                let _ = f.dequantize_tensor(t);
            }
        }
        let _ = surgeon_formats::gguf::LlamaHyper::from_gguf(&f);
        let _ = surgeon_formats::gguf::build_hf_tokenizer(&f);
    }
});
