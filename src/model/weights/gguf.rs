//! GGUF v2/v3 reader: header, typed metadata, tensor infos, aligned tensor data, all over one mmap.
//!
//! Layout (ggml `docs/gguf.md`, little-endian): magic "GGUF" | u32 version | u64 tensor_count |
//! u64 kv_count | kv_count × (string key, u32 type, value) | tensor_count × (string name, u32 n_dims,
//! u64 dims[n_dims], u32 ggml_type, u64 offset) | zero padding to `general.alignment` (default 32) |
//! tensor data, each tensor at data_start + offset. Strings are u64 length + UTF-8 bytes.
//! v1 used u32 counts and lengths; it is refused (no v1 files exist in the wild any more).
//!
//! Every length and count read from the file is checked against the bytes that remain before
//! anything is allocated, so a corrupt or truncated file is an error naming what was being read,
//! never a panic, and allocations stay within a small multiple of the file's size (a metadata
//! array element takes one `MetaValue`, at most 32 bytes per file byte). A count too large for
//! the rest of the file is reported as
//! `Truncated` (a file cut short and a corrupt count are indistinguishable here).

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::backend::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    #[error("truncated GGUF file: needed {needed} bytes for {what} at offset {offset}, file has {len}")]
    Truncated { what: String, offset: usize, needed: u64, len: usize },
    #[error("corrupt GGUF file: {0}")]
    Corrupt(String),
    #[error("tensor '{name}' has block type id {id}, which this engine does not support (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)")]
    UnknownType { name: String, id: u32 },
    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType { key: String, found: &'static str, expected: &'static str },
}

type Result<T> = std::result::Result<T, GgufError>;

/// One metadata value, with the type GGUF gave it.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
        }
    }

    /// Any integer type as i128 (the spec recommends accepting any width for hyper-parameters).
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where one tensor lives and how it is stored. `dims[0]` is the contiguous dimension (ne0).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset from the start of the tensor-data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes the tensor occupies; validated at parse time so it cannot overflow.
    pub fn n_bytes(&self) -> usize {
        (self.n_elements() as usize / self.dtype.block_len()) * self.dtype.block_bytes()
    }

    /// (rows, cols) of the tensor viewed as a matrix of ne0-long rows.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        (self.n_elements() as usize / cols.max(1), cols)
    }
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file. Tensor bytes are borrowed from the mapping, never copied here.
pub struct GgufFile {
    pub version: u32,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: usize,
    storage: Storage,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses a file. The mapping is read-only; the file must not be truncated while open.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| GgufError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and we never hand out references that outlive `self`;
        // a concurrent truncation of the model file by another process is outside our contract.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(Storage::Mapped(map))
    }

    /// Parses an in-memory file (tests, fixtures).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self> {
        let mut r = Reader { buf: &storage, pos: 0 };
        let magic: [u8; 4] = r.bytes(4, "magic")?.try_into().unwrap();
        if &magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each kv needs at least 8 (key len) + 4 (type) + 1 bytes.
        r.check_count(n_kv, 13, "metadata entries")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut keys = HashSet::with_capacity(n_kv as usize);
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            // A second value for a key would make `get` silently pick one; ggml refuses too.
            if !keys.insert(key.clone()) {
                return Err(GgufError::Corrupt(format!("duplicate metadata key '{key}'")));
            }
            let ty = r.u32(&format!("type of '{key}'"))?;
            let value = r.value(ty, &key, 0)?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_int() {
                Some(a) if a > 0 && a % 8 == 0 && a <= 1 << 20 => a as u64,
                _ => {
                    return Err(GgufError::Corrupt(format!("general.alignment {v:?} is not a positive multiple of 8")))
                }
            },
        };

        // Each tensor info needs at least 8 (name len) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8
        // (offset); checked here, after the metadata, so a cut inside the metadata is reported there.
        r.check_count(n_tensors, 32, "tensor infos")?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("n_dims of '{name}'"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Corrupt(format!(
                    "tensor '{name}' has {n_dims} dimensions (1..={MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dim {d} of '{name}'"))?);
            }
            let id = r.u32(&format!("type of '{name}'"))?;
            let dtype = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownType { name: name.clone(), id })?;
            let offset = r.u64(&format!("offset of '{name}'"))?;
            tensors.push(TensorInfo { name, dims, dtype, offset });
        }

        let data_start = align(r.pos as u64, alignment);
        let len = storage.len() as u64;
        for t in &tensors {
            let elems = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let elems = elems.filter(|&e| e > 0).ok_or_else(|| {
                GgufError::Corrupt(format!("tensor '{}' has dims {:?}: empty or overflowing", t.name, t.dims))
            })?;
            if t.dims[0] % t.dtype.block_len() as u64 != 0 {
                return Err(GgufError::Corrupt(format!(
                    "tensor '{}' row length {} is not a multiple of the {} block length {}",
                    t.name,
                    t.dims[0],
                    t.dtype,
                    t.dtype.block_len()
                )));
            }
            if t.offset % alignment != 0 {
                return Err(GgufError::Corrupt(format!(
                    "tensor '{}' offset {} is not aligned to {alignment}",
                    t.name, t.offset
                )));
            }
            let bytes = (elems / t.dtype.block_len() as u64).checked_mul(t.dtype.block_bytes() as u64);
            let end = bytes.and_then(|b| b.checked_add(t.offset)).and_then(|e| e.checked_add(data_start));
            match end {
                Some(end) if end <= len => {}
                _ => {
                    return Err(GgufError::Truncated {
                        what: format!("data of tensor '{}'", t.name),
                        // Saturating: `offset` comes from the file and may be near u64::MAX.
                        offset: data_start.saturating_add(t.offset) as usize,
                        needed: bytes.unwrap_or(u64::MAX),
                        len: len as usize,
                    });
                }
            }
        }
        let mut names = HashSet::with_capacity(tensors.len());
        if let Some(dup) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            return Err(GgufError::Corrupt(format!("duplicate tensor name '{}'", dup.name)));
        }

        Ok(Self { version, metadata, tensors, alignment, data_start: data_start as usize, storage })
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }

    fn wrong(key: &str, v: &MetaValue, expected: &'static str) -> GgufError {
        GgufError::WrongType { key: key.into(), found: v.type_name(), expected }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, v, "string"))
    }

    /// A non-negative integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_int().and_then(|i| u64::try_from(i).ok()).ok_or_else(|| Self::wrong(key, v, "unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| Self::wrong(key, v, "number"))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(Self::wrong(key, v, "bool")),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(Self::wrong(key, v, "array")),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?.iter().map(|v| v.as_str().ok_or_else(|| Self::wrong(key, v, "array of strings"))).collect()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        &self.storage[start..start + info.n_bytes()]
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }
}

