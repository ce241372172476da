// Fused Gated DeltaNet decode step (SPEC 3, 8) for 1..8 tokens per sequence, in place on a float32
// state pool [slots, H, K, V]:
//     (optional) q, k <- q / sqrt(|q|^2 + 1e-6), k / sqrt(|k|^2 + 1e-6)
//     S' = exp(g) S ;  u = beta (v - S'^T k) ;  S = S' + k u^T ;  o = scale S^T q
//                                              = scale (S'^T q + (q . k) u)
// Value columns are independent, so V is split across CTAs: grid (ceil(V / 32), H, B), 128
// threads. A CTA keeps its [K, 32] state slice in registers: each lane owns one float4 of a row,
// 8 lanes span the 32 columns, so a warp instruction moves 4 rows x 128 B (coalesced), and a thread
// holds KT / 16 rows. Per token, the two column reductions S'^T k and S'^T q run together: a
// butterfly over the 4 row lanes of a warp, then across the 4 warps through shared memory
// (double-buffered by token parity: one __syncthreads per token).
//
// ptxas -v (sm_90, nvcc 13.0), kernel<input dtype, tile dims>:
//   <bf16,128>         83 regs, 0/0 B spill st/ld, stack 0 B, static smem 11360 B
//   <bf16,256>        126 regs, 0/0 B spill st/ld, stack 0 B, static smem 19552 B
//   <bf16,64>          64 regs, 0/0 B spill st/ld, stack 0 B, static smem 7264 B
//   <fp16,128>         83 regs, 0/0 B spill st/ld, stack 0 B, static smem 11360 B
//   <fp16,256>        126 regs, 0/0 B spill st/ld, stack 0 B, static smem 19552 B
//   <fp16,64>          64 regs, 0/0 B spill st/ld, stack 0 B, static smem 7264 B
//   <fp32,128>         83 regs, 0/0 B spill st/ld, stack 0 B, static smem 11360 B
//   <fp32,256>        126 regs, 0/0 B spill st/ld, stack 0 B, static smem 19552 B
//   <fp32,64>          64 regs, 0/0 B spill st/ld, stack 0 B, static smem 7264 B
#include "common.cuh"
#include "decode_params.h"

