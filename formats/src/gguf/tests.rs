//! Tests of the GGUF reader: synthetic files (round trip, every malformed case, mutation smoke), the gguf-py
//! dequantisation goldens, and the real SmolLM2 model (run `scripts/fetch-smollm2.sh` first).

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::*;

// ---------------------------------------------------------------------------------------------------------
// A tiny GGUF writer for tests.

#[derive(Clone)]
struct TestTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    /// Relative offset override (otherwise packed with alignment).
    offset: Option<u64>,
}

#[derive(Clone)]
struct Builder {
    version: u32,
    alignment: u64,
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<TestTensor>,
    tensor_count_override: Option<u64>,
}

fn gstr(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn garr(elem_type: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut v = elem_type.to_le_bytes().to_vec();
    v.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for i in items {
        v.extend_from_slice(i);
    }
    v
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
            tensor_count_override: None,
        }
    }

    fn kv(mut self, key: &str, type_id: u32, payload: Vec<u8>) -> Self {
        self.kv.push((key.to_string(), type_id, payload));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(TestTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            data,
            offset: None,
        });
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let n_t = self
            .tensor_count_override
            .unwrap_or(self.tensors.len() as u64);
        out.extend_from_slice(&n_t.to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, t, p) in &self.kv {
            out.extend_from_slice(&gstr(k));
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(p);
        }
        let mut rel = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            let off = t.offset.unwrap_or(rel);
            offsets.push(off);
            rel = off
                .saturating_add(t.data.len() as u64)
                .div_ceil(self.alignment)
                .saturating_mul(self.alignment);
            out.extend_from_slice(&gstr(&t.name));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        let start = (out.len() as u64).div_ceil(self.alignment) * self.alignment;
        out.resize(start as usize, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            // Hostile offsets (tests of out-of-bounds tensors) get no data.
            let at = match start.checked_add(off) {
                Some(at) if at < 1 << 32 => at as usize,
                _ => continue,
            };
            if out.len() < at + t.data.len() {
                out.resize(at + t.data.len(), 0);
            }
            out[at..at + t.data.len()].copy_from_slice(&t.data);
        }
        out
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small valid file with metadata of every type and three tensors.
fn sample() -> Builder {
    let q8: Vec<u8> = {
        let mut b = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        b
    };
    Builder::new()
        .kv("general.architecture", 8, gstr("llama"))
        .kv("t.u8", 0, vec![200])
        .kv("t.i8", 1, vec![0xfe])
        .kv("t.u16", 2, 60000u16.to_le_bytes().to_vec())
        .kv("t.i16", 3, (-300i16).to_le_bytes().to_vec())
        .kv("t.u32", 4, 4_000_000_000u32.to_le_bytes().to_vec())
        .kv("t.i32", 5, (-7i32).to_le_bytes().to_vec())
        .kv("t.f32", 6, 1.5f32.to_le_bytes().to_vec())
        .kv("t.bool", 7, vec![1])
        .kv("t.u64", 10, (1u64 << 40).to_le_bytes().to_vec())
        .kv("t.i64", 11, (-(1i64 << 40)).to_le_bytes().to_vec())
        .kv("t.f64", 12, 2.25f64.to_le_bytes().to_vec())
        .kv("t.strs", 9, garr(8, &[gstr("a"), gstr("bc"), gstr("")]))
        .kv(
            "t.ints",
            9,
            garr(
                5,
                &[1i32.to_le_bytes().to_vec(), (-2i32).to_le_bytes().to_vec()],
            ),
        )
        .kv(
            "t.nested",
            9,
            garr(9, &[garr(4, &[5u32.to_le_bytes().to_vec()]), garr(4, &[])]),
        )
        .tensor(
            "a.weight",
            &[3, 2],
            0,
            f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        )
        .tensor("q.weight", &[32], 8, q8)
        .tensor("e.weight", &[0, 4], 1, vec![])
}