/// The smallest encoding of one metadata value of type `ty` (a string is at least its u64
/// length, an array its u32 type and u64 count); `None` for unknown types.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

fn align(x: u64, a: u64) -> u64 {
    x + (a - x % a) % a
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated { what: what.into(), offset: self.pos, needed: n, len: self.buf.len() });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// Rejects counts that could not possibly fit in the rest of the file before allocating, so
    /// a `Vec::with_capacity(count)` afterwards is bounded by the file size.
    fn check_count(&self, count: u64, min_bytes_each: u64, what: &str) -> Result<()> {
        let remaining = (self.buf.len() - self.pos) as u64;
        let needed = count.saturating_mul(min_bytes_each);
        if needed > remaining {
            return Err(GgufError::Truncated {
                what: format!("{count} {what} (at least {min_bytes_each} bytes each)"),
                offset: self.pos,
                needed,
                len: self.buf.len(),
            });
        }
        Ok(())
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64, what)?.try_into().unwrap())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| GgufError::Corrupt(format!("{what} at offset {} is not UTF-8", self.pos)))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(key)?[0]),
            1 => MetaValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => match self.arr::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(GgufError::Corrupt(format!("bool value {b} for '{key}'"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= 8 {
                    return Err(GgufError::Corrupt(format!("arrays nested deeper than 8 in '{key}'")));
                }
                let elem = self.u32(key)?;
                // Checked before the count so an empty array cannot hide a bogus element type.
                let min_bytes = min_value_bytes(elem)
                    .ok_or_else(|| GgufError::Corrupt(format!("unknown metadata value type {elem} for '{key}'")))?;
                let n = self.u64(key)?;
                self.check_count(n, min_bytes, &format!("elements of array '{key}'"))?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(key)?)),
            t => return Err(GgufError::Corrupt(format!("unknown metadata value type {t} for '{key}'"))),
        })
    }
}
