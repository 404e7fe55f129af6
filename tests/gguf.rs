//! GGUF reader and block dequantization against an independent reference.
//!
//! `tests/fixtures/quant_blocks.gguf` is written by `tests/fixtures/make_quant_fixture.py` with
//! gguf-py (llama.cpp's Python package): its writer lays out the file and its numpy dequantizers
//! produce the `<TYPE>.ref` tensors, so neither the layout nor the expected values come from our
//! code. The error tests mutate the fixture bytes in memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use zoe_llm::backend::cpu::blocks::dequantize_row;
use zoe_llm::backend::GgmlType;
use zoe_llm::model::weights::{GgufError, GgufFile, MetaValue};

// ---------------------------------------------------------------------------------------------
// Allocation probe: the largest single allocation made by the current thread, so "a huge count
// must not allocate" is checked directly (Linux overcommit would let a multi-GB reservation
// succeed silently).

struct TrackingAlloc;

thread_local! {
    // const-initialised and Drop-free, so touching it from inside the allocator never allocates.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; the bookkeeping
// only touches a thread-local Cell.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: TrackingAlloc = TrackingAlloc;

/// Parses `bytes` and returns the result with the largest single allocation made meanwhile.
fn parse_measured(bytes: Vec<u8>) -> (Result<GgufFile, GgufError>, usize) {
    LARGEST.with(|m| m.set(0));
    let r = GgufFile::from_bytes(bytes);
    (r, LARGEST.with(|m| m.get()))
}

// ---------------------------------------------------------------------------------------------
// Fixture access and byte patching.

const ROWS: usize = 2;
const COLS: usize = 512;

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant_blocks.gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture_path()).expect("read tests/fixtures/quant_blocks.gguf")
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(bytes)
}

fn expect_err(bytes: Vec<u8>) -> GgufError {
    match parse(bytes) {
        Ok(f) => panic!("expected an error, parsed {f:?}"),
        Err(e) => e,
    }
}

/// Position of the first byte after the GGUF string `s` (u64 length + bytes) in `bytes`; the
/// string must occur exactly once so a patch cannot hit the wrong field.
fn after_string(bytes: &[u8], s: &str) -> usize {
    let mut pat = (s.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(s.as_bytes());
    let hits: Vec<usize> =
        bytes.windows(pat.len()).enumerate().filter(|(_, w)| *w == pat.as_slice()).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "string {s:?} occurs {} times", hits.len());
    hits[0] + pat.len()
}

/// Start of the string `s` itself (its u64 length field).
fn string_start(bytes: &[u8], s: &str) -> usize {
    after_string(bytes, s) - 8 - s.len()
}