fn parse_err(b: &[u8]) -> GgufError {
    match GgufFile::parse(b) {
        Ok(_) => panic!("malformed file parsed"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Synthetic files.

#[test]
fn synthetic_round_trip() {
    for version in [2u32, 3] {
        let mut b = sample();
        b.version = version;
        let f = GgufFile::parse(&b.build()).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
        let m = f.metadata();
        assert_eq!(m["t.u8"], GgufValue::U8(200));
        assert_eq!(m["t.i8"], GgufValue::I8(-2));
        assert_eq!(m["t.u16"], GgufValue::U16(60000));
        assert_eq!(m["t.i16"], GgufValue::I16(-300));
        assert_eq!(m["t.u32"], GgufValue::U32(4_000_000_000));
        assert_eq!(m["t.i32"], GgufValue::I32(-7));
        assert_eq!(m["t.f32"], GgufValue::F32(1.5));
        assert_eq!(m["t.bool"], GgufValue::Bool(true));
        assert_eq!(m["t.u64"], GgufValue::U64(1 << 40));
        assert_eq!(m["t.i64"], GgufValue::I64(-(1 << 40)));
        assert_eq!(m["t.f64"], GgufValue::F64(2.25));
        assert_eq!(
            m["t.nested"],
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::U32(5)]),
                GgufValue::Array(vec![])
            ])
        );
        assert_eq!(f.get_u64("t.u32").unwrap(), Some(4_000_000_000));
        assert_eq!(f.get_f64("t.f32").unwrap(), Some(1.5));
        assert_eq!(f.get_bool("t.bool").unwrap(), Some(true));
        assert_eq!(
            f.get_str_array("t.strs").unwrap(),
            Some(vec!["a", "bc", ""])
        );
        assert_eq!(f.get_i32_array("t.ints").unwrap(), Some(vec![1, -2]));
        assert_eq!(f.get_u64("missing").unwrap(), None);
        let e = f.get_str("t.u8").unwrap_err();
        assert_eq!(
            e.to_string(),
            "<memory>: metadata key `t.u8` should be string, found u8"
        );
        let e = f.get_u64("t.i32").unwrap_err();
        assert!(e.to_string().contains("`t.i32`"), "{e}");

        let t = f.tensors();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].name, "a.weight");
        assert_eq!(t[0].dims, vec![3, 2]);
        assert_eq!(t[0].hf_shape(), vec![2, 3]);
        assert_eq!(t[0].ggml_type, GgmlType::F32);
        assert_eq!(t[0].offset % 32, 0);
        assert_eq!(t[0].offset, f.data_start());
        assert_eq!(t[0].byte_len, 24);
        assert_eq!(
            f.dequantize_tensor(&t[0]).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(t[1].ggml_type, GgmlType::Q8_0);
        assert_eq!(t[1].byte_len, 34);
        assert_eq!(t[1].offset, f.data_start() + 32);
        let q = f.dequantize_tensor(&t[1]).unwrap();
        assert_eq!(
            q,
            (0..32)
                .map(|i| (i as f32 - 16.0) * 0.25)
                .collect::<Vec<_>>()
        );
        assert_eq!(f.tensor_bytes(&t[1]).len(), 34);
        assert_eq!(t[2].n_elements(), 0);
        assert!(f.dequantize_tensor(&t[2]).unwrap().is_empty());
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let b = Builder {
        alignment: 64,
        ..Builder::new()
    }
    .kv("general.alignment", 4, 64u32.to_le_bytes().to_vec())
    .tensor("x", &[2], 0, f32_bytes(&[1.0, 2.0]))
    .tensor("y", &[1], 0, f32_bytes(&[3.0]));
    let f = GgufFile::parse(&b.build()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_start() % 64, 0);
    assert_eq!(f.tensors()[1].offset, f.data_start() + 64);
    assert_eq!(f.dequantize_tensor(&f.tensors()[1]).unwrap(), vec![3.0]);
}

