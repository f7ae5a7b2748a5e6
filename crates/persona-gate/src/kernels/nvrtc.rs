//! What the NVRTC-compiled GPU kernels share: the bf16 helpers of their device code, the switch
//! that turns each off for A/B runs, and the once-per-process compilation of their sources.
//!
//! Why NVRTC and no headers: the kernels compile at first use with the CUDA runtime candle already
//! loads, on whatever GPU the binary meets, so the build machine needs no GPU and the binary no
//! `.cubin` per architecture. Without headers, bf16 values are raw 16-bit words and tensor-core and
//! async-copy instructions are inline PTX.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::cudarc;

/// Device code every kernel source starts with: 16/32-bit words, bf16 <-> f32 (round to nearest
/// even; NaN kept NaN), and asynchronous 16-byte global -> shared copies (`cp.async`).
pub(crate) const PRELUDE: &str = r#"
typedef unsigned short u16;
typedef unsigned int u32;
__device__ __forceinline__ float bf2f(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ u16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
// 16 bytes global -> shared without registers; zero-filled when `bytes` is 0.
__device__ __forceinline__ void cp16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait_1() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_wait_0() { asm volatile("cp.async.wait_group 0;\n" ::); }
"#;

/// An on/off switch read once from the environment: `VAR=0` turns a default-on kernel off,
/// `VAR=1` turns a default-off one on.
pub(crate) struct Switch {
    var: &'static str,
    default_on: bool,
    cell: OnceLock<bool>,
}

impl Switch {
    pub(crate) const fn new(var: &'static str, default_on: bool) -> Self {
        Self {
            var,
            default_on,
            cell: OnceLock::new(),
        }
    }

    pub(crate) fn on(&self) -> bool {
        *self
            .cell
            .get_or_init(|| match std::env::var(self.var).as_deref() {
                Ok("0") => false,
                Ok("1") => true,
                _ => self.default_on,
            })
    }
}

/// A kernel source compiled to PTX once per variant (its `#define` lines) for the life of the
/// process; a failed compilation is remembered and returned again as the same error.
pub(crate) struct Ptx {
    what: &'static str,
    src: &'static str,
    fast_math: bool,
    cache: OnceLock<Mutex<HashMap<String, Result<&'static str, String>>>>,
}

impl Ptx {
    /// `what` names the kernel in errors; `fast_math` lets `exp2f` become one `ex2.approx`.
    pub(crate) const fn new(what: &'static str, src: &'static str, fast_math: bool) -> Self {
        Self {
            what,
            src,
            fast_math,
            cache: OnceLock::new(),
        }
    }

    /// The PTX of the source with `defines` (e.g. `"#define HD 128\n"`) before it.
    pub(crate) fn get(&self, defines: &str) -> candle_core::Result<&'static str> {
        let map = self.cache.get_or_init(Default::default);
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(defines.to_string()).or_insert_with(|| {
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some("compute_90"),
                use_fast_math: self.fast_math.then_some(true),
                ..Default::default()
            };
            let src = format!("{defines}{PRELUDE}{}", self.src);
            cudarc::nvrtc::compile_ptx_with_opts(src, opts)
                // One module per variant for the life of the process.
                .map(|p| &*Box::leak(p.to_src().into_boxed_str()))
                .map_err(|e| format!("compiling {}: {e:?}", self.what))
        });
        entry.clone().map_err(candle_core::Error::Msg)
    }
}
