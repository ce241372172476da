// Fused Mamba-2 selective state update (SPEC 4, 8) for 1..8 tokens per sequence, in place on a
// float32 state pool [slots, H, P, N]:
//     dt = dt + dt_bias ; dt = softplus(dt) (optional, identity above 20) ; dt = clamp(dt, lo, hi)
//     s = exp(dt A) s + dt x B^T ;  y = s C + D x ;  y = y * silu(z) (optional)
// Rows p of the state are independent, so P is split across CTAs: grid (ceil(P / BP), H, B), 128
// threads. Lanes run along N with one float4 each (a row of 128 floats is one warp instruction,
// coalesced); a thread keeps 32 state values (wide tiles: RPT rows x VPT float4), or 16 (narrow
// tiles, taken when the wide grid would leave SMs without a CTA, as at decode-1: 128 CTAs for 32
// heads of P = 128; GKA_KERNELS_DECODE_TILES overrides). The row sums s C are reduced inside the
// warp by a butterfly (RPT values over the lanes of a row), so no shared-memory reduction or barrier
// is needed inside the token loop. Load order: L1 prefetches of the token inputs, the slot indices,
// every per-head scalar, the state, then the staged inputs. H200 (session 9, bench suite, bf16,
// states from DRAM): decode-1 5.5 -> 5.2 us (prefetches and narrow tiles) -> 3.9 us (the
// single-token kernel below), decode-64 0.0728 -> 0.0714 ms (prefetches).
//
// ptxas -v (sm_90, nvcc 13.0), kernel<input dtype, NT, wide>; fp16 and fp32 inputs give the same:
//   <bf16,128,wide>    63 regs, 0/0 B spill st/ld, static smem 10304 B
//   <bf16,128,narrow>  63 regs, 0/0 B spill st/ld, static smem 9280 B
//   <bf16,64,wide>     63 regs, 0/0 B spill st/ld, static smem 8256 B
//   <bf16,64,narrow>   64 regs, 0/0 B spill st/ld, static smem 6208 B
//   <bf16,256,wide>    63 regs, 0/0 B spill st/ld, static smem 17472 B
//   <bf16,256,narrow>  63 regs, 0/0 B spill st/ld, static smem 16960 B
//   token kernel <bf16,128> 55 regs, <bf16,64> 62 regs, <bf16,256> 62 regs, 0/0 B spill st/ld, no smem
//   (with the build's --use_fast_math)
#include "common.cuh"
#include "decode_params.h"

