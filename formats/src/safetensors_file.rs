//! Reading safetensors files: a validated header over a memory map, never the whole file in RAM.
//!
//! We parse the header ourselves (it is a JSON object) rather than through `safetensors::SafeTensors`
//! so every error can name the tensor at fault.
use crate::{DType, Error, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Largest header we accept (the safetensors crate uses the same bound).
const MAX_HEADER: usize = 100_000_000;

/// A memory-mapped source file that plan entries point into.
pub struct SourceFile {
    pub path: PathBuf,
    /// Name shown in plans (the file name, relative to the model directory).
    pub display_name: String,
    pub file: File,
    pub mmap: Mmap,
}

impl std::fmt::Debug for SourceFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceFile({})", self.path.display())
    }
}

impl SourceFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: the map is read-only; we never modify inputs and assume no one else truncates them
        // while we run (the same assumption every mmap-based checkpoint loader makes).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(SourceFile {
            path: path.to_path_buf(),
            display_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            file,
            mmap,
        })
    }
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}

/// One tensor as described by a safetensors header; `offset` is absolute within the file.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// A parsed safetensors header.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Header {
    pub tensors: Vec<StoredTensor>,
    pub metadata: BTreeMap<String, String>,
    /// Bytes before the data section (8 + header length).
    pub data_start: usize,
}

/// Parses and validates the header of a safetensors file held in `bytes`.
/// `path` is used in error messages only.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let (json, data_start) = header_json(path, bytes)?;
    let obj = json
        .as_object()
        .ok_or_else(|| Error::format(path, "header is not a JSON object"))?;
    let data_len = bytes.len() - data_start;
    let mut header = Header {
        data_start,
        ..Default::default()
    };
    for (name, info) in obj {
        if name == "__metadata__" {
            read_metadata(info, &mut header.metadata);
            continue;
        }
        header
            .tensors
            .push(tensor_entry(path, name, info, data_start, data_len)?);
    }
    check_no_overlap(path, &header.tensors)?;
    header.tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(header)
}

/// The header's JSON and where the data section starts (8 + header length), after checking that the
/// length fits in the file and under [`MAX_HEADER`].
fn header_json(path: &Path, bytes: &[u8]) -> Result<(serde_json::Value, usize)> {
    let fail = |m: String| Error::format(path, m);
    if bytes.len() < 8 {
        return Err(fail(format!(
            "truncated safetensors file: {} bytes, not even a header length",
            bytes.len()
        )));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n as u128 + 8 > bytes.len() as u128 {
        return Err(fail(format!(
            "header length {n} runs beyond the end of the file ({} bytes)",
            bytes.len()
        )));
    }
    let n = n as usize;
    if n > MAX_HEADER {
        return Err(fail(format!(
            "header length {n} exceeds the limit of {MAX_HEADER}"
        )));
    }
    let text = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|e| fail(format!("header is not UTF-8: {e}")))?;
    // Writers pad the header with trailing spaces to align the data section.
    let json = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| fail(format!("header is not JSON: {e}")))?;
    Ok((json, 8 + n))
}

/// The `__metadata__` entries; non-string values are kept as their JSON text.
fn read_metadata(info: &serde_json::Value, metadata: &mut BTreeMap<String, String>) {
    if let Some(m) = info.as_object() {
        for (k, v) in m {
            let v = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            metadata.insert(k.clone(), v);
        }
    }
}

/// One tensor's header entry, checked: a supported dtype, a shape, and data offsets inside the data
/// section (`data_len` bytes from `data_start`) spanning exactly the bytes the shape needs.
fn tensor_entry(
    path: &Path,
    name: &str,
    info: &serde_json::Value,
    data_start: usize,
    data_len: usize,
) -> Result<StoredTensor> {
    let bad = |m: String| Error::tensor(path, name, m);
    let dtype_name = info
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("header entry has no dtype".into()))?;
    let dtype = DType::from_safetensors_name(dtype_name).ok_or_else(|| {
        bad(format!(
            "unsupported dtype {dtype_name} (supported: F32, F16, BF16)"
        ))
    })?;
    let shape = info
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("header entry has no shape".into()))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
    let (begin, end) = info
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
        .ok_or_else(|| bad("data_offsets is not a pair of integers".into()))?;
    if end < begin || end > data_len as u64 {
        return Err(bad(format!(
            "data offsets {begin}..{end} are out of range (data section holds {data_len} bytes)"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let want = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if (end - begin) as usize != want {
        return Err(bad(format!(
            "data offsets {begin}..{end} hold {} bytes but shape {shape:?} in {dtype} needs {want}",
            end - begin
        )));
    }
    Ok(StoredTensor {
        name: name.to_string(),
        dtype,
        shape,
        offset: data_start + begin as usize,
        len: want,
    })
}

/// Tensors must not share bytes (a writer bug or a hand-crafted file).
fn check_no_overlap(path: &Path, tensors: &[StoredTensor]) -> Result<()> {
    let mut spans: Vec<&StoredTensor> = tensors.iter().filter(|t| t.len > 0).collect();
    spans.sort_by_key(|t| t.offset);
    for w in spans.windows(2) {
        if w[0].offset + w[0].len > w[1].offset {
            return Err(Error::tensor(
                path,
                &w[1].name,
                format!("data overlaps tensor `{}`", w[0].name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("x.safetensors"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_valid_header() {
        let b = file_with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#,
            8,
        );
        let h = parse_header(Path::new("x"), &b).unwrap();
        assert_eq!(h.tensors.len(), 1);
        assert_eq!(h.tensors[0].offset, h.data_start);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn malformed_headers_name_file_and_tensor() {
        assert!(err(&[1, 2]).contains("truncated"));
        let mut b = file_with_header("{}", 0);
        b[0] = 200;
        assert!(err(&b).contains("beyond the end of the file"));
        assert!(err(&file_with_header("{nope", 0)).contains("not JSON"));
        let e = err(&file_with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#,
            8,
        ));
        assert!(e.contains("`a`") && e.contains("out of range"), "{e}");
        let e = err(&file_with_header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ));
        assert!(e.contains("overlaps"), "{e}");
        let e = err(&file_with_header(
            r#"{"a":{"dtype":"I4","shape":[2],"data_offsets":[0,1]}}"#,
            1,
        ));
        assert!(
            e.contains("x.safetensors: tensor `a`: unsupported dtype I4"),
            "{e}"
        );
        let e = err(&file_with_header(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("needs 12"), "{e}");
    }

    #[test]
    fn mutations_never_panic() {
        // Deterministic stand-in for the fuzz target: every truncation and many byte flips.
        let good = file_with_header(
            r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
            16,
        );
        for n in 0..good.len() {
            let _ = parse_header(Path::new("x"), &good[..n]);
        }
        let mut state = 0x2545F4914F6CDD1Du64;
        for _ in 0..5000 {
            let mut b = good.clone();
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state as usize) % b.len();
                b[i] = (state >> 32) as u8;
            }
            let _ = parse_header(Path::new("x"), &b);
        }
    }
}
