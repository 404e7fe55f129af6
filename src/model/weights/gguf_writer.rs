//! A minimal in-memory GGUF v3 writer for tests: metadata of any [`MetaValue`] type and tensors
//! of raw bytes, laid out as ggml `docs/gguf.md` describes (the reader in `gguf.rs` is the
//! other half). Test-only: real files come from llama.cpp's converters.

use crate::backend::GgmlType;
use crate::model::weights::{GgufFile, MetaValue};

const ALIGNMENT: usize = 32;

#[derive(Default)]
pub(crate) struct GgufWriter {
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Sets a metadata key, replacing an earlier value in place (GGUF forbids duplicate keys, and
    /// tests start from a base file and override a few keys).
    pub(crate) fn kv(&mut self, key: &str, value: MetaValue) -> &mut Self {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.kvs.push((key.to_owned(), value)),
        }
        self
    }

    /// Drops a metadata key if present.
    pub(crate) fn remove(&mut self, key: &str) -> &mut Self {
        self.kvs.retain(|(k, _)| k != key);
        self
    }

    /// A tensor of `dims` (ne0 first, the contiguous dimension) stored as `bytes` of `dtype`.
    pub(crate) fn tensor(&mut self, name: &str, dims: &[u64], dtype: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_owned(), dims.to_vec(), dtype, bytes));
        self
    }

    pub(crate) fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        assert_eq!(dims.iter().product::<u64>() as usize, values.len(), "tensor '{name}'");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, bytes)
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            out.extend(type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, dims, dtype, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(dtype.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(ALIGNMENT);
        }
        for (_, _, _, bytes) in &self.tensors {
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
            out.extend(bytes);
        }
        out
    }

    pub(crate) fn build(&self) -> GgufFile {
        GgufFile::from_bytes(self.to_bytes()).expect("the test writer makes well-formed GGUF")
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// GGUF value type ids (gguf.md `gguf_metadata_value_type`).
fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend(x.to_le_bytes()),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            // An empty array has no element to take the type from; call it a string array.
            let elem = items.first().map_or(8, type_id);
            assert!(items.iter().all(|i| type_id(i) == elem), "GGUF arrays are homogeneous");
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back() {
        let mut w = GgufWriter::new();
        w.kv("a.str", MetaValue::String("x".into()))
            .kv("a.u32", MetaValue::U32(1))
            .kv("gone", MetaValue::Bool(true))
            .kv("a.u32", MetaValue::U32(7))
            .kv("a.f32", MetaValue::F32(0.5))
            .kv("a.arr", MetaValue::Array(vec![MetaValue::I32(-1), MetaValue::I32(2)]))
            .tensor_f32("t0", &[3], &[1.0, 2.0, 3.0])
            .tensor_f32("t1", &[2, 2], &[4.0, 5.0, 6.0, 7.0]);
        w.remove("gone");
        let f = w.build();
        assert_eq!(f.metadata().len(), 4, "overrides replace, removals remove");
        assert_eq!(f.get_str("a.str").unwrap(), "x");
        assert_eq!(f.get_u64("a.u32").unwrap(), 7);
        assert_eq!(f.get_f64("a.f32").unwrap(), 0.5);
        assert_eq!(f.get_array("a.arr").unwrap(), [MetaValue::I32(-1), MetaValue::I32(2)]);
        let t1 = f.tensor("t1").unwrap();
        assert_eq!((t1.dims.as_slice(), t1.offset), (&[2u64, 2][..], 32));
        let data: Vec<f32> = f.tensor_data(t1).chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(data, [4.0, 5.0, 6.0, 7.0]);
    }
}