#[test]
fn malformed_headers() {
    let good = sample().build();

    let mut b = good.clone();
    b[0] = b'X';
    let e = parse_err(&b);
    assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    assert!(
        e.to_string().starts_with("<memory>: not a GGUF file"),
        "{e}"
    );

    for v in [1u32, 4, 0x0300_0000] {
        let mut s = sample();
        s.version = v;
        let e = parse_err(&s.build());
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{e}"
        );
    }

    // Absurd tensor count.
    let mut s = sample();
    s.tensor_count_override = Some(1 << 60);
    let e = parse_err(&s.build());
    assert!(matches!(e, GgufError::AbsurdCount { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("tensor count is 1152921504606846976"),
        "{e}"
    );

    // Absurd metadata count.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = parse_err(&b);
    assert!(matches!(e, GgufError::AbsurdCount { .. }), "{e}");

    // Absurd string length in a value.
    let mut v = (u64::MAX - 3).to_le_bytes().to_vec();
    v.extend_from_slice(b"abc");
    let e = parse_err(&Builder::new().kv("general.name", 8, v).build());
    assert!(matches!(e, GgufError::AbsurdLength { .. }), "{e}");
    assert!(e.to_string().contains("`general.name`"), "{e}");

    // Absurd array length.
    let mut v = 4u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u64 << 62).to_le_bytes());
    let e = parse_err(&Builder::new().kv("big.array", 9, v).build());
    assert!(matches!(e, GgufError::AbsurdCount { .. }), "{e}");
    assert!(e.to_string().contains("`big.array`"), "{e}");

    // Unknown value type, also as array element type.
    let e = parse_err(&Builder::new().kv("odd", 13, vec![0; 8]).build());
    assert!(
        matches!(e, GgufError::InvalidValueType { type_id: 13, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("`odd`"), "{e}");
    let e = parse_err(&Builder::new().kv("odd.arr", 9, garr(77, &[])).build());
    assert!(
        matches!(e, GgufError::InvalidValueType { type_id: 77, .. }),
        "{e}"
    );

    // Bad bool, deep nesting, duplicate key, bad alignment.
    let e = parse_err(&Builder::new().kv("b", 7, vec![2]).build());
    assert!(matches!(e, GgufError::InvalidValue { .. }), "{e}");
    let mut deep = garr(4, &[]);
    for _ in 0..20 {
        deep = garr(9, &[deep]);
    }
    let e = parse_err(&Builder::new().kv("deep", 9, deep).build());
    assert!(e.to_string().contains("nested deeper"), "{e}");
    let e = parse_err(
        &Builder::new()
            .kv("k", 0, vec![1])
            .kv("k", 0, vec![2])
            .build(),
    );
    assert!(matches!(e, GgufError::DuplicateKey { .. }), "{e}");
    let e = parse_err(
        &Builder::new()
            .kv("general.alignment", 4, 24u32.to_le_bytes().to_vec())
            .build(),
    );
    assert!(e.to_string().contains("general.alignment"), "{e}");
}

#[test]
fn malformed_tensors() {
    // Dims whose product overflows.
    let e = parse_err(
        &Builder::new()
            .tensor("huge", &[1 << 33, 1 << 33, 1 << 33], 0, vec![])
            .build(),
    );
    assert!(matches!(e, GgufError::BadTensor { .. }), "{e}");
    assert!(e.to_string().contains("tensor `huge`"), "{e}");
    assert!(e.to_string().contains("overflows"), "{e}");

    // Too many dims.
    let e = parse_err(&Builder::new().tensor("t5", &[1; 5], 0, vec![]).build());
    assert!(e.to_string().contains("5 dimensions"), "{e}");

    // Unknown ggml type (and a removed one).
    for id in [4u32, 99] {
        let e = parse_err(&Builder::new().tensor("w", &[32], id, vec![0; 32]).build());
        assert!(
            matches!(e, GgufError::UnknownGgmlType { type_id, .. } if type_id == id),
            "{e}"
        );
        assert!(e.to_string().contains("tensor `w`"), "{e}");
    }

    // Row not a whole number of blocks.
    let e = parse_err(&Builder::new().tensor("odd", &[31], 2, vec![0; 18]).build());
    assert!(
        e.to_string()
            .contains("not a multiple of the Q4_0 block size 32"),
        "{e}"
    );

    // Misaligned offset.
    let mut b = Builder::new().tensor("mis", &[1], 0, vec![0; 4]);
    b.tensors[0].offset = Some(4);
    let e = parse_err(&b.build());
    assert!(
        matches!(
            e,
            GgufError::MisalignedOffset {
                offset: 4,
                alignment: 32,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("tensor `mis`"), "{e}");

    // Offset or size beyond the file.
    let mut b = Builder::new().tensor("far", &[4], 0, vec![0; 16]);
    b.tensors[0].offset = Some(1 << 20);
    let mut bytes = b.build();
    bytes.truncate(bytes.len() - (1 << 20));
    let e = parse_err(&bytes);
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    assert!(e.to_string().contains("tensor `far`"), "{e}");
    let mut bytes = Builder::new().tensor("cut", &[8], 0, vec![1; 32]).build();
    bytes.truncate(bytes.len() - 1);
    let e = parse_err(&bytes);
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    let mut b = Builder::new().tensor("wrap", &[4], 0, vec![0; 16]);
    b.tensors[0].offset = Some(u64::MAX - 31);
    let e = parse_err(&b.build());
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");

    // Duplicate tensor.
    let e = parse_err(
        &Builder::new()
            .tensor("d", &[1], 0, vec![0; 4])
            .tensor("d", &[1], 0, vec![0; 4])
            .build(),
    );
    assert!(matches!(e, GgufError::DuplicateTensor { .. }), "{e}");

    // An unsupported (but known) type parses; dequantising it names the tensor.
    let f = GgufFile::parse(&Builder::new().tensor("iq", &[256], 16, vec![0; 66]).build()).unwrap();
    let e = f.dequantize_tensor(&f.tensors()[0]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<memory>: tensor `iq`: cannot dequantize IQ2_XXS: dequantisation of IQ2_XXS is not supported"
    );
}

#[test]
fn every_truncation_is_an_error() {
    let good = sample().build();
    for len in 0..good.len() {
        let e = parse_err(&good[..len]);
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. }
                    | GgufError::AbsurdLength { .. }
                    | GgufError::AbsurdCount { .. }
                    | GgufError::TensorOutOfBounds { .. }
            ),
            "len {len}: {e}"
        );
        assert!(e.to_string().starts_with("<memory>: "), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }
    // Truncation inside a metadata value names the key.
    let one = Builder::new()
        .kv("general.architecture", 8, gstr("llama"))
        .build();
    let cut = 24 + 8 + "general.architecture".len() + 4 + 8 + 2;
    let e = parse_err(&one[..cut]);
    assert!(
        matches!(
            e,
            GgufError::AbsurdLength {
                len: 5,
                available: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("`general.architecture`"), "{e}");
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    let mut b = sample().build();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = GgufFile::open(&p).unwrap_err();
    assert!(
        e.to_string()
            .contains("broken.gguf: unsupported GGUF version 9"),
        "{e}"
    );
    let e = GgufFile::open(dir.path().join("absent.gguf")).unwrap_err();
    assert!(
        matches!(e, GgufError::Io { .. }) && e.to_string().contains("absent.gguf"),
        "{e}"
    );
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err();
    assert!(
        matches!(e, GgufError::Truncated { .. })
            && e.to_string()
                .contains("empty.gguf: truncated while reading magic"),
        "{e}"
    );
    let good = dir.path().join("good.gguf");
    std::fs::write(&good, sample().build()).unwrap();
    let f = GgufFile::open(&good).unwrap();
    assert_eq!(f.path(), Some(good.as_path()));
    assert_eq!(f.tensors().len(), 3);
}

/// Deterministic mutation smoke test (stands in for fuzzing where cargo-fuzz is unavailable): truncations,
/// byte flips and overwritten length fields of a valid file must give errors or files, never panics.
#[test]
fn mutation_smoke() {
    let good = sample().build();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut ok = 0;
    for i in 0..4000 {
        let mut b = good.clone();
        let n_mut = 1 + (next() % 4) as usize;
        for _ in 0..n_mut {
            let at = (next() as usize) % b.len();
            match next() % 4 {
                0 => b[at] ^= 1 << (next() % 8),
                1 => b[at] = next() as u8,
                2 => {
                    let end = (at + 8).min(b.len());
                    let v = [0xff, 0x00, 0x7f, 0x80][(next() % 4) as usize];
                    b[at..end].fill(v);
                }
                _ => b.truncate(at.max(1)),
            }
        }
        if i % 7 == 0 {
            b.truncate((next() as usize) % (b.len() + 1));
        }
        if let Ok(f) = GgufFile::parse(&b) {
            ok += 1;
            for t in f.tensors() {
                let _ = f.dequantize_tensor(t);
            }
        }
    }
    assert!(
        ok > 0,
        "no mutant parsed at all: mutations too aggressive to be useful"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Goldens.

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("fixtures")
        .join("gguf")
        .join(name)
}

fn read_json(name: &str) -> serde_json::Value {
    let p = fixture(name);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap()
}

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for chunk in v.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn type_by_name(n: &str) -> GgmlType {
    (0..64)
        .filter_map(GgmlType::from_id)
        .find(|t| t.to_string() == n)
        .unwrap_or_else(|| panic!("unknown type {n}"))
}

fn first16(v: &[f32]) -> Vec<f32> {
    v.iter().take(16).copied().collect()
}

/// JSON numbers written by Python (exact decimal expansions of f32 values) read back as f32. (serde_json's
/// default f64 parsing may be off by an f64 ulp; rounding to f32 removes that.)
fn json_f64s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Every supported type, on random blocks, equals gguf-py bitwise.
#[test]
fn synthetic_quant_goldens() {
    let g = read_json("synthetic_quants.json");
    let mut seen = Vec::new();
    for case in g["cases"].as_array().unwrap() {
        let ty = type_by_name(case["type"].as_str().unwrap());
        let raw = from_hex(case["hex"].as_str().unwrap());
        let n = case["n_elements"].as_u64().unwrap() as usize;
        let f = dequantize(ty, &raw, n).unwrap();
        assert_eq!(first16(&f), json_f64s(&case["first"]), "{ty}");
        assert_eq!(sha256_f32(&f), case["sha256"].as_str().unwrap(), "{ty}");
        seen.push(ty);
    }
    for t in (0..64).filter_map(GgmlType::from_id) {
        if dequant::is_supported(t) && t != GgmlType::Q8_K {
            assert!(seen.contains(&t), "no golden for {t}");
        }
    }
}

fn smollm2() -> GgufFile {
    let p = smollm2_gguf_path().unwrap_or_else(|e| panic!("{e}"));
    GgufFile::open(&p).unwrap()
}

#[test]
fn smollm2_hyper_and_names() {
    let f = smollm2();
    let h = LlamaHyper::from_gguf(&f).unwrap();
    assert_eq!(h.architecture, "llama");
    assert_eq!(h.block_count, 30);
    assert_eq!(h.head_count, 9);
    assert_eq!(h.head_count_kv, 3);
    assert_eq!(h.embedding_length, 576);
    assert_eq!(h.feed_forward_length, 1536);
    assert_eq!(h.vocab_size, 49152);
    assert_eq!(h.rope_freq_base, 100000.0);
    assert_eq!(h.rope_dimension_count, 64);
    assert_eq!(h.head_dim(), 64);
    assert_eq!(h.rms_norm_eps, 1e-5f32 as f64);
    assert_eq!(h.context_length, Some(8192));
    assert_eq!((h.bos_token_id, h.eos_token_id), (Some(1), Some(2)));
    assert_eq!((h.pad_token_id, h.unk_token_id), (Some(2), Some(0)));
    assert_eq!((h.expert_count, h.expert_used_count), (None, None));
    assert!(h.tie_word_embeddings);
    assert!(f.tensor("output.weight").is_none());
    assert_eq!(f.tensors().len(), 272);

    let mut params = 0u64;
    let mut names = std::collections::BTreeSet::new();
    for t in f.tensors() {
        let hf = hf_tensor_name(&t.name).unwrap();
        assert!(!hf.stacked_experts);
        assert!(names.insert(hf.name.clone()), "{}", hf.name);
        params += t.n_elements();
    }
    assert_eq!(params, 134_515_008);
    assert!(names.contains("model.embed_tokens.weight"));
    assert!(names.contains("model.layers.29.mlp.down_proj.weight"));
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.hf_shape(), vec![576, 576]);
    let k = f.tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!(k.hf_shape(), vec![192, 576]);
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().hf_shape(),
        vec![49152, 576]
    );
}

#[test]
fn smollm2_dequant_goldens() {
    use rayon::prelude::*;
    let f = smollm2();
    let g = read_json("smollm2_dequant.json");
    let golden = g["tensors"].as_array().unwrap();
    assert_eq!(golden.len(), f.tensors().len());
    let failures: Vec<String> = f
        .tensors()
        .par_iter()
        .zip(golden.par_iter())
        .filter_map(|(t, g)| {
            assert_eq!(t.name, g["name"].as_str().unwrap());
            assert_eq!(t.ggml_type.to_string(), g["type"].as_str().unwrap());
            let dims: Vec<u64> = g["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(t.dims, dims, "{}", t.name);
            let v = f.dequantize_tensor(t).unwrap();
            if first16(&v) != json_f64s(&g["first"])
                || sha256_f32(&v) != g["sha256"].as_str().unwrap()
            {
                Some(format!("{} ({})", t.name, t.ggml_type))
            } else {
                None
            }
        })
        .collect();
    assert!(
        failures.is_empty(),
        "dequantisation differs from gguf-py: {failures:?}"
    );
}

/// Our un-permuted q/k weights equal what transformers' GGUF loader produces.
#[test]
fn smollm2_rope_unpermutation_matches_transformers() {
    let f = smollm2();
    let h = LlamaHyper::from_gguf(&f).unwrap();
    let g = read_json("smollm2_rope.json");
    for t in g["tensors"].as_array().unwrap() {
        let hf = t["name"].as_str().unwrap();
        let (layer, proj) = {
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (l, r) = rest.split_once('.').unwrap();
            (
                l.to_string(),
                if r.contains("q_proj") {
                    "attn_q"
                } else {
                    "attn_k"
                },
            )
        };
        let info = f.tensor(&format!("blk.{layer}.{proj}.weight")).unwrap();
        let map = hf_tensor_name(&info.name).unwrap();
        assert_eq!(map.name, hf);
        let shape = info.hf_shape();
        let expected_shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, expected_shape);
        let mut v = f.dequantize_tensor(info).unwrap();
        assert_ne!(
            sha256_f32(&v),
            t["sha256"].as_str().unwrap(),
            "permutation is a no-op?"
        );
        let heads = map.rope_heads(&h).unwrap();
        names::unpermute_rope_rows(&mut v, shape[0], shape[1], heads).unwrap();
        assert_eq!(first16(&v), json_f64s(&t["first"]), "{hf}");
        assert_eq!(sha256_f32(&v), t["sha256"].as_str().unwrap(), "{hf}");
    }
}

#[test]
fn smollm2_tokenizer_matches_reference() {
    let f = smollm2();
    let files = build_hf_tokenizer(&f).unwrap();
    let tok =
        <tokenizers::Tokenizer as std::str::FromStr>::from_str(&files.tokenizer_json).unwrap();
    let text = std::fs::read_to_string(fixture("tokenizer_text.txt")).unwrap();
    let g = read_json("tokenizer_ids.json");
    let want: Vec<u32> = g["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let enc = tok.encode(text.as_str(), false).unwrap();
    assert_eq!(enc.get_ids(), want.as_slice());
    let want_special: Vec<u32> = g["ids_with_special_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let enc = tok.encode(text.as_str(), true).unwrap();
    assert_eq!(enc.get_ids(), want_special.as_slice());
    assert_eq!(tok.decode(&want, false).unwrap(), text);
    assert_eq!(tok.get_vocab_size(true), 49152);

    let j: serde_json::Value = serde_json::from_str(&files.tokenizer_json).unwrap();
    assert_eq!(j["pre_tokenizer"]["pretokenizers"][0]["type"], "Digits");
    assert_eq!(j["added_tokens"].as_array().unwrap().len(), 17);
    assert_eq!(j["added_tokens"][1]["content"], "<|im_start|>");
    assert_eq!(j["added_tokens"][1]["special"], true);
    let digits = tok.encode("x 1234567", false).unwrap();
    assert_eq!(
        digits.get_tokens()[2..],
        ["1", "2", "3", "4", "5", "6", "7"]
    );

    let cfg: serde_json::Value = serde_json::from_str(&files.tokenizer_config_json).unwrap();
    assert_eq!(cfg["tokenizer_class"], "GPT2Tokenizer");
    assert_eq!(cfg["add_bos_token"], false);
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["pad_token"], "<|im_end|>");
    assert_eq!(cfg["unk_token"], "<|endoftext|>");
    assert_eq!(cfg["model_max_length"], 8192);
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(cfg["added_tokens_decoder"]["2"]["content"], "<|im_end|>");
    let sm: serde_json::Value = serde_json::from_str(&files.special_tokens_map_json).unwrap();
    assert_eq!(sm["eos_token"], "<|im_end|>");
}

/// A tiny SentencePiece-style (`tokenizer.ggml.model = llama`) vocabulary builds a loadable tokenizer with
/// metaspace, merges from scores, byte fallback and a BOS post-processor.
#[test]
fn spm_tokenizer_builds_and_encodes() {
    let mut toks: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        toks.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for t in [
        "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
        "▁wor", "ld", "▁world",
    ] {
        toks.push(t.to_string());
        types.push(1);
    }
    let scores: Vec<Vec<u8>> = toks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let s = if i < 259 {
                0.0
            } else {
                t.chars().count() as f32 * 1.0 - i as f32 * 0.001
            };
            s.to_le_bytes().to_vec()
        })
        .collect();
    let b = Builder::new()
        .kv("general.architecture", 8, gstr("llama"))
        .kv("tokenizer.ggml.model", 8, gstr("llama"))
        .kv(
            "tokenizer.ggml.tokens",
            9,
            garr(8, &toks.iter().map(|t| gstr(t)).collect::<Vec<_>>()),
        )
        .kv("tokenizer.ggml.scores", 9, garr(6, &scores))
        .kv(
            "tokenizer.ggml.token_type",
            9,
            garr(
                5,
                &types
                    .iter()
                    .map(|t| t.to_le_bytes().to_vec())
                    .collect::<Vec<_>>(),
            ),
        )
        .kv(
            "tokenizer.ggml.bos_token_id",
            4,
            1u32.to_le_bytes().to_vec(),
        )
        .kv(
            "tokenizer.ggml.eos_token_id",
            4,
            2u32.to_le_bytes().to_vec(),
        )
        .kv(
            "tokenizer.ggml.unknown_token_id",
            4,
            0u32.to_le_bytes().to_vec(),
        );
    let f = GgufFile::parse(&b.build()).unwrap();
    let files = build_hf_tokenizer(&f).unwrap();
    let tok =
        <tokenizers::Tokenizer as std::str::FromStr>::from_str(&files.tokenizer_json).unwrap();
    let enc = tok.encode("hello world!", true).unwrap();
    assert_eq!(enc.get_tokens(), ["<s>", "▁hello", "▁world", "<0x21>"]);
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hello world!");
    let cfg: serde_json::Value = serde_json::from_str(&files.tokenizer_config_json).unwrap();
    assert_eq!(cfg["tokenizer_class"], "LlamaTokenizer");
    assert_eq!(cfg["add_bos_token"], true);
    assert_eq!(cfg["bos_token"], "<s>");
}

#[test]
fn tokenizer_errors_name_the_key() {
    let b = Builder::new()
        .kv("tokenizer.ggml.model", 8, gstr("gpt2"))
        .kv("tokenizer.ggml.tokens", 9, garr(8, &[gstr("a"), gstr("b")]))
        .kv("tokenizer.ggml.merges", 9, garr(8, &[gstr("a b")]))
        .kv("tokenizer.ggml.pre", 8, gstr("martian"));
    let f = GgufFile::parse(&b.build()).unwrap();
    let e = build_hf_tokenizer(&f).unwrap_err();
    assert!(
        e.to_string().contains("`tokenizer.ggml.pre`") && e.to_string().contains("martian"),
        "{e}"
    );
    let f = GgufFile::parse(
        &Builder::new()
            .kv("general.architecture", 8, gstr("gemma"))
            .build(),
    )
    .unwrap();
    let e = LlamaHyper::from_gguf(&f).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<memory>: unsupported architecture `gemma` (supported: llama, qwen3, qwen3moe, phi3, gemma2, gemma3)"
    );
}

