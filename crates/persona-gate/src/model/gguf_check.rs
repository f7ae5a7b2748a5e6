//! A bounded reader of GGUF headers, run before candle's parser sees the file.
//!
//! candle's `gguf_file::Content::read` trusts parts of the header: `general.alignment = 0` divides
//! by zero, a huge alignment overflows, tensor dimensions multiply without overflow checks, and
//! arrays of small elements become 32-byte values in memory (a 1 GB file of `u8` arrays asks for
//! 32 GB). This reader walks the same header with every count, length and size checked against the
//! file's size and the limits of [`super::limits`], reading nothing into memory but names, so a
//! crafted file is refused with one line naming the problem.

use std::collections::HashSet;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file;

use super::limits::{
    quote, MAX_GGUF_ALIGNMENT, MAX_GGUF_ARRAY, MAX_GGUF_ARRAY_TOTAL, MAX_GGUF_DEPTH, MAX_GGUF_KV,
    MAX_GGUF_NAME, MAX_GGUF_TENSORS,
};
use super::ModelConfig;
use crate::{Error, Result};

/// What the bounded pass learned about a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufHeader {
    pub version: u32,
    pub n_tensors: u64,
    pub n_kv: u64,
    /// Byte offset where the tensor infos end (tensor data starts at the next alignment).
    pub end: u64,
}

/// Value type codes of the GGUF spec.
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

/// Size on disk of a fixed-size value type (`None` for strings and arrays, `Err` when unknown).
fn fixed_size(ty: u32) -> std::result::Result<Option<u64>, String> {
    Ok(Some(match ty {
        0 | 1 | T_BOOL => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        T_STRING | T_ARRAY => return Ok(None),
        other => return Err(format!("unknown metadata value type {other}")),
    }))
}

/// (block size, bytes per block) of the ggml tensor types candle reads.
fn ggml_block(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => return None,
    })
}

/// A reader that knows how many bytes are left and refuses any length that does not fit.
struct Bounded<'a, R> {
    r: &'a mut R,
    pos: u64,
    len: u64,
    /// GGUF v1 writes lengths and counts as u32.
    v1: bool,
    /// Array elements seen so far, against [`MAX_GGUF_ARRAY_TOTAL`].
    array_total: u64,
}

type Check<T> = std::result::Result<T, String>;

