//! An in-tree fuzz harness run by `cargo test`: seeded byte mutations of small seed inputs, for a
//! bounded wall time per target.
//!
//! Each target gets a deterministic seed (from its name, or `PGATE_FUZZ_SEED`), runs for
//! `PGATE_FUZZ_SECS` seconds (default [`DEFAULT_SECS`]) and checks two things on every input: the
//! parser does not panic (caught with `catch_unwind`), and an error it returns is one line. A failing
//! input is written to `target/fuzz-crashes/` and named in the test failure; the failing iteration
//! number plus the seed reproduce it. Inputs that parse are kept (a small pool) and mutated further,
//! a cheap stand-in for coverage feedback that lets mutations reach past the first checks.
//!
//! Shared by the fuzz tests of persona-gate and pgate-serve (`#[path]` include).
#![allow(dead_code)]

pub mod gguf;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Seconds per target when `PGATE_FUZZ_SECS` is unset: a dozen targets in well under a minute of
/// wall time on two cores (targets of one test binary run in parallel).
pub const DEFAULT_SECS: f64 = 8.0;

/// xorshift64*: deterministic across platforms and crate versions.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Integers that break parsers: zero, one, the edges of each width, huge counts.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    31,
    32,
    255,
    256,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    999_999_999_999,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// Makes a fresh structured input (e.g. a GGUF file with a few values replaced).
pub type Generator = dyn Fn(&mut Rng) -> Vec<u8>;

/// A target: a name for messages and files, seeds, a dictionary of tokens worth splicing in, an
/// optional generator of fresh structured inputs, and a bound on input size.
pub struct Target<'a> {
    pub name: &'a str,
    pub seeds: Vec<Vec<u8>>,
    pub dict: &'a [&'a [u8]],
    pub generate: Option<&'a Generator>,
    pub max_len: usize,
}

fn env_secs() -> f64 {
    std::env::var("PGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s >= 0.0)
        .unwrap_or(DEFAULT_SECS)
}

/// FNV-1a of the target name: each target its own fixed seed.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn seed_for(name: &str) -> u64 {
    std::env::var("PGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| s ^ name_seed(name))
        .unwrap_or_else(|| name_seed(name))
}

/// One random edit of `buf`.
pub fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, dict: &[&[u8]], others: &[Vec<u8>], max: usize) {
    let pos = |rng: &mut Rng, b: &Vec<u8>| rng.below(b.len() + 1);
    match rng.below(11) {
        0 if !buf.is_empty() => {
            let i = rng.below(buf.len());
            buf[i] ^= 1 << rng.below(8);
        }
        1 if !buf.is_empty() => {
            let i = rng.below(buf.len());
            buf[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xff, b'\n', b'"', b'\\', b'{', b'[']);
        }
        2 if buf.len() >= 8 => {
            // An interesting integer written over 1, 2, 4 or 8 bytes (little-endian).
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let i = rng.below(buf.len() - width + 1);
            let v = rng.pick(INTERESTING).to_le_bytes();
            buf[i..i + width].copy_from_slice(&v[..width]);
        }
        3 if !buf.is_empty() => {
            let i = rng.below(buf.len());
            let n = 1 + rng.below((buf.len() - i).min(32));
            buf.drain(i..i + n);
        }
        4 if !dict.is_empty() => {
            let i = pos(rng, buf);
            let t = rng.pick(dict);
            buf.splice(i..i, t.iter().copied());
        }
        5 if !dict.is_empty() && !buf.is_empty() => {
            let i = rng.below(buf.len());
            let n = 1 + rng.below((buf.len() - i).min(8));
            let t = rng.pick(dict);
            buf.splice(i..i + n, t.iter().copied());
        }
        6 if !buf.is_empty() => {
            // Duplicate a chunk (repeats structures: array elements, table entries).
            let i = rng.below(buf.len());
            let n = 1 + rng.below((buf.len() - i).min(64));
            let chunk = buf[i..i + n].to_vec();
            let j = pos(rng, buf);
            buf.splice(j..j, chunk);
        }
        7 if !buf.is_empty() => {
            let n = rng.below(buf.len());
            buf.truncate(n);
        }
        8 if !others.is_empty() => {
            // Crossover: a prefix of this input, a suffix of another.
            let o = rng.pick(others);
            let i = pos(rng, buf);
            let j = rng.below(o.len() + 1);
            buf.truncate(i);
            buf.extend_from_slice(&o[j..]);
        }
        9 => {
            let i = pos(rng, buf);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            buf.splice(i..i, bytes);
        }
        _ if buf.len() >= 2 => {
            let i = rng.below(buf.len());
            let j = rng.below(buf.len());
            buf.swap(i, j);
        }
        _ => buf.push(rng.next() as u8),
    }
    buf.truncate(max);
}

/// Where failing inputs are written.
fn crash_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("fuzz-crashes")
}

fn fail(name: &str, seed: u64, iter: u64, input: &[u8], why: &str) -> ! {
    let dir = crash_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{seed}-{iter}.bin"));
    let _ = std::fs::write(&path, input);
    panic!(
        "fuzz target '{name}' (seed {seed}, iteration {iter}): {why}; input saved to {} ({:?})",
        path.display(),
        String::from_utf8_lossy(&input[..input.len().min(300)])
    );
}

/// Run `check` on mutated inputs for the time budget. `check` returns `Ok(true)` when the input
/// parsed, `Ok(false)` when it was refused properly, and `Err(message)` when it was refused with a
/// message of several lines.
pub fn run(t: Target<'_>, check: impl Fn(&[u8]) -> Result<bool, String>) {
    let seed = seed_for(t.name);
    let mut rng = Rng::new(seed);
    let budget = Duration::from_secs_f64(env_secs());
    let start = Instant::now();
    let mut pool: Vec<Vec<u8>> = t.seeds.clone();
    let (mut iters, mut parsed) = (0u64, 0u64);
    let exec = |input: &[u8], iter: u64| -> bool {
        match catch_unwind(AssertUnwindSafe(|| check(input))) {
            Ok(Ok(ok)) => ok,
            Ok(Err(msg)) => fail(
                t.name,
                seed,
                iter,
                input,
                &format!("multi-line error: {msg:?}"),
            ),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                fail(t.name, seed, iter, input, &format!("panic: {msg}"))
            }
        }
    };
    for s in &t.seeds {
        exec(s, 0);
    }
    while start.elapsed() < budget {
        iters += 1;
        let mut input = match t.generate {
            Some(g) if rng.chance(4) => g(&mut rng),
            _ => rng.pick(&pool).clone(),
        };
        for _ in 0..1 + rng.below(6) {
            mutate(&mut rng, &mut input, t.dict, &pool, t.max_len);
        }
        if exec(&input, iters) {
            parsed += 1;
            if pool.len() < 256 {
                pool.push(input);
            } else {
                let i = t.seeds.len() + rng.below(pool.len() - t.seeds.len());
                pool[i] = input;
            }
        }
    }
    eprintln!(
        "fuzz {}: {iters} inputs in {:.1}s ({parsed} parsed), seed {seed}",
        t.name,
        start.elapsed().as_secs_f64()
    );
}

/// `Err(msg)` when an error message is not one line, for [`run`]'s check functions.
pub fn one_line(msg: String) -> Result<bool, String> {
    if msg.contains('\n') || msg.contains('\r') {
        Err(msg)
    } else {
        Ok(false)
    }
}
