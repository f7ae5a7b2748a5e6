//! A GGUF writer for tests that writes what it is told, valid or not: crafted headers for the
//! regression tests and seeds for the fuzz target. (candle's writer refuses some of what an
//! attacker would write.)

/// A metadata value as written on disk.
#[derive(Debug, Clone)]
pub enum V {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(u8),
    Str(String),
    /// A string with a declared length that need not match its bytes.
    RawStr(u64, Vec<u8>),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
    /// An array header with a declared element type and count, and no elements.
    RawArray(u32, u64),
}

/// A tensor info: GGUF dimension order (innermost first), ggml type, offset (None: next free
/// aligned offset, data written as zeros).
#[derive(Debug, Clone)]
pub struct T {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub offset: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct Gguf {
    pub version: u32,
    pub kv: Vec<(String, V)>,
    pub tensors: Vec<T>,
    /// Override the declared counts.
    pub n_tensors: Option<u64>,
    pub n_kv: Option<u64>,
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

fn put_value(out: &mut Vec<u8>, v: &V) {
    let ty = |out: &mut Vec<u8>, t: u32| out.extend(t.to_le_bytes());
    match v {
        V::U32(x) => {
            ty(out, 4);
            out.extend(x.to_le_bytes())
        }
        V::I32(x) => {
            ty(out, 5);
            out.extend(x.to_le_bytes())
        }
        V::U64(x) => {
            ty(out, 10);
            out.extend(x.to_le_bytes())
        }
        V::F32(x) => {
            ty(out, 6);
            out.extend(x.to_le_bytes())
        }
        V::Bool(b) => {
            ty(out, 7);
            out.push(*b)
        }
        V::Str(s) => {
            ty(out, 8);
            put_str(out, s.as_bytes())
        }
        V::RawStr(n, b) => {
            ty(out, 8);
            out.extend(n.to_le_bytes());
            out.extend(b);
        }
        V::Strs(xs) => {
            ty(out, 9);
            ty(out, 8);
            out.extend((xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|s| put_str(out, s.as_bytes()));
        }
        V::I32s(xs) => {
            ty(out, 9);
            ty(out, 5);
            out.extend((xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        V::F32s(xs) => {
            ty(out, 9);
            ty(out, 6);
            out.extend((xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        V::RawArray(t, n) => {
            ty(out, 9);
            ty(out, *t);
            out.extend(n.to_le_bytes());
        }
    }
}

/// Bytes of a tensor of GGUF dims and type (F32 / F16 / Q8_0 only; others count as F32).
fn tensor_bytes(t: &T) -> u64 {
    let n: u64 = t.dims.iter().product();
    match t.ty {
        1 => n * 2,
        8 => n / 32 * 34,
        _ => n * 4,
    }
}

impl Gguf {
    pub fn new() -> Self {
        Self {
            version: 3,
            ..Default::default()
        }
    }

    pub fn kv(mut self, k: &str, v: V) -> Self {
        self.kv.retain(|(key, _)| key != k);
        self.kv.push((k.into(), v));
        self
    }

    pub fn without(mut self, k: &str) -> Self {
        self.kv.retain(|(key, _)| key != k);
        self.tensors.retain(|t| t.name != k);
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64]) -> Self {
        self.tensors.retain(|t| t.name != name);
        self.tensors.push(T {
            name: name.into(),
            dims: dims.to_vec(),
            ty: 0,
            offset: None,
        });
        self
    }

    pub fn raw_tensor(mut self, t: T) -> Self {
        self.tensors.retain(|x| x.name != t.name);
        self.tensors.push(t);
        self
    }

    /// The file's bytes: header, tensor infos, padding to 32, zeroed tensor data (only for tensors
    /// without an explicit offset, and only when small).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        let n_t = self.n_tensors.unwrap_or(self.tensors.len() as u64);
        let n_kv = self.n_kv.unwrap_or(self.kv.len() as u64);
        out.extend(n_t.to_le_bytes());
        out.extend(n_kv.to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k.as_bytes());
            put_value(&mut out, v);
        }
        let mut next = 0u64;
        let mut data_len = 0u64;
        for t in &self.tensors {
            put_str(&mut out, t.name.as_bytes());
            out.extend((t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.ty.to_le_bytes());
            let off = t.offset.unwrap_or_else(|| {
                let o = next;
                let size = tensor_bytes(t).min(1 << 20);
                next = (o + size).div_ceil(32) * 32;
                data_len = next;
                o
            });
            out.extend(off.to_le_bytes());
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.resize(out.len() + data_len as usize, 0);
        out
    }

    pub fn write(&self, path: &std::path::Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

/// A tiny llama GGUF (1 block, width 8, 2 heads, 1 kv head, vocab 16) whose config derives: the
/// base of the crafted files.
pub fn tiny_llama() -> Gguf {
    let (d, ff, vocab, kv_dim) = (8u64, 16u64, 16u64, 4u64);
    // Byte-level BPE: "t" and "1" merge into "t1"; the rest are single letters.
    let tokens: Vec<String> = ["t", "1", "t1"]
        .into_iter()
        .map(String::from)
        .chain(
            (b'a'..)
                .take(vocab as usize - 3)
                .map(|c| (c as char).to_string()),
        )
        .collect();
    Gguf::new()
        .kv("general.architecture", V::Str("llama".into()))
        .kv("general.name", V::Str("tiny".into()))
        .kv("general.alignment", V::U32(32))
        .kv("llama.block_count", V::U32(1))
        .kv("llama.embedding_length", V::U32(d as u32))
        .kv("llama.feed_forward_length", V::U32(ff as u32))
        .kv("llama.attention.head_count", V::U32(2))
        .kv("llama.attention.head_count_kv", V::U32(1))
        .kv("llama.context_length", V::U32(64))
        .kv("llama.rope.freq_base", V::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5))
        .kv("tokenizer.ggml.model", V::Str("gpt2".into()))
        .kv("tokenizer.ggml.tokens", V::Strs(tokens))
        .kv(
            "tokenizer.ggml.token_type",
            V::I32s(vec![1; vocab as usize]),
        )
        .kv("tokenizer.ggml.merges", V::Strs(vec!["t 1".into()]))
        .kv("tokenizer.ggml.eos_token_id", V::U32(1))
        .tensor("token_embd.weight", &[d, vocab])
        .tensor("blk.0.attn_norm.weight", &[d])
        .tensor("blk.0.attn_q.weight", &[d, d])
        .tensor("blk.0.attn_k.weight", &[d, kv_dim])
        .tensor("blk.0.attn_v.weight", &[d, kv_dim])
        .tensor("blk.0.attn_output.weight", &[d, d])
        .tensor("blk.0.ffn_norm.weight", &[d])
        .tensor("blk.0.ffn_gate.weight", &[d, ff])
        .tensor("blk.0.ffn_up.weight", &[d, ff])
        .tensor("blk.0.ffn_down.weight", &[ff, d])
        .tensor("output_norm.weight", &[d])
}