namespace gka {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBV = 32;           // value columns per CTA
constexpr int kLPR = kBV / 4;     // lanes per row (one float4 each)
constexpr int kRPI = 32 / kLPR;   // rows per warp instruction
constexpr int kRG = kWarps * kRPI;  // row groups per CTA

// CTAs per SM the register budget is sized for (64 K registers / (128 threads x budget)).
constexpr int min_ctas(int KT) { return KT <= 64 ? 8 : KT <= 128 ? 5 : 3; }

template <typename T, int KT>
__global__ void __launch_bounds__(kThreads, min_ctas(KT)) gdn_decode_kernel(const GdnParams p) {
  constexpr int RPT = KT / kRG;   // rows per thread
  constexpr int PER = 8 / kRPI;   // reduced values a lane keeps after the butterfly
  __shared__ float qs[kMaxDecodeTokens][KT];  // normalized q * scale
  __shared__ float ks[kMaxDecodeTokens][KT];  // normalized k
  __shared__ __align__(16) float vs[kMaxDecodeTokens][kBV];  // read as float4
  __shared__ float decay[kMaxDecodeTokens], betas[kMaxDecodeTokens], qk[kMaxDecodeTokens];
  __shared__ __align__(16) float red[2][kWarps][kLPR][8];  // [parity][warp][col4][k-sums x4, q-sums x4]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cg = lane % kLPR, rgl = lane / kLPR;
  const int row0 = warp * kRPI + rgl;
  const int b = blockIdx.z, h = blockIdx.y;
  const int col = blockIdx.x * kBV + 4 * cg;
  const bool col_ok = col < p.V;
  const int Tn = p.Tn, K = p.K, V = p.V;
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h;

  const int64_t src = load_index(p.src_idx, p.src64, b);
  if (src < 0) {  // padding sequence: state untouched, output 0
    for (int i = threadIdx.x; i < Tn * kBV; i += kThreads) {
      const int c = blockIdx.x * kBV + i % kBV;
      if (c < V) out[(i / kBV) * p.so.t + c] = from_float<T>(0.f);
    }
    return;
  }
  const int64_t dst = load_index(p.dst_idx, p.dst64, b);
  const int64_t head_off = (int64_t)h * K * V + col;
  const int64_t slot_stride = (int64_t)p.H * K * V;

  float4 S[RPT];
  {
    const float* s_in = p.state + src * slot_stride + head_off;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = row0 + kRG * i;
      S[i] = (col_ok && r < K) ? *reinterpret_cast<const float4*>(s_in + (int64_t)r * V)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  // Stage the step's inputs: one warp per token normalizes q and k and forms q . k.
  for (int t = warp; t < Tn; t += kWarps) {
    const T* qp = static_cast<const T*>(p.q) + b * p.sq.b + t * p.sq.t + (h / p.q_group) * p.sq.h;
    const T* kp = static_cast<const T*>(p.k) + b * p.sk.b + t * p.sk.t + (h / p.k_group) * p.sk.h;
    float qv[KT / 32], kv[KT / 32];
    float qq = 0.f, kk = 0.f, qkd = 0.f;
#pragma unroll
    for (int j = 0; j < KT / 32; ++j) {
      const int i = lane + 32 * j;
      qv[j] = i < K ? to_float(qp[i]) : 0.f;
      kv[j] = i < K ? to_float(kp[i]) : 0.f;
      qq = fmaf(qv[j], qv[j], qq);
      kk = fmaf(kv[j], kv[j], kk);
      qkd = fmaf(qv[j], kv[j], qkd);
    }
    float qn = 1.f, kn = 1.f;
    if (p.l2norm) {
      qn = rsqrtf(warp_allreduce(qq) + 1e-6f);
      kn = rsqrtf(warp_allreduce(kk) + 1e-6f);
    }
    qkd = warp_allreduce(qkd);
    const float qsc = qn * p.scale;
#pragma unroll
    for (int j = 0; j < KT / 32; ++j) {
      qs[t][lane + 32 * j] = qv[j] * qsc;
      ks[t][lane + 32 * j] = kv[j] * kn;
    }
    if (lane == 0) qk[t] = qkd * qsc * kn;
  }
  for (int i = threadIdx.x; i < Tn * kBV; i += kThreads) {
    const int t = i / kBV, c = blockIdx.x * kBV + i % kBV;
    const T* vp = static_cast<const T*>(p.v) + b * p.sv.b + t * p.sv.t + (h / p.v_group) * p.sv.h;
    vs[t][i % kBV] = c < V ? to_float(vp[c]) : 0.f;
  }
  if (threadIdx.x < Tn) {
    const int t = threadIdx.x;
    decay[t] = __expf(load_scalar(p.g, p.g_dtype, b * p.sg.b + t * p.sg.t + h * p.sg.h));
    betas[t] = load_scalar(p.beta, p.beta_dtype, b * p.sbeta.b + t * p.sbeta.t + h * p.sbeta.h);
  }
  __syncthreads();

  for (int t = 0; t < Tn; ++t) {
    const float dec = decay[t];
    float part[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) part[e] = 0.f;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = row0 + kRG * i;
      const float kr = ks[t][r], qr = qs[t][r];
      S[i] = scale4(dec, S[i]);
      part[0] = fmaf(kr, S[i].x, part[0]);
      part[1] = fmaf(kr, S[i].y, part[1]);
      part[2] = fmaf(kr, S[i].z, part[2]);
      part[3] = fmaf(kr, S[i].w, part[3]);
      part[4] = fmaf(qr, S[i].x, part[4]);
      part[5] = fmaf(qr, S[i].y, part[5]);
      part[6] = fmaf(qr, S[i].z, part[6]);
      part[7] = fmaf(qr, S[i].w, part[7]);
    }
    butterfly_reduce<8, kRPI, kLPR>(part);
    float* slot = &red[t & 1][warp][cg][butterfly_first<8, kRPI, kLPR>(lane)];
#pragma unroll
    for (int e = 0; e < PER; ++e) slot[e] = part[e];
    __syncthreads();
    float4 ksum = make_float4(0.f, 0.f, 0.f, 0.f), qsum = ksum;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4* r4 = reinterpret_cast<const float4*>(red[t & 1][w][cg]);
      const float4 a = r4[0], c = r4[1];
      ksum = make_float4(ksum.x + a.x, ksum.y + a.y, ksum.z + a.z, ksum.w + a.w);
      qsum = make_float4(qsum.x + c.x, qsum.y + c.y, qsum.z + c.z, qsum.w + c.w);
    }
    const float bt = betas[t];
    const float4 v4 = *reinterpret_cast<const float4*>(&vs[t][4 * cg]);
    const float4 u = make_float4(bt * (v4.x - ksum.x), bt * (v4.y - ksum.y), bt * (v4.z - ksum.z),
                                 bt * (v4.w - ksum.w));
#pragma unroll
    for (int i = 0; i < RPT; ++i) S[i] = fma4(ks[t][row0 + kRG * i], u, S[i]);
    if (warp == 0 && rgl == 0 && col_ok) {
      const float c = qk[t];
      T* o = out + t * p.so.t + col;
      o[0] = from_float<T>(fmaf(c, u.x, qsum.x));
      o[1] = from_float<T>(fmaf(c, u.y, qsum.y));
      o[2] = from_float<T>(fmaf(c, u.z, qsum.z));
      o[3] = from_float<T>(fmaf(c, u.w, qsum.w));
    }
  }

  if (dst >= 0) {
    float* s_out = p.state + dst * slot_stride + head_off;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = row0 + kRG * i;
      if (col_ok && r < K) *reinterpret_cast<float4*>(s_out + (int64_t)r * V) = S[i];
    }
  }
}

template <typename T, int KT>
void launch(const GdnParams& p, cudaStream_t stream) {
  const dim3 grid((p.V + kBV - 1) / kBV, p.H, p.B);
  launch_kernel(gdn_decode_kernel<T, KT>, grid, kThreads, 0, stream, p);
}

}  // namespace

void gdn_decode_launch(const GdnParams& p, int dtype, uintptr_t stream) {
  if (p.Tn < 1 || p.Tn > kMaxDecodeTokens) throw std::invalid_argument("gdn_decode: Tn must be in [1, 8]");
  if (p.K < 1 || p.K > 256) throw std::invalid_argument("gdn_decode: K must be in [1, 256]");
  if (p.V < 4 || p.V % 4) throw std::invalid_argument("gdn_decode: V must be a positive multiple of 4");
  if (p.B > kMaxGridYZ || p.H > kMaxGridYZ) throw std::invalid_argument("gdn_decode: B and H must be <= 65535");
  if (p.B == 0) return;
  dispatch_tag(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.K <= 64) launch<T, 64>(p, as_stream(stream));
    else if (p.K <= 128) launch<T, 128>(p, as_stream(stream));
    else launch<T, 256>(p, as_stream(stream));
  });
  check_launch("gdn_decode");
}

}  // namespace gka