impl<R: Read> Bounded<'_, R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Check<[u8; N]> {
        let mut b = [0u8; N];
        if self.remaining() < N as u64 {
            return Err(format!(
                "the header ends inside {what} at byte {}",
                self.pos
            ));
        }
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("reading {what} at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Check<u32> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Check<u64> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// A length or count: u32 in GGUF v1, u64 after.
    fn length(&mut self, what: &str) -> Check<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn length_size(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    /// Skip `n` bytes that must lie inside the file.
    fn skip(&mut self, n: u64, what: &str) -> Check<()> {
        if n > self.remaining() {
            return Err(format!(
                "{what} at byte {} needs {n} bytes, but only {} remain in the file",
                self.pos,
                self.remaining()
            ));
        }
        let got = std::io::copy(&mut self.r.by_ref().take(n), &mut std::io::sink())
            .map_err(|e| format!("reading {what}: {e}"))?;
        if got != n {
            return Err(format!("the file ends inside {what}"));
        }
        self.pos += n;
        Ok(())
    }

    /// A string no longer than `max`, read into memory (keys and tensor names).
    fn name(&mut self, max: u64, what: &str) -> Check<String> {
        let n = self.length(what)?;
        if n > max || n > self.remaining() {
            return Err(format!(
                "{what} at byte {} claims {n} bytes (limit {max}, {} left in the file)",
                self.pos,
                self.remaining()
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| format!("reading {what}: {e}"))?;
        self.pos += n;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// A string value, skipped.
    fn skip_string(&mut self, what: &str) -> Check<()> {
        let n = self.length(what)?;
        self.skip(n, what)
    }

    /// One metadata value of type `ty`; returns it when it is an integer (for `general.alignment`).
    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Check<Option<i128>> {
        match ty {
            T_STRING => self
                .skip_string(&format!("string value of '{key}'"))
                .map(|_| None),
            T_ARRAY => self.array(depth, key).map(|_| None),
            T_BOOL => match self.bytes::<1>("a bool")?[0] {
                0 | 1 => Ok(None),
                b => Err(format!("'{key}' is a bool of value {b} (must be 0 or 1)")),
            },
            _ => self.integer(ty, key),
        }
    }

    fn integer(&mut self, ty: u32, key: &str) -> Check<Option<i128>> {
        let what = format!("value of '{key}'");
        Ok(match ty {
            0 => Some(self.bytes::<1>(&what)?[0] as i128),
            1 => Some(self.bytes::<1>(&what)?[0] as i8 as i128),
            2 => Some(u16::from_le_bytes(self.bytes::<2>(&what)?) as i128),
            3 => Some(i16::from_le_bytes(self.bytes::<2>(&what)?) as i128),
            4 => Some(self.u32(&what)? as i128),
            5 => Some(self.u32(&what)? as i32 as i128),
            10 => Some(self.u64(&what)? as i128),
            11 => Some(self.u64(&what)? as i64 as i128),
            6 | 12 => {
                self.skip(fixed_size(ty)?.unwrap_or(0), &what)?;
                None
            }
            other => return Err(format!("'{key}' has unknown value type {other}")),
        })
    }

    fn array(&mut self, depth: usize, key: &str) -> Check<()> {
        if depth >= MAX_GGUF_DEPTH {
            return Err(format!(
                "'{key}' nests arrays deeper than {MAX_GGUF_DEPTH} levels"
            ));
        }
        let ty = self.u32("an array element type")?;
        let n = self.length("an array length")?;
        let size = fixed_size(ty).map_err(|e| format!("array '{key}': {e}"))?;
        let min = size.unwrap_or(match ty {
            T_STRING => self.length_size(),
            _ => 4 + self.length_size(),
        });
        self.array_total = self.array_total.saturating_add(n);
        if n > MAX_GGUF_ARRAY || self.array_total > MAX_GGUF_ARRAY_TOTAL {
            return Err(format!(
                "'{key}' is an array of {n} elements (limits: {MAX_GGUF_ARRAY} per array, {MAX_GGUF_ARRAY_TOTAL} in all)"
            ));
        }
        if n.saturating_mul(min) > self.remaining() {
            return Err(format!(
                "'{key}' is an array of {n} elements, more than the {} bytes left in the file can hold",
                self.remaining()
            ));
        }
        match size {
            Some(size) if ty != T_BOOL => self.skip(n * size, &format!("array '{key}'")),
            _ => (0..n).try_for_each(|_| self.value(ty, depth + 1, key).map(|_| ())),
        }
    }

    /// One tensor info: a unique name, 1 to 4 non-zero dimensions, a known type, whole blocks
    /// along the first dimension, and bytes that fit in the file.
    fn tensor(&mut self, names: &mut HashSet<String>) -> Check<()> {
        let name = self.name(MAX_GGUF_NAME, "a tensor name")?;
        let q = quote(&name, 80);
        let n_dims = self.u32("a tensor's dimension count")?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!(
                "tensor '{q}' has {n_dims} dimensions (1 to 4 expected)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.length("a tensor dimension")?);
        }
        let ty = self.u32("a tensor type")?;
        let offset = self.u64("a tensor offset")?;
        let (block, type_size) =
            ggml_block(ty).ok_or_else(|| format!("tensor '{q}' has unknown ggml type {ty}"))?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| {
                (d > 0).then(|| acc.checked_mul(d)).flatten()
            })
            .ok_or_else(|| format!("tensor '{q}' has dimensions {dims:?} (zero or overflowing)"))?;
        if dims[0] % block != 0 {
            return Err(format!(
                "tensor '{q}' has rows of {} values, not a multiple of its type's block of {block}",
                dims[0]
            ));
        }
        let end = (elems / block)
            .checked_mul(type_size)
            .and_then(|b| b.checked_add(offset));
        if end.is_none_or(|e| e > self.len) {
            return Err(format!(
                "tensor '{q}' of dimensions {dims:?} at offset {offset} does not fit in a file of {} bytes (truncated download?)",
                self.len
            ));
        }
        if !names.insert(name) {
            return Err(format!("tensor '{q}' appears twice"));
        }
        Ok(())
    }
}

/// Walk a GGUF header from the current position of `r` (the start of the file, `len` bytes long)
/// with every length bounded; `Err` names the first problem.
pub fn check_header<R: Read>(r: &mut R, len: u64) -> std::result::Result<GgufHeader, String> {
    let mut b = Bounded {
        r,
        pos: 0,
        len,
        v1: false,
        array_total: 0,
    };
    if &b.bytes::<4>("the magic")? != b"GGUF" {
        return Err("no GGUF magic at the start of the file".into());
    }
    let version = b.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("GGUF version {version} (1 to 3 supported)"));
    }
    b.v1 = version == 1;
    let n_tensors = b.length("the tensor count")?;
    let n_kv = b.length("the metadata count")?;
    if n_tensors > MAX_GGUF_TENSORS || n_kv > MAX_GGUF_KV {
        return Err(format!(
            "header declares {n_tensors} tensors and {n_kv} metadata entries (limits {MAX_GGUF_TENSORS} and {MAX_GGUF_KV})"
        ));
    }
    for _ in 0..n_kv {
        let key = b.name(MAX_GGUF_NAME, "a metadata key")?;
        let ty = b.u32("a metadata value type")?;
        let v = b.value(ty, 0, &quote(&key, 80))?;
        if key == "general.alignment" {
            check_alignment(v)?;
        }
    }
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        b.tensor(&mut names)?;
    }
    Ok(GgufHeader {
        version,
        n_tensors,
        n_kv,
        end: b.pos,
    })
}