namespace gka {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Wide tiles: a thread keeps 8 float4 of state; narrow tiles (small batches): 4.
template <int NT, bool WIDE>
struct Layout {
  static constexpr int NV = NT / 4;                  // float4 per state row
  static constexpr int LPR = NV < 32 ? NV : 32;      // lanes per row
  static constexpr int VPT = NV / LPR;               // float4 per thread per row
  static constexpr int RPI = 32 / LPR;               // rows per warp instruction
  static constexpr int RPT = (WIDE ? 8 : 4) / VPT;   // rows per thread
  static constexpr int BP = kWarps * RPI * RPT;      // rows per CTA
};

// This thread's part of a CTA's state tile (`tile`: the tile's first row, rows of N floats): rows
// lrow0 + kWarps * RPI * i (i < RPT), float4 columns cg + LPR * j (j < VPT); zero outside the
// `rows` valid rows and N columns.
template <typename L>
__device__ __forceinline__ void load_state(const float* tile, int rows, int N, int lrow0, int cg,
                                           float4 (&s)[L::RPT][L::VPT]) {
#pragma unroll
  for (int i = 0; i < L::RPT; ++i)
#pragma unroll
    for (int j = 0; j < L::VPT; ++j) {
      const int r = lrow0 + kWarps * L::RPI * i, c = 4 * (cg + L::LPR * j);
      s[i][j] = r < rows && c < N ? *reinterpret_cast<const float4*>(tile + (int64_t)r * N + c)
                                  : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

__device__ __forceinline__ float softplus(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }

template <typename T, int NT, bool WIDE>
__global__ void __launch_bounds__(kThreads, 8) mamba2_decode_kernel(const Mamba2Params p) {
  using L = Layout<NT, WIDE>;
  __shared__ __align__(16) float Bs[kMaxDecodeTokens][NT];
  __shared__ __align__(16) float Cs[kMaxDecodeTokens][NT];
  __shared__ float xs[kMaxDecodeTokens][L::BP];
  __shared__ float zs[kMaxDecodeTokens][L::BP];  // silu(z), staged only when z is given
  __shared__ float dts[kMaxDecodeTokens], dAs[kMaxDecodeTokens];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cg = lane % L::LPR, rgl = lane / L::LPR;
  const int lrow0 = warp * L::RPI + rgl;  // local row of i = 0; row i is lrow0 + kWarps * RPI * i
  const int b = blockIdx.z, h = blockIdx.y, p0 = blockIdx.x * L::BP;
  const int Tn = p.Tn, P = p.P, N = p.N;
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h;

  // Output row written by this lane after the butterfly (W / M lanes share it; the first writes).
  constexpr int SHARE = L::LPR / L::RPT > 1 ? L::LPR / L::RPT : 1;
  const int own = butterfly_first<L::RPT, L::LPR, 1>(lane);
  const int own_lrow = lrow0 + kWarps * L::RPI * own;
  const bool writer = (cg % SHARE) == 0 && p0 + own_lrow < P;

  // Loads are issued in dependency order: L1 prefetches of the token inputs (B and C rows, this
  // CTA's x and z rows; warp w takes tokens w, w + kWarps, ..., lane j line j of a row), the slot
  // indices, every per-head scalar (none of these depends on the slot, so their latency overlaps
  // the index -> state chain instead of following it), then the state, then the staged inputs.
  for (int t = warp; t < Tn; t += kWarps) {
    const int np = L::BP < P - p0 ? L::BP : P - p0;
    prefetch_line(static_cast<const T*>(p.Bm) + b * p.sB.b + t * p.sB.t + (h / p.B_group) * p.sB.h, N * sizeof(T), lane);
    prefetch_line(static_cast<const T*>(p.Cm) + b * p.sC.b + t * p.sC.t + (h / p.C_group) * p.sC.h, N * sizeof(T), lane);
    prefetch_line(static_cast<const T*>(p.x) + b * p.sx.b + t * p.sx.t + (h / p.x_group) * p.sx.h + p0, np * sizeof(T),
                  lane);
    if (p.z) prefetch_line(static_cast<const T*>(p.z) + b * p.sz.b + t * p.sz.t + h * p.sz.h + p0, np * sizeof(T), lane);
  }
  const int64_t src = load_index(p.src_idx, p.src64, b);
  const int64_t dst = load_index(p.dst_idx, p.dst64, b);
  float dt_raw = 0.f, dt_bias = 0.f, a_h = 0.f, dcoef = 0.f;
  if (threadIdx.x < Tn) {
    dt_raw = load_scalar(p.dt, p.dt_dtype, b * p.sdt.b + threadIdx.x * p.sdt.t + h * p.sdt.h);
    if (p.dt_bias) dt_bias = load_scalar(p.dt_bias, p.dt_bias_dtype, h);
    a_h = load_scalar(p.A, p.A_dtype, h);
  }
  if (writer && p.D) dcoef = load_scalar(p.D, p.D_dtype, h * p.D_stride_h + (p0 + own_lrow) * p.D_stride_p);

  if (src < 0) {  // padding sequence: state untouched, output 0
    for (int i = threadIdx.x; i < Tn * L::BP; i += kThreads) {
      const int r = p0 + i % L::BP;
      if (r < P) out[(i / L::BP) * p.so.t + r] = from_float<T>(0.f);
    }
    return;
  }
  const int64_t head_off = ((int64_t)h * P + p0) * N;
  const int64_t slot_stride = (int64_t)p.H * P * N;

  float4 s[L::RPT][L::VPT];
  load_state<L>(p.state + src * slot_stride + head_off, P - p0, N, lrow0, cg, s);

  // Stage the step's inputs (B, C zero-padded to NT so padded state columns stay 0).
  const int hb = h / p.B_group, hc = h / p.C_group, hx = h / p.x_group;
  for (int i = threadIdx.x; i < Tn * NT; i += kThreads) {
    const int t = i / NT, n = i % NT;
    const T* bp = static_cast<const T*>(p.Bm) + b * p.sB.b + t * p.sB.t + hb * p.sB.h;
    const T* cp = static_cast<const T*>(p.Cm) + b * p.sC.b + t * p.sC.t + hc * p.sC.h;
    Bs[t][n] = n < N ? to_float(bp[n]) : 0.f;
    Cs[t][n] = n < N ? to_float(cp[n]) : 0.f;
  }
  for (int i = threadIdx.x; i < Tn * L::BP; i += kThreads) {
    const int t = i / L::BP, r = p0 + i % L::BP;
    const T* xp = static_cast<const T*>(p.x) + b * p.sx.b + t * p.sx.t + hx * p.sx.h;
    xs[t][i % L::BP] = r < P ? to_float(xp[r]) : 0.f;
    if (p.z) {
      const T* zp = static_cast<const T*>(p.z) + b * p.sz.b + t * p.sz.t + h * p.sz.h;
      const float zv = r < P ? to_float(zp[r]) : 0.f;
      zs[t][i % L::BP] = zv / (1.f + __expf(-zv));
    }
  }
  if (threadIdx.x < Tn) {
    float d = dt_raw + dt_bias;
    if (p.softplus) d = softplus(d);
    d = fminf(fmaxf(d, p.dt_min), p.dt_max);
    dts[threadIdx.x] = d;
    dAs[threadIdx.x] = __expf(d * a_h);
  }
  __syncthreads();

  for (int t = 0; t < Tn; ++t) {
    const float dA = dAs[t], dtt = dts[t];
    float4 Bv[L::VPT], Cv[L::VPT];
#pragma unroll
    for (int j = 0; j < L::VPT; ++j) {
      Bv[j] = reinterpret_cast<const float4*>(Bs[t])[cg + L::LPR * j];
      Cv[j] = reinterpret_cast<const float4*>(Cs[t])[cg + L::LPR * j];
    }
    float part[L::RPT];
#pragma unroll
    for (int i = 0; i < L::RPT; ++i) {
      const float coef = dtt * xs[t][lrow0 + kWarps * L::RPI * i];
      part[i] = 0.f;
#pragma unroll
      for (int j = 0; j < L::VPT; ++j) {
        s[i][j] = fma4(coef, Bv[j], scale4(dA, s[i][j]));
        part[i] = dot4(s[i][j], Cv[j], part[i]);
      }
    }
    butterfly_reduce<L::RPT, L::LPR, 1>(part);
    if (writer) {
      const float xr = xs[t][own_lrow];
      float y = fmaf(dcoef, xr, part[0]);
      if (p.z) y *= zs[t][own_lrow];
      out[t * p.so.t + p0 + own_lrow] = from_float<T>(y);
    }
  }

  if (dst >= 0) {
    float* s_out = p.state + dst * slot_stride + head_off;
#pragma unroll
    for (int i = 0; i < L::RPT; ++i)
#pragma unroll
      for (int j = 0; j < L::VPT; ++j) {
        const int r = lrow0 + kWarps * L::RPI * i, c = 4 * (cg + L::LPR * j);
        if (p0 + r < P && c < N) *reinterpret_cast<float4*>(s_out + (int64_t)r * N + c) = s[i][j];
      }
  }
}

// Single-token step (Tn = 1) with narrow tiles (decode-1), no shared memory and no barrier: every lane
// loads its own columns of B and C (4 per float4 of state), the x of its rows and the z and D of its
// output row, and computes dt and exp(dt A) itself (the same scalars in every lane, served by L1).
// Load order: the slot index (the padding test waits for it), the state, then every input, and no
// loaded value is used before all of them are issued (a bf16 -> float conversion is a use: placed
// earlier it made each lane wait for its input loads before it could issue the state's). The new
// state is stored right after its update, before the row sums. H200 (session 9, suite, bf16,
// states from DRAM): decode-1 5.0 us with the inputs loaded and converted before the state, 3.9 us
// in this order (Triton and mamba_ssm 3.7 us).
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 8) mamba2_decode_token_kernel(const Mamba2Params p) {
  using L = Layout<NT, false>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cg = lane % L::LPR, rgl = lane / L::LPR;
  const int lrow0 = warp * L::RPI + rgl;  // local row of i = 0; row i is lrow0 + kWarps * RPI * i
  const int b = blockIdx.z, h = blockIdx.y, p0 = blockIdx.x * L::BP;
  const int P = p.P, N = p.N;
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h;
  constexpr int SHARE = L::LPR / L::RPT > 1 ? L::LPR / L::RPT : 1;
  const int own_lrow = lrow0 + kWarps * L::RPI * butterfly_first<L::RPT, L::LPR, 1>(lane);
  const bool writer = (cg % SHARE) == 0 && p0 + own_lrow < P;

  const int64_t src = load_index(p.src_idx, p.src64, b);
  const int64_t dst = load_index(p.dst_idx, p.dst64, b);
  if (src < 0) {  // padding sequence: state untouched, output 0
    if (writer) out[p0 + own_lrow] = from_float<T>(0.f);
    return;
  }
  const int64_t head_off = ((int64_t)h * P + p0) * N;
  const int64_t slot_stride = (int64_t)p.H * P * N;
  float4 s[L::RPT][L::VPT];
  load_state<L>(p.state + src * slot_stride + head_off, P - p0, N, lrow0, cg, s);

  const float dt_raw = load_scalar(p.dt, p.dt_dtype, b * p.sdt.b + h * p.sdt.h);
  const float dt_bias = p.dt_bias ? load_scalar(p.dt_bias, p.dt_bias_dtype, h) : 0.f;
  const float a_h = load_scalar(p.A, p.A_dtype, h);
  const T* bp = static_cast<const T*>(p.Bm) + b * p.sB.b + (h / p.B_group) * p.sB.h;
  const T* cp = static_cast<const T*>(p.Cm) + b * p.sC.b + (h / p.C_group) * p.sC.h;
  const T* xp = static_cast<const T*>(p.x) + b * p.sx.b + (h / p.x_group) * p.sx.h + p0;
  T braw[L::VPT][4], craw[L::VPT][4], xraw[L::RPT];  // converted to float once all are issued
#pragma unroll
  for (int j = 0; j < L::VPT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = 4 * (cg + L::LPR * j) + e;  // N is a multiple of 4
      braw[j][e] = c < N ? bp[c] : from_float<T>(0.f);
      craw[j][e] = c < N ? cp[c] : from_float<T>(0.f);
    }
#pragma unroll
  for (int i = 0; i < L::RPT; ++i) {
    const int r = lrow0 + kWarps * L::RPI * i;
    xraw[i] = p0 + r < P ? xp[r] : from_float<T>(0.f);
  }
  T x_own = from_float<T>(0.f), z_own = from_float<T>(0.f);
  float dcoef = 0.f;
  if (writer) {
    x_own = xp[own_lrow];
    if (p.z) z_own = static_cast<const T*>(p.z)[b * p.sz.b + h * p.sz.h + p0 + own_lrow];
    if (p.D) dcoef = load_scalar(p.D, p.D_dtype, h * p.D_stride_h + (p0 + own_lrow) * p.D_stride_p);
  }

  float d = dt_raw + dt_bias;
  if (p.softplus) d = softplus(d);
  d = fminf(fmaxf(d, p.dt_min), p.dt_max);
  const float dA = __expf(d * a_h);
  float* s_out = p.state + dst * slot_stride + head_off;
  float part[L::RPT];
#pragma unroll
  for (int i = 0; i < L::RPT; ++i) {
    const int r = lrow0 + kWarps * L::RPI * i;
    const float coef = d * to_float(xraw[i]);
    part[i] = 0.f;
#pragma unroll
    for (int j = 0; j < L::VPT; ++j) {
      const int c = 4 * (cg + L::LPR * j);
      const float4 bv = make_float4(to_float(braw[j][0]), to_float(braw[j][1]), to_float(braw[j][2]), to_float(braw[j][3]));
      const float4 cv = make_float4(to_float(craw[j][0]), to_float(craw[j][1]), to_float(craw[j][2]), to_float(craw[j][3]));
      s[i][j] = fma4(coef, bv, scale4(dA, s[i][j]));
      if (dst >= 0 && p0 + r < P && c < N) *reinterpret_cast<float4*>(s_out + (int64_t)r * N + c) = s[i][j];
      part[i] = dot4(s[i][j], cv, part[i]);
    }
  }
  butterfly_reduce<L::RPT, L::LPR, 1>(part);
  if (writer) {
    const float z = to_float(z_own), gate = p.z ? z / (1.f + __expf(-z)) : 1.f;
    out[p0 + own_lrow] = from_float<T>(fmaf(dcoef, to_float(x_own), part[0]) * gate);
  }
}

template <typename T, int NT, bool WIDE>
void launch(const Mamba2Params& p, cudaStream_t stream) {
  constexpr int BP = Layout<NT, WIDE>::BP;
  const dim3 grid((p.P + BP - 1) / BP, p.H, p.B);
  // The single-token kernel only with narrow tiles: with wide ones it spills (64-register budget)
  // and was slower than the staged kernel (H200, session 9: decode-64 0.0745 vs 0.0716 ms).
  if constexpr (!WIDE) {
    if (p.Tn == 1) return launch_kernel(mamba2_decode_token_kernel<T, NT>, grid, kThreads, 0, stream, p);
  }
  launch_kernel(mamba2_decode_kernel<T, NT, WIDE>, grid, kThreads, 0, stream, p);
}

// Narrow tiles when the wide ones would leave SMs without a CTA (decode-1: 128 CTAs for 32 heads of
// P = 128), so the state spreads over twice the CTAs; GKA_KERNELS_DECODE_TILES overrides it.
template <typename T, int NT>
void launch_tiles(const Mamba2Params& p, cudaStream_t stream) {
  const TileWidth w = decode_tile_setting();
  constexpr int BP = Layout<NT, true>::BP;
  const int64_t wide_ctas = static_cast<int64_t>(p.B) * p.H * ((p.P + BP - 1) / BP);
  const bool narrow = w == TileWidth::kNarrow || (w == TileWidth::kAuto && wide_ctas < sm_count("mamba2_decode: device query"));
  if (narrow) launch<T, NT, false>(p, stream);
  else launch<T, NT, true>(p, stream);
}

}  // namespace

void mamba2_decode_launch(const Mamba2Params& p, int dtype, uintptr_t stream) {
  if (p.Tn < 1 || p.Tn > kMaxDecodeTokens) throw std::invalid_argument("mamba2_decode: Tn must be in [1, 8]");
  if (p.N < 4 || p.N > 256 || p.N % 4) throw std::invalid_argument("mamba2_decode: N must be a multiple of 4 in [4, 256]");
  if (p.P < 1) throw std::invalid_argument("mamba2_decode: P must be positive");
  if (p.B > kMaxGridYZ || p.H > kMaxGridYZ) throw std::invalid_argument("mamba2_decode: B and H must be <= 65535");
  if (p.B == 0) return;
  dispatch_tag(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.N <= 64) launch_tiles<T, 64>(p, as_stream(stream));
    else if (p.N <= 128) launch_tiles<T, 128>(p, as_stream(stream));
    else launch_tiles<T, 256>(p, as_stream(stream));
  });
  check_launch("mamba2_decode");
}

}  // namespace gka
