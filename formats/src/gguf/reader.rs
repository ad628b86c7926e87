//! GGUF container parsing (versions 2 and 3, little-endian).
//!
//! The parser never panics on malformed input: every length and count is checked against the bytes that remain
//! before anything is allocated, element counts use checked arithmetic, and every tensor must lie inside the
//! file at an offset aligned to `general.alignment`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::GgufError;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest number of dimensions ggml supports.
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (guards the stack against hostile files).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// A ggml tensor element type, as stored in GGUF tensor infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The type for a ggml type id, or `None` for ids that are unknown or were removed from ggml.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
        }
    }

    /// `(elements per block, bytes per block)`, as in ggml's type traits.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 40),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ4_NL => (32, 18),
            IQ3_S => (256, 110),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (256, 56),
            BF16 => (1, 2),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            MXFP4 => (32, 17),
        }
    }

    /// Bytes taken by `n_elements` elements, or `None` when `n_elements` is not a whole number of blocks or the
    /// size overflows.
    pub fn byte_len(self, n_elements: u64) -> Option<u64> {
        let (block, size) = self.block_layout();
        if !n_elements.is_multiple_of(block as u64) {
            return None;
        }
        (n_elements / block as u64).checked_mul(size as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A metadata value. Strings that are not valid UTF-8 are decoded lossily.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array; all elements have the same GGUF type (possibly arrays themselves).
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, for any non-negative integer type (and bool).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            GgufValue::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    /// The value as a signed integer, for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v as i64),
            GgufValue::I16(v) => Some(v as i64),
            GgufValue::I32(v) => Some(v as i64),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, for float and integer types.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The string, for string values.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, for array values.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// GGUF's name of the value type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }
}

/// One tensor as described by the GGUF header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// llama.cpp's tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` (ne0) is the innermost, contiguous one. The HF/numpy shape is the
    /// reverse (see [`GgufTensorInfo::hf_shape`]).
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Length of the data in bytes.
    pub byte_len: u64,
}

impl GgufTensorInfo {
    /// Number of elements (the product of the dimensions; checked against overflow at parse time).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in HF/numpy order (outermost first): GGUF dims reversed.
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Data {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// A parsed GGUF file whose tensor data stays in the (memory-mapped or owned) buffer.
pub struct GgufFile {
    path: Option<PathBuf>,
    data: Data,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Label used in error messages for buffers that do not come from a file.
pub(crate) const MEMORY_LABEL: &str = "<memory>";

struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

impl GgufFile {
    /// Memory-maps and parses the GGUF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let io_err = |source| GgufError::Io {
            file: label.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only; like every memory-mapped reader we assume nobody truncates the file
        // while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
        let header = parse_header(&mmap, &label)?;
        Ok(GgufFile::from_header(
            Some(path.to_path_buf()),
            Data::Mmap(mmap),
            header,
        ))
    }

    /// Parses a GGUF image held in memory (copies it). Used by tests and fuzzing; errors name the file
    /// `<memory>`.
    pub fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let header = parse_header(bytes, MEMORY_LABEL)?;
        Ok(GgufFile::from_header(
            None,
            Data::Owned(bytes.to_vec()),
            header,
        ))
    }

    fn from_header(path: Option<PathBuf>, data: Data, h: Header) -> GgufFile {
        GgufFile {
            path,
            data,
            version: h.version,
            alignment: h.alignment,
            data_start: h.data_start,
            metadata: h.metadata,
            tensors: h.tensors,
        }
    }

    /// The path the file was opened from (`None` for [`GgufFile::parse`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The label used for this file in error messages.
    pub fn label(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => MEMORY_LABEL.to_string(),
        }
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the tensor data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mmap(m) => m,
            Data::Owned(v) => v,
        }
    }

    /// All metadata key/value pairs.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.label(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType {
            file: self.label(),
            key: key.to_string(),
            expected,
            found: v.type_name(),
        }
    }

    /// `key` as an unsigned integer: `Ok(None)` when absent, an error when it has another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "unsigned integer", v)),
        }
    }

    /// `key` as a float (any numeric type): `Ok(None)` when absent, an error when it has another type.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "number", v)),
        }
    }

    /// `key` as a bool: `Ok(None)` when absent, an error when it has another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "bool", v)),
        }
    }

    /// `key` as a string: `Ok(None)` when absent, an error when it has another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "string", v)),
        }
    }

    /// `key` as an array of strings: `Ok(None)` when absent, an error when it has another type.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.wrong_type(key, "array of strings", v))?;
                arr.iter()
                    .map(|e| {
                        e.as_str()
                            .ok_or_else(|| self.wrong_type(key, "array of strings", e))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
        }
    }

    /// `key` as an array of i32 (any integer element type that fits): `Ok(None)` when absent.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.wrong_type(key, "array of i32", v))?;
                arr.iter()
                    .map(|e| {
                        e.as_i64()
                            .and_then(|x| i32::try_from(x).ok())
                            .ok_or_else(|| self.wrong_type(key, "array of i32", e))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
        }
    }

    /// `key` as an array of f32 (any numeric element type): `Ok(None)` when absent.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.wrong_type(key, "array of f32", v))?;
                arr.iter()
                    .map(|e| {
                        e.as_f64()
                            .map(|x| x as f32)
                            .ok_or_else(|| self.wrong_type(key, "array of f32", e))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some)
            }
        }
    }

    /// Like [`GgufFile::get_u64`] but the key must be present.
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "unsigned integer", v))
    }

    /// Like [`GgufFile::get_str`] but the key must be present.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "string", v))
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor of this file (bounds were checked at parse time).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let bytes = self.bytes();
        let start = (info.offset as usize).min(bytes.len());
        let end = (start + info.byte_len as usize).min(bytes.len());
        &bytes[start..end]
    }

    /// The tensor dequantised to f32, in GGUF element order (row-major over the HF shape).
    pub fn dequantize_tensor(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, GgufError> {
        super::dequant::dequantize(
            info.ggml_type,
            self.tensor_bytes(info),
            info.n_elements() as usize,
        )
        .map_err(|e| e.in_tensor(&self.label(), &info.name))
    }
}