/// `general.alignment` must be a power-of-two integer no larger than [`MAX_GGUF_ALIGNMENT`]
/// (0 divides by zero in candle, a huge one overflows the data offset).
fn check_alignment(v: Option<i128>) -> Check<()> {
    match v {
        Some(a) if a > 0 && a <= MAX_GGUF_ALIGNMENT as i128 && (a as u64).is_power_of_two() => {
            Ok(())
        }
        Some(a) => Err(format!(
            "general.alignment = {a} (must be a power of two from 1 to {MAX_GGUF_ALIGNMENT})"
        )),
        None => Err("general.alignment is not an integer".into()),
    }
}

/// Read a GGUF header from `r`: the bounded pass, then candle's parser, then every tensor's bytes
/// checked to lie inside the file. `path` only names the file in errors.
pub fn read_content<R: Read + Seek>(r: &mut R, path: &Path) -> Result<gguf_file::Content> {
    let corrupt = |reason: String| Error::CorruptModel {
        path: path.into(),
        reason,
    };
    let io = |e: std::io::Error| Error::io(path, e);
    let len = r.seek(SeekFrom::End(0)).map_err(io)?;
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut magic = [0u8; 4];
    if len < 4 || r.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(Error::NotAModel {
            path: path.into(),
            reason: "no GGUF magic at the start of the file (expected a .gguf model or a Hugging Face model directory)".into(),
        });
    }
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    check_header(r, len).map_err(|e| corrupt(format!("bad GGUF header: {e}")))?;
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let content = gguf_file::Content::read(r).map_err(|e| {
        corrupt(format!(
            "cannot read the GGUF header ({})",
            one_line_err(&e)
        ))
    })?;
    check_tensor_bounds(&content, len).map_err(corrupt)?;
    Ok(content)
}

fn one_line_err(e: &candle_core::Error) -> String {
    super::limits::one_line(&e.to_string())
}

/// Every tensor's bytes, from the data offset candle computed, must end inside the file.
fn check_tensor_bounds(content: &gguf_file::Content, len: u64) -> Check<()> {
    for (name, info) in &content.tensor_infos {
        let t = info.ggml_dtype;
        let bytes = (info.shape.elem_count() / t.block_size()) as u64 * t.type_size() as u64;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| s.checked_add(bytes));
        match end {
            Some(end) if end <= len => {}
            _ => {
                return Err(format!(
                "tensor '{}' ends at byte {} but the file has {len} bytes (truncated download?)",
                quote(name, 80),
                end.map_or("past 2^64".to_string(), |e| e.to_string())
            ))
            }
        }
    }
    Ok(())
}

/// The checks a GGUF file passes before any tensor is read, on bytes in memory: header, tensor
/// bounds and the model config derived from the metadata. What the fuzz tests drive.
pub fn check_gguf_bytes(bytes: &[u8]) -> Result<ModelConfig> {
    let content = read_content(&mut Cursor::new(bytes), Path::new("<memory>"))?;
    let cfg = super::config_from_gguf(&content)?;
    super::check_gguf_blocks(&content, &cfg)?;
    Ok(cfg)
}