fn put_u32(bytes: &mut [u8], pos: usize, v: u32) {
    bytes[pos..pos + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], pos: usize, v: u64) {
    bytes[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(bytes: &[u8], pos: usize) -> u64 {
    u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap())
}

/// Field positions of one tensor info: (first dim, ggml type, offset).
fn tensor_info_fields(bytes: &[u8], name: &str) -> (usize, usize, usize) {
    let p = after_string(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let dims = p + 4;
    let ty = dims + 8 * n_dims;
    (dims, ty, ty + 4)
}

/// Position of a metadata value (after its key and u32 type tag).
fn value_pos(bytes: &[u8], key: &str) -> usize {
    after_string(bytes, key) + 4
}

/// File offsets where tensor data begins and ends, found from where `tensor_data` points
/// inside the buffer handed to `from_bytes` (the reader does not expose its data offset).
fn data_span(bytes: &[u8]) -> (usize, usize) {
    let copy = bytes.to_vec();
    let base = copy.as_ptr() as usize;
    let f = parse(copy).expect("fixture parses");
    let spans = f.tensors().iter().map(|t| {
        let d = f.tensor_data(t);
        let start = d.as_ptr() as usize - base;
        (start, start + d.len())
    });
    let start = spans.clone().map(|s| s.0).min().unwrap();
    let end = spans.map(|s| s.1).max().unwrap();
    (start, end)
}

fn name_of(t: GgmlType, suffix: &str) -> String {
    format!("{}.{suffix}", t.name())
}

// ---------------------------------------------------------------------------------------------
// The fixture itself.

#[test]
fn header_alignment_and_tensor_table() {
    let f = GgufFile::open(&fixture_path()).expect("open fixture");
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment(), 64, "fixture sets general.alignment = 64");
    assert_eq!(f.tensors().len(), 2 * GgmlType::ALL.len());
    for t in GgmlType::ALL {
        let q = f.tensor(&name_of(t, "q")).unwrap_or_else(|| panic!("{t}.q missing"));
        let r = f.tensor(&name_of(t, "ref")).unwrap_or_else(|| panic!("{t}.ref missing"));
        assert_eq!(q.dtype, t);
        assert_eq!(r.dtype, GgmlType::F32);
        for info in [q, r] {
            assert_eq!(info.dims, [COLS as u64, ROWS as u64], "{}", info.name);
            assert_eq!(info.offset % 64, 0, "{} offset", info.name);
            assert_eq!(info.rows_cols(), (ROWS, COLS));
            let row = info.dtype.row_bytes(COLS).unwrap();
            assert_eq!(f.tensor_data(info).len(), ROWS * row, "{}", info.name);
        }
    }
    assert!(f.tensor("Q8_1.q").is_none());

    // With the default alignment of 32 the data would start 32 bytes earlier than with 64, so
    // the reference comparison below also proves the custom alignment is honoured.
    let bytes = fixture_bytes();
    let (start, end) = data_span(&bytes);
    let infos_end = after_string(&bytes, "Q6_K.ref") + 4 + 16 + 4 + 8;
    assert_eq!(start, infos_end.next_multiple_of(64));
    assert_ne!(start, infos_end.next_multiple_of(32));
    assert_eq!(end, bytes.len(), "the last tensor ends exactly at end of file");
}

#[test]
fn metadata_values_and_types() {
    let f = GgufFile::open(&fixture_path()).expect("open fixture");
    let s = |x: &str| MetaValue::String(x.to_string());
    let expected: Vec<(&str, MetaValue)> = vec![
        ("general.architecture", s("zoe-test")),
        ("general.alignment", MetaValue::U32(64)),
        ("zoe.test.u8", MetaValue::U8(200)),
        ("zoe.test.i8", MetaValue::I8(-100)),
        ("zoe.test.u16", MetaValue::U16(60000)),
        ("zoe.test.i16", MetaValue::I16(-30000)),
        ("zoe.test.u32", MetaValue::U32(4_000_000_000)),
        ("zoe.test.i32", MetaValue::I32(-2_000_000_000)),
        ("zoe.test.f32", MetaValue::F32(123.456)),
        ("zoe.test.bool_true", MetaValue::Bool(true)),
        ("zoe.test.bool_false", MetaValue::Bool(false)),
        ("zoe.test.string", s("héllo, wörld ✓ 世界")),
        ("zoe.test.empty_string", s("")),
        ("zoe.test.u64", MetaValue::U64((1 << 63) + 12345)),
        ("zoe.test.i64", MetaValue::I64(-(1 << 62) - 7)),
        ("zoe.test.f64", MetaValue::F64(-1.25e300)),
        (
            "zoe.test.arr_i32",
            MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2), MetaValue::I32(3), MetaValue::I32(i32::MAX)]),
        ),
        ("zoe.test.arr_u8", MetaValue::Array(vec![MetaValue::U8(0), MetaValue::U8(1), MetaValue::U8(255)])),
        ("zoe.test.arr_u64", MetaValue::Array(vec![MetaValue::U64(0), MetaValue::U64(u64::MAX)])),
        ("zoe.test.arr_f32", MetaValue::Array(vec![MetaValue::F32(0.5), MetaValue::F32(-1.0)])),
        (
            "zoe.test.arr_bool",
            MetaValue::Array(vec![MetaValue::Bool(true), MetaValue::Bool(false), MetaValue::Bool(true)]),
        ),
        ("zoe.test.arr_str", MetaValue::Array(vec![s("alpha"), s(""), s("Ġhello Ċ")])),
        (
            "zoe.test.nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                MetaValue::Array(vec![MetaValue::I32(3)]),
                MetaValue::Array(vec![s("x"), s("yz")]),
            ]),
        ),
    ];
    let got: Vec<(&str, &MetaValue)> = f.metadata().iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want: Vec<(&str, &MetaValue)> = expected.iter().map(|(k, v)| (*k, v)).collect();
    assert_eq!(got, want);

    let type_names: Vec<&str> = f.metadata().iter().map(|(_, v)| v.type_name()).collect();
    assert_eq!(
        type_names,
        [
            "string", "u32", "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "bool", "string", "string", "u64",
            "i64", "f64", "array", "array", "array", "array", "array", "array", "array"
        ]
    );

    // Typed getters: integers of any width, numbers, strings, arrays.
    assert_eq!(f.get_u64("zoe.test.u8").unwrap(), 200);
    assert_eq!(f.get_u64("zoe.test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u64("zoe.test.u64").unwrap(), (1 << 63) + 12345);
    assert_eq!(f.get_f64("zoe.test.f32").unwrap(), f64::from(123.456f32));
    assert_eq!(f.get_f64("zoe.test.i16").unwrap(), -30000.0);
    assert_eq!(f.get_f64("zoe.test.f64").unwrap(), -1.25e300);
    assert!(f.get_bool("zoe.test.bool_true").unwrap());
    assert!(!f.get_bool("zoe.test.bool_false").unwrap());
    assert_eq!(f.get_str("general.architecture").unwrap(), "zoe-test");
    assert_eq!(f.get_str("zoe.test.empty_string").unwrap(), "");
    assert_eq!(f.get_array("zoe.test.arr_u8").unwrap().len(), 3);
    assert_eq!(f.get_str_array("zoe.test.arr_str").unwrap(), ["alpha", "", "Ġhello Ċ"]);
    assert_eq!(f.get("zoe.test.i64").and_then(MetaValue::as_int), Some(-(1 << 62) - 7));

    // Getter errors name the key and both types.
    match f.get_u64("zoe.test.i8") {
        Err(e @ GgufError::WrongType { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("zoe.test.i8") && msg.contains("i8"), "{msg}");
        }
        other => panic!("negative i8 as u64: {other:?}"),
    }
    assert!(matches!(
        f.get_bool("zoe.test.string"),
        Err(GgufError::WrongType { found: "string", expected: "bool", .. })
    ));
    assert!(matches!(f.get_str_array("zoe.test.arr_i32"), Err(GgufError::WrongType { found: "i32", .. })));
    assert!(matches!(f.get_array("zoe.test.u16"), Err(GgufError::WrongType { found: "u16", expected: "array", .. })));
    match f.get_str("zoe.test.nope") {
        Err(e @ GgufError::MissingKey { .. }) => assert!(e.to_string().contains("zoe.test.nope")),
        other => panic!("missing key: {other:?}"),
    }
}

fn read_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Exact equality is required for every type: our decoder performs the same f32 operations in
/// the same order as gguf-py's numpy code (one rounding each, no FMA), so there is no tolerance.
/// NaNs are compared as NaNs because converters may differ in the NaN payload (half sets the
/// quiet bit, numpy keeps the payload as is).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn dequantize_matches_gguf_py_reference() {
    let f = GgufFile::open(&fixture_path()).expect("open fixture");
    for t in GgmlType::ALL {
        let q = f.tensor(&name_of(t, "q")).unwrap();
        let r = f.tensor(&name_of(t, "ref")).unwrap();
        let row_bytes = t.row_bytes(COLS).unwrap();
        let q_data = f.tensor_data(q);
        let reference = read_f32s(f.tensor_data(r));
        assert_eq!(reference.len(), ROWS * COLS);

        let mut all = Vec::with_capacity(ROWS * COLS);
        for row in 0..ROWS {
            let src = &q_data[row * row_bytes..(row + 1) * row_bytes];
            let want = &reference[row * COLS..(row + 1) * COLS];
            let mut got = vec![f32::NAN; COLS];
            dequantize_row(t, src, &mut got);
            let bad: Vec<String> = (0..COLS)
                .filter(|&i| !same(got[i], want[i]))
                .take(5)
                .map(|i| format!("[{i}] got {:e} want {:e}", got[i], want[i]))
                .collect();
            assert!(bad.is_empty(), "{t} row {row}: {}", bad.join(", "));
            all.extend(got);
        }

        // Guard against a degenerate fixture: the reference must be varied and finite where
        // the fixture promises it (quantized types have finite scales; plain types carry
        // specials only at their fixed positions).
        let mut distinct: Vec<u32> = all.iter().map(|x| x.to_bits()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 100, "{t}: only {} distinct values", distinct.len());
        if t.is_quantized() {
            assert!(all.iter().all(|x| x.is_finite()), "{t} has non-finite values");
        } else {
            assert!(all[4].is_nan() && all[2] == f32::INFINITY && all[3] == f32::NEG_INFINITY);
            assert!(all[1] == 0.0 && all[1].is_sign_negative());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: every one a specific variant whose message names the problem, never a panic.

#[test]
fn every_truncated_prefix_is_an_error() {
    let bytes = fixture_bytes();
    let (data_start, data_end) = data_span(&bytes);
    assert_eq!(data_end, bytes.len());
    // Every length through the header, metadata, tensor infos, padding and the start of the
    // data; a stride through the rest of the data; the last bytes of the file.
    let lens =
        (0..data_start + 200).chain((data_start + 200..bytes.len()).step_by(37)).chain(bytes.len() - 4..bytes.len());
    let mut checked = 0;
    for n in lens {
        let (r, largest) = parse_measured(bytes[..n].to_vec());
        match r {
            Err(GgufError::Truncated { offset, len, .. }) => {
                assert_eq!(len, n, "prefix {n}: reported file length");
                assert!(offset <= bytes.len(), "prefix {n}: offset {offset}");
            }
            other => panic!("prefix of {n} bytes: expected Truncated, got {other:?}"),
        }
        assert!(largest < 1 << 20, "prefix {n}: allocated {largest} bytes");
        checked += 1;
    }
    assert!(checked > data_start);

    let what = |n: usize| match expect_err(bytes[..n].to_vec()) {
        GgufError::Truncated { what, .. } => what,
        e => panic!("{e:?}"),
    };
    assert_eq!(what(3), "magic");
    assert_eq!(what(6), "version");
    assert_eq!(what(10), "tensor count");
    let in_string = after_string(&bytes, "zoe.test.string") + 4 + 8 + 3;
    assert_eq!(what(in_string), "zoe.test.string");
    let in_infos = after_string(&bytes, "Q5_K.q") + 2;
    assert_eq!(what(in_infos), "n_dims of 'Q5_K.q'");
    assert_eq!(what(bytes.len() - 1), "data of tensor 'Q6_K.ref'");
    let msg = expect_err(bytes[..bytes.len() - 1].to_vec()).to_string();
    assert!(msg.contains("truncated") && msg.contains("Q6_K.ref"), "{msg}");

    assert!(parse(bytes).is_ok(), "the whole file parses");
}

#[test]
fn bad_magic_is_rejected() {
    let mut b = fixture_bytes();
    b[..4].copy_from_slice(b"GGML");
    match expect_err(b) {
        e @ GgufError::BadMagic { found } => {
            assert_eq!(&found, b"GGML");
            assert!(e.to_string().contains("not a GGUF file"), "{e}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn only_versions_2_and_3_are_accepted() {
    for v in [0, 1, 4, u32::MAX] {
        let mut b = fixture_bytes();
        put_u32(&mut b, 4, v);
        match expect_err(b) {
            e @ GgufError::UnsupportedVersion(found) => {
                assert_eq!(found, v);
                assert!(e.to_string().contains(&format!("version {v}")), "{e}");
            }
            e => panic!("version {v}: {e:?}"),
        }
    }
    // v2 differs from v3 only in allowing big-endian files, which we treat as little-endian.
    let mut b = fixture_bytes();
    put_u32(&mut b, 4, 2);
    assert_eq!(parse(b).expect("v2 parses").version, 2);
}

#[test]
fn unknown_tensor_type_id_is_rejected() {
    // 9 is Q8_1 (activation-only), 10 Q2_K (unsupported), 1000 is no type at all.
    for id in [9, 10, 1000] {
        let mut b = fixture_bytes();
        let (_, ty, _) = tensor_info_fields(&b, "Q4_1.q");
        put_u32(&mut b, ty, id);
        let e = expect_err(b);
        let msg = e.to_string();
        match e {
            GgufError::UnknownType { name, id: found } => {
                assert_eq!((name.as_str(), found), ("Q4_1.q", id));
                assert!(msg.contains("Q4_1.q") && msg.contains(&format!("id {id}")), "{msg}");
            }
            e => panic!("type id {id}: {e:?}"),
        }
    }
}

/// Expects `Truncated` for `what` containing `needle`, with a small peak allocation.
fn expect_truncated_without_alloc(bytes: Vec<u8>, needle: &str) {
    let (r, largest) = parse_measured(bytes);
    match r {
        Err(e @ GgufError::Truncated { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "message should name {needle:?}: {msg}");
        }
        other => panic!("expected Truncated naming {needle:?}, got {other:?}"),
    }
    assert!(largest < 1 << 20, "allocated {largest} bytes for {needle:?}");
}

#[test]
fn huge_array_counts_are_rejected_without_allocating() {
    let counts = [u64::MAX, u64::MAX / 32, 1 << 40, 1 << 28, 100_000];
    for key in ["zoe.test.arr_i32", "zoe.test.arr_u8", "zoe.test.arr_str", "zoe.test.nested"] {
        for count in counts {
            let mut b = fixture_bytes();
            // value: u32 element type, u64 count, elements
            let pos = value_pos(&b, key) + 4;
            put_u64(&mut b, pos, count);
            expect_truncated_without_alloc(b, key);
        }
    }
    // The count of an inner array of a nested array.
    let mut b = fixture_bytes();
    let inner = value_pos(&b, "zoe.test.nested") + 4 + 8;
    assert_eq!(get_u64(&b, inner + 4), 2, "first inner array has 2 items");
    put_u64(&mut b, inner + 4, 1 << 50);
    expect_truncated_without_alloc(b, "zoe.test.nested");
}

#[test]
fn huge_string_lengths_are_rejected_without_allocating() {
    for len in [u64::MAX, 1 << 40, 100_000] {
        // A string value.
        let mut b = fixture_bytes();
        let pos = value_pos(&b, "zoe.test.string");
        put_u64(&mut b, pos, len);
        expect_truncated_without_alloc(b, "zoe.test.string");

        // A string inside an array of strings.
        let mut b = fixture_bytes();
        let pos = value_pos(&b, "zoe.test.arr_str") + 4 + 8;
        put_u64(&mut b, pos, len);
        expect_truncated_without_alloc(b, "zoe.test.arr_str");

        // A metadata key.
        let mut b = fixture_bytes();
        let pos = string_start(&b, "zoe.test.u8");
        put_u64(&mut b, pos, len);
        expect_truncated_without_alloc(b, "metadata key");

        // A tensor name.
        let mut b = fixture_bytes();
        let pos = string_start(&b, "Q8_0.ref");
        put_u64(&mut b, pos, len);
        expect_truncated_without_alloc(b, "name of tensor 15");
    }
}

#[test]
fn huge_header_counts_are_rejected_without_allocating() {
    for count in [u64::MAX, 1 << 40, 1_000_000] {
        let mut b = fixture_bytes();
        put_u64(&mut b, 8, count);
        expect_truncated_without_alloc(b, "tensor infos");
        let mut b = fixture_bytes();
        put_u64(&mut b, 16, count);
        expect_truncated_without_alloc(b, "metadata entries");
    }
}

#[test]
fn tensor_data_past_end_of_file_is_rejected() {
    let bytes = fixture_bytes();
    let (_, _, off_pos) = tensor_info_fields(&bytes, "Q6_K.ref");
    let offset = get_u64(&bytes, off_pos);
    // One alignment unit further, far away, and so far that data_start + offset overflows u64.
    for bad in [offset + 64, 1 << 40, u64::MAX - 63] {
        let mut b = bytes.clone();
        put_u64(&mut b, off_pos, bad);
        match expect_err(b) {
            e @ GgufError::Truncated { .. } => {
                let msg = e.to_string();
                assert!(msg.contains("data of tensor 'Q6_K.ref'"), "{msg}");
            }
            e => panic!("offset {bad}: {e:?}"),
        }
    }
    // A row count that makes the last tensor run past the end of the file.
    for rows in [3, 1 << 40] {
        let mut b = bytes.clone();
        let (dims, _, _) = tensor_info_fields(&b, "Q6_K.ref");
        put_u64(&mut b, dims + 8, rows);
        match expect_err(b) {
            e @ GgufError::Truncated { .. } => assert!(e.to_string().contains("'Q6_K.ref'"), "{e}"),
            e => panic!("rows {rows}: {e:?}"),
        }
    }
    // Dims whose product overflows u64.
    let mut b = bytes.clone();
    let (dims, _, _) = tensor_info_fields(&b, "Q4_0.q");
    put_u64(&mut b, dims + 8, u64::MAX / 256);
    match expect_err(b) {
        e @ GgufError::Corrupt(_) => assert!(e.to_string().contains("'Q4_0.q'"), "{e}"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn layout_violations_are_corrupt() {
    let bytes = fixture_bytes();
    let corrupt = |b: Vec<u8>, needle: &str| match expect_err(b) {
        e @ GgufError::Corrupt(_) => assert!(e.to_string().contains(needle), "{needle}: {e}"),
        e => panic!("{needle}: {e:?}"),
    };

    // Offset not a multiple of general.alignment (32 would be fine under the default).
    let mut b = bytes.clone();
    let (_, _, off) = tensor_info_fields(&b, "F16.q");
    let o = get_u64(&b, off);
    put_u64(&mut b, off, o + 32);
    corrupt(b, "not aligned to 64");

    // Alignment that is not a multiple of 8.
    let mut b = bytes.clone();
    let pos = value_pos(&b, "general.alignment");
    put_u32(&mut b, pos, 12);
    corrupt(b, "general.alignment");

    // Row length not a whole number of blocks (Q4_K needs multiples of 256).
    let mut b = bytes.clone();
    let (dims, _, _) = tensor_info_fields(&b, "Q4_K.q");
    put_u64(&mut b, dims, 576);
    corrupt(b, "not a multiple of the Q4_K block length 256");

    // A bool byte other than 0/1 and an unknown value type.
    let mut b = bytes.clone();
    let pos = value_pos(&b, "zoe.test.bool_true");
    b[pos] = 2;
    corrupt(b, "zoe.test.bool_true");
    let mut b = bytes.clone();
    let pos = after_string(&b, "zoe.test.u16");
    put_u32(&mut b, pos, 13);
    corrupt(b, "unknown metadata value type 13");
    let mut b = bytes.clone();
    let pos = value_pos(&b, "zoe.test.arr_u8");
    put_u32(&mut b, pos, 99);
    corrupt(b, "unknown metadata value type 99");

    // Invalid UTF-8 in a string and too many dimensions.
    let mut b = bytes.clone();
    let p = value_pos(&b, "zoe.test.string") + 8;
    b[p] = 0xFF;
    corrupt(b, "not UTF-8");
    let mut b = bytes.clone();
    let (dims, _, _) = tensor_info_fields(&b, "BF16.q");
    put_u32(&mut b, dims - 4, 5);
    corrupt(b, "5 dimensions");

    // Duplicate tensor names and duplicate keys are ambiguous.
    let mut b = bytes.clone();
    let p = string_start(&b, "Q5_1.q") + 8;
    b[p..p + 6].copy_from_slice(b"Q5_0.q");
    corrupt(b, "duplicate tensor name 'Q5_0.q'");
    let mut b = bytes.clone();
    let p = string_start(&b, "zoe.test.i16") + 8;
    b[p..p + 12].copy_from_slice(b"zoe.test.u16");
    corrupt(b, "duplicate metadata key 'zoe.test.u16'");
}

#[test]
fn open_reports_the_path_of_a_missing_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/no_such_file.gguf");
    match GgufFile::open(&path) {
        Err(e @ GgufError::Io { .. }) => assert!(e.to_string().contains("no_such_file.gguf")),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 file, when available (not in the repository: 98 MB).

#[test]
fn real_smollm2_q4_1_file() {
    let Some(path) = std::env::var_os("ZOE_TEST_GGUF") else {
        eprintln!("skipped: set ZOE_TEST_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf");
        return;
    };
    let f = GgufFile::open(Path::new(&path)).expect("open ZOE_TEST_GGUF");
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("general.file_type").unwrap(), 3, "MOSTLY_Q4_1");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1], "<|im_start|>");
    assert_eq!(tokens[2], "<|im_end|>");

    let embd = f.tensor("token_embd.weight").expect("token_embd.weight");
    assert_eq!(embd.dtype, GgmlType::Q8_0);
    assert_eq!(embd.dims, [576, 49152]);
    assert!(f.tensor("output.weight").is_none(), "tied output");
    assert_eq!(f.tensor("output_norm.weight").unwrap().dtype, GgmlType::F32);
    for blk in 0..30 {
        for lin in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"] {
            let name = format!("blk.{blk}.{lin}.weight");
            let t = f.tensor(&name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(t.dtype, GgmlType::Q4_1, "{name}");
        }
        for norm in ["attn_norm", "ffn_norm"] {
            let name = format!("blk.{blk}.{norm}.weight");
            assert_eq!(f.tensor(&name).unwrap().dtype, GgmlType::F32, "{name}");
        }
    }
    assert_eq!(f.tensors().len(), 1 + 1 + 30 * 9);

    // Dequantized rows look like trained weights: finite, not all zero, modest magnitude.
    let row_of = |name: &str, row: usize| {
        let t = f.tensor(name).unwrap();
        let (rows, cols) = t.rows_cols();
        assert!(row < rows);
        let rb = t.dtype.row_bytes(cols).unwrap();
        let mut out = vec![0.0f32; cols];
        dequantize_row(t.dtype, &f.tensor_data(t)[row * rb..(row + 1) * rb], &mut out);
        out
    };
    for (name, row) in [
        ("token_embd.weight", 1),
        ("token_embd.weight", 49151),
        ("blk.0.attn_q.weight", 0),
        ("blk.29.ffn_down.weight", 575),
        ("output_norm.weight", 0),
    ] {
        let v = row_of(name, row);
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 100.0), "{name} row {row}");
        assert!(v.iter().any(|&x| x != 0.0), "{name} row {row} is all zeros");
    }
}