/// A bounds-checked little-endian reader over the header.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                file: self.file.to_string(),
                what: what(),
                offset: self.pos as u64,
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in the remaining bytes.
    fn check_count(
        &self,
        count: u64,
        min_size: usize,
        what: &dyn Fn() -> String,
    ) -> Result<usize, GgufError> {
        let max = (self.remaining() / min_size.max(1)) as u64;
        if count > max {
            return Err(GgufError::AbsurdCount {
                file: self.file.to_string(),
                what: what(),
                count,
                max,
            });
        }
        Ok(count as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(&|| format!("{} (string length)", what()))?;
        if len > self.remaining() as u64 {
            return Err(GgufError::AbsurdLength {
                file: self.file.to_string(),
                what: what(),
                len,
                available: self.remaining() as u64,
            });
        }
        let s = self.take(len as usize, what)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn value(&mut self, type_id: u32, depth: usize, key: &str) -> Result<GgufValue, GgufError> {
        let what = || format!("value of metadata key `{key}`");
        Ok(match type_id {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => {
                let [b] = self.array::<1>(&what)?;
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    _ => {
                        return Err(GgufError::InvalidValue {
                            file: self.file.to_string(),
                            key: key.to_string(),
                            reason: format!("bool byte is {b}, not 0 or 1"),
                        })
                    }
                }
            }
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::InvalidValue {
                        file: self.file.to_string(),
                        key: key.to_string(),
                        reason: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    });
                }
                let elem_type =
                    self.u32(&|| format!("array element type of metadata key `{key}`"))?;
                let min_size =
                    value_min_size(elem_type).ok_or_else(|| GgufError::InvalidValueType {
                        file: self.file.to_string(),
                        key: key.to_string(),
                        type_id: elem_type,
                    })?;
                let count = self.u64(&|| format!("array length of metadata key `{key}`"))?;
                let count = self.check_count(count, min_size, &|| {
                    format!("array length of metadata key `{key}`")
                })?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_type, depth + 1, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                return Err(GgufError::InvalidValueType {
                    file: self.file.to_string(),
                    key: key.to_string(),
                    type_id: other,
                })
            }
        })
    }
}

/// Smallest encoded size of a value of GGUF type `type_id`, or `None` for unknown types.
fn value_min_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

fn parse_header(bytes: &[u8], file: &str) -> Result<Header, GgufError> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        file,
    };
    let (version, n_tensors, n_kv) = read_preamble(&mut c)?;
    let metadata = read_metadata(&mut c, n_kv)?;
    let alignment = alignment_of(&metadata, file)?;
    let infos = read_tensor_infos(&mut c, n_tensors, alignment)?;
    let data_start = data_section_start(&c, alignment, !infos.is_empty())?;
    let tensors = place_tensors(infos, data_start, bytes.len() as u64, file)?;
    Ok(Header {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

/// Magic, version and the two counts: `(version, tensor count, metadata count)`, the counts checked
/// against the bytes left so that a corrupt count cannot make us allocate absurdly.
fn read_preamble(c: &mut Cursor<'_>) -> Result<(u32, usize, usize), GgufError> {
    let magic: [u8; 4] = c.array(&|| "magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic {
            file: c.file.to_string(),
            found: magic,
        });
    }
    let version = c.u32(&|| "version".to_string())?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            file: c.file.to_string(),
            version,
        });
    }
    let n_tensors = c.u64(&|| "tensor count".to_string())?;
    let n_kv = c.u64(&|| "metadata count".to_string())?;
    // A metadata pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
    // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let n_kv = c.check_count(n_kv, 13, &|| "metadata count".to_string())?;
    let n_tensors = c.check_count(n_tensors, 24, &|| "tensor count".to_string())?;
    Ok((version, n_tensors, n_kv))
}

