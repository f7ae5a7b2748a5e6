//! The MLP's gated activation, `act(gate) * up`, in one pass on the GPU (bf16 in and out, f32 math).
//!
//! Why this exists: the unfused path writes the activation of the gate (the widest tensor of the
//! block), reads it back with the up projection and writes the product: in the 2k x 8 prefill
//! profile on an H200 those two kernels took 54 ms of ~515 (BENCHMARKS.md, issue 22), and at decode
//! they are two launches per layer. Here each thread reads eight gate and eight up values (16 bytes
//! each) and writes eight products, rounding once instead of twice. Gate and up may be separate
//! tensors or the two halves of one fused projection (rows then strided). Compiled with NVRTC at
//! first use, like the other kernels here.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::nvrtc::{Ptx, Switch};

const SRC: &str = r#"
__device__ __forceinline__ float act(float g, int gelu) {
    if (gelu) return 0.5f * g * (1.f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
    return g / (1.f + expf(-g));
}
// gate, up: rows of f values, `gs` / `us` elements apart; out: [rows, f]; f a multiple of 8.
// One thread per 8 outputs.
extern "C" __global__ void pg_glu_bf16(const u16* __restrict__ gate, const u16* __restrict__ up,
                                       u16* __restrict__ out, long long rows, int f,
                                       long long gs, long long us, int gelu) {
    const long long per_row = f / 8;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * per_row) return;
    const long long r = i / per_row, c = (i % per_row) * 8;
    const uint4 gv = *(const uint4*)(gate + r * gs + c);
    const uint4 uv = *(const uint4*)(up + r * us + c);
    const u16* ge = (const u16*)&gv;
    const u16* ue = (const u16*)&uv;
    uint4 ov;
    u16* oe = (u16*)&ov;
#pragma unroll
    for (int j = 0; j < 8; j++) oe[j] = f2bf(act(bf2f(ge[j]), gelu) * bf2f(ue[j]));
    *(uint4*)(out + r * f + c) = ov;
}
"#;

const MODULE: &str = "pgate_glu";
const FUNC: &str = "pg_glu_bf16";

static SWITCH: Switch = Switch::new("PGATE_FUSED_GLU", true);
static PTX: Ptx = Ptx::new("the fused GLU kernel", SRC, false);

/// Whether the fused kernel is on (`PGATE_FUSED_GLU=0` turns it off, for A/B runs).
pub fn enabled() -> bool {
    SWITCH.on()
}

/// `act(gate) * up` (bf16 on CUDA, same shapes `[.., f]`); `gelu` picks tanh-GELU over SiLU.
/// `None` when the kernel does not apply (off, other dtype or device, a width not a multiple of 8,
/// rows not evenly strided), so the caller takes the unfused path.
pub fn gated(gate: &Tensor, up: &Tensor, gelu: bool) -> candle_core::Result<Option<Tensor>> {
    let f = *gate.dims().last().unwrap_or(&0);
    let fits = |t: &Tensor| row_stride(t.layout()).is_some_and(|(_, s)| s % 8 == 0);
    if !enabled()
        || !gate.device().is_cuda()
        || gate.dtype() != DType::BF16
        || up.dtype() != DType::BF16
        || gate.dims() != up.dims()
        || f % 8 != 0
        || !fits(gate)
        || !fits(up)
    {
        return Ok(None);
    }
    Ok(Some(gate.apply_op2_no_bwd(up, &Glu { gelu })?))
}

/// `(rows, elements between rows)` when a layout is rows of a contiguous last dim, evenly strided
/// (a contiguous tensor, or a narrow of the last dim such as one half of a fused projection).
fn row_stride(l: &Layout) -> Option<(usize, usize)> {
    let (dims, st) = (l.shape().dims(), l.stride());
    let n = dims.len();
    if n < 2 || st[n - 1] != 1 {
        return None;
    }
    let rs = st[n - 2];
    // The leading dims must collapse into one run of rows `rs` apart.
    for i in 0..n - 2 {
        if dims[i + 1] > 1 && st[i] != st[i + 1] * dims[i + 1] {
            return None;
        }
    }
    Some((dims[..n - 1].iter().product(), rs))
}

struct Glu {
    gelu: bool,
}

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        "pgate-glu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused GLU runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        sg: &CudaStorage,
        lg: &Layout,
        su: &CudaStorage,
        lu: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (Some((rows, gs)), Some((_, us))) = (row_stride(lg), row_stride(lu)) else {
            candle_core::bail!("the fused GLU needs evenly strided rows");
        };
        if lg.start_offset() % 8 != 0 || lu.start_offset() % 8 != 0 || gs % 8 != 0 || us % 8 != 0 {
            candle_core::bail!("the fused GLU needs 16-byte aligned rows");
        }
        let dims = lg.shape().dims();
        let f = dims[dims.len() - 1];
        let dev = sg.device().clone();
        let g = sg.as_cuda_slice::<half::bf16>()?.slice(lg.start_offset()..);
        let u = su.as_cuda_slice::<half::bf16>()?.slice(lu.start_offset()..);
        // SAFETY: every output element is written by the kernel below.
        let out = unsafe { dev.alloc::<half::bf16>(rows * f)? };
        let func = dev.get_or_load_custom_func(FUNC, MODULE, PTX.get("")?)?;
        let (rows_i, f_i, gelu_i) = (rows as i64, f as i32, self.gelu as i32);
        let (gs_i, us_i) = (gs as i64, us as i64);
        let mut b = func.builder();
        b.arg(&g);
        b.arg(&u);
        b.arg(&out);
        b.arg(&rows_i);
        b.arg(&f_i);
        b.arg(&gs_i);
        b.arg(&us_i);
        b.arg(&gelu_i);
        let threads = rows * f / 8;
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: thread i < rows * f / 8 reads 8 gate and 8 up values of its row (rows `gs` /
        // `us` apart, as the layouts say) and writes 8 outputs, all inside the slices.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), lg.shape().clone()))
    }
}