/// A llama GGUF header with `block_count` and one tiny f32 tensor per block in `blocks`.
fn llama_with_blocks(block_count: u32, blocks: &[u32], eps: f32) -> GgufFile {
    let mut b = Builder::new()
        .kv("general.architecture", 8, gstr("llama"))
        .kv("llama.block_count", 4, block_count.to_le_bytes().to_vec())
        .kv("llama.embedding_length", 4, 8u32.to_le_bytes().to_vec())
        .kv("llama.feed_forward_length", 4, 16u32.to_le_bytes().to_vec())
        .kv("llama.attention.head_count", 4, 2u32.to_le_bytes().to_vec())
        .kv("llama.vocab_size", 4, 10u32.to_le_bytes().to_vec())
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            6,
            eps.to_le_bytes().to_vec(),
        );
    for i in blocks {
        b = b.tensor(
            &format!("blk.{i}.attn_norm.weight"),
            &[8],
            0,
            f32_bytes(&[1.0; 8]),
        );
    }
    GgufFile::parse(&b.build()).unwrap()
}

/// Fuzzing found this: a corrupt `block_count` of billions made the check build the set
/// 0..block_count and abort on a 34 GB allocation. Now it is the usual one-line error.
#[test]
fn absurd_block_count_is_an_error_not_an_allocation() {
    let e = LlamaHyper::from_gguf(&llama_with_blocks(u32::MAX, &[0, 1], 1e-5))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "<memory>: metadata key `llama.block_count`: says 4294967295 blocks but the file has \
         tensors for 2 blocks (blk.0 .. blk.1)"
    );
    // Right count, wrong blocks: two blocks, but blk.0 and blk.2.
    let e = LlamaHyper::from_gguf(&llama_with_blocks(2, &[0, 2], 1e-5))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("says 2 blocks but the file has tensors for 2 blocks (blk.0 .. blk.2)"),
        "{e}"
    );
    let e = LlamaHyper::from_gguf(&llama_with_blocks(1, &[], 1e-5))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("says 1 blocks but the file has no block tensors"),
        "{e}"
    );
}

#[test]
fn block_count_mismatch_is_one_line_naming_the_key() {
    let e = LlamaHyper::from_gguf(&llama_with_blocks(1000, &[0, 1], 1e-5))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "<memory>: metadata key `llama.block_count`: says 1000 blocks but the file has tensors \
         for 2 blocks (blk.0 .. blk.1)"
    );
    let e = LlamaHyper::from_gguf(&llama_with_blocks(1, &[0, 1], 1e-5))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("says 1 blocks but the file has tensors for 2 blocks"),
        "{e}"
    );
    assert!(LlamaHyper::from_gguf(&llama_with_blocks(2, &[0, 1], 1e-5)).is_ok());
    let e = LlamaHyper::from_gguf(&llama_with_blocks(2, &[0, 1], -1.0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`llama.attention.layer_norm_rms_epsilon`: must be in (0, 1), got -1"),
        "{e}"
    );
}