fn read_metadata(
    c: &mut Cursor<'_>,
    n_kv: usize,
) -> Result<BTreeMap<String, GgufValue>, GgufError> {
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata pair #{i}"))?;
        let type_id = c.u32(&|| format!("type of metadata key `{key}`"))?;
        let value = c.value(type_id, 0, &key)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey {
                file: c.file.to_string(),
                key,
            });
        }
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// `general.alignment` (a power of two up to 2^30), or the GGUF default when absent.
fn alignment_of(metadata: &BTreeMap<String, GgufValue>, file: &str) -> Result<u64, GgufError> {
    match metadata.get("general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => Ok(a),
            _ => Err(GgufError::InvalidValue {
                file: file.to_string(),
                key: "general.alignment".to_string(),
                reason: format!("{v:?} is not a power of two"),
            }),
        },
    }
}

/// A tensor info as read, its offset still relative to the data section (not yet bounds-checked).
struct RelativeTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    rel_offset: u64,
    byte_len: u64,
}

/// Tensor infos: relative offsets first; bounds are checked once the data section start is known.
fn read_tensor_infos(
    c: &mut Cursor<'_>,
    n_tensors: usize,
    alignment: u64,
) -> Result<Vec<RelativeTensor>, GgufError> {
    let mut infos = Vec::with_capacity(n_tensors);
    let mut seen = std::collections::HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info = read_tensor_info(c, i, alignment)?;
        if !seen.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor {
                file: c.file.to_string(),
                tensor: info.name,
            });
        }
        infos.push(info);
    }
    Ok(infos)
}

/// Tensor info #`i`: name, dims, type and offset, with its shape checked against the type's block
/// size and its byte size computed without overflow.
fn read_tensor_info(
    c: &mut Cursor<'_>,
    i: usize,
    alignment: u64,
) -> Result<RelativeTensor, GgufError> {
    let file = c.file;
    let name = c.string(&|| format!("name of tensor #{i}"))?;
    let bad = |reason: String| GgufError::BadTensor {
        file: file.to_string(),
        tensor: name.clone(),
        reason,
    };
    let n_dims = c.u32(&|| format!("dimension count of tensor `{name}`"))?;
    if n_dims > MAX_DIMS {
        return Err(bad(format!(
            "{n_dims} dimensions (ggml supports at most {MAX_DIMS})"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(c.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
    }
    let type_id = c.u32(&|| format!("type of tensor `{name}`"))?;
    let offset = c.u64(&|| format!("offset of tensor `{name}`"))?;
    let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
        file: file.to_string(),
        tensor: name.clone(),
        type_id,
    })?;
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad(format!("element count of dims {dims:?} overflows")))?;
    let (block, _) = ggml_type.block_layout();
    let ne0 = dims.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(block as u64) {
        return Err(bad(format!(
            "innermost dimension {ne0} is not a multiple of the {ggml_type} block size {block}"
        )));
    }
    let byte_len = ggml_type.byte_len(n_elements).ok_or_else(|| {
        bad(format!(
            "byte size of {n_elements} {ggml_type} elements overflows"
        ))
    })?;
    if offset % alignment != 0 {
        return Err(GgufError::MisalignedOffset {
            file: file.to_string(),
            tensor: name,
            offset,
            alignment,
        });
    }
    Ok(RelativeTensor {
        name,
        dims,
        ggml_type,
        rel_offset: offset,
        byte_len,
    })
}

/// Where the tensor data starts: the header end rounded up to `alignment`, which must lie inside the
/// file when there is any tensor.
fn data_section_start(c: &Cursor<'_>, alignment: u64, has_tensors: bool) -> Result<u64, GgufError> {
    let pos = c.pos as u64;
    let data_start = pos.div_ceil(alignment) * alignment;
    let file_len = c.bytes.len() as u64;
    if data_start > file_len && has_tensors {
        return Err(GgufError::Truncated {
            file: c.file.to_string(),
            what: "padding before the tensor data".to_string(),
            offset: pos,
            needed: data_start - pos,
            available: file_len - pos,
        });
    }
    Ok(data_start)
}

/// Makes the offsets absolute, checking that every tensor's bytes lie inside the file.
fn place_tensors(
    infos: Vec<RelativeTensor>,
    data_start: u64,
    file_len: u64,
    file: &str,
) -> Result<Vec<GgufTensorInfo>, GgufError> {
    let mut tensors = Vec::with_capacity(infos.len());
    for t in infos {
        let (rel, byte_len) = (t.rel_offset, t.byte_len);
        let end = data_start
            .checked_add(rel)
            .and_then(|s| s.checked_add(byte_len));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    file: file.to_string(),
                    tensor: t.name,
                    offset: rel,
                    byte_len,
                    data_len: file_len.saturating_sub(data_start),
                })
            }
        }
        tensors.push(GgufTensorInfo {
            name: t.name,
            dims: t.dims,
            ggml_type: t.ggml_type,
            offset: data_start + rel,
            byte_len,
        });
    }
    Ok(tensors)
}
