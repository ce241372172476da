// Fused Gated KalmaNet decode step (SPEC 5, 8) for 1..8 tokens per sequence, tied decays, in place
// on float32 pools h_kk [slots, H, K, K] and h_kv [slots, H, K, V]. Per token:
//     H = e^g H + k k^T ;  fro = ||H||_F (1 if 0) ;  lam = ridge * fro
//     Chebyshev on [lam, lam + fro]:  gamma = 2 / (2 lam + fro),  c = (fro / (2 lam + fro) / 2)^2
//         x_prev = 0, x = gamma q, w = 2;  num_iter times:  w = 1 / (1 - c w)
//         d = gamma w ((H + lam I) x - q) + (w - 1) x_prev ;  x_prev = x ;  x = w x - d
//     qm = q + alpha (x - q) ;  U = e^g U + k v^T ;  o = scale U^T qm
// Since lam = ridge * fro, c = (1 / (2 (2 ridge + 1)))^2, the weights w_i, gamma lam = 2 ridge /
// (2 ridge + 1) and gamma fro do not depend on the data: with r = 1 / (2 ridge + 1) the update is
//         x' = a_i x - (b_i / fro) (H x - q) - e_i x_prev,   a_i = r w_i, b_i = 2 r w_i, e_i = w_i - 1
// and the host computes (a_i, b_i, e_i) once per launch (double precision), so an iteration's
// dependent chain after the row sums is three FMAs (no division).
// One CTA of 256 threads per (sequence, head), two CTAs per SM; K and V are padded to one tile
// D = 64 or 128. Small batches (decode-1) split a head over a cluster of two CTAs on two SMs (see
// split_setting): both solve on the whole H, each owns half of U's and o's value columns and
// stores half of H's rows. As the pool may be updated in place (dst = src), those stores wait on a
// cluster barrier that both CTAs arrive at once their registers hold H[src]. The cost is the matvec H x of every iteration, so H stays in registers for the
// whole step: lane bits 0-2 pick a column group (D / 32 float4 at stride 32 columns, conflict-free
// LDS.128 of x), lane bits 3-4 and the warp pick D / 32 consecutive rows; a thread holds D^2 / 256
// floats. An iteration is D / 32 LDS.128 of x, the FMAs, a 3-stage butterfly over the 8 column
// lanes (the row sums land on the lanes that own the row's iterate), one STS and one
// __syncthreads (x is double-buffered). U is not needed until the solves are done: it is
// prefetched into shared memory with cp.async, issued after the loads of H and the token inputs
// (which the solve waits on) and overlapping the solve, then updated
// and read out for all tokens with lanes along V (float4), warps along K, the K reduction
// finished across warps in shared memory. The token inputs are prefetched into L1 before the slot
// index is waited on, so that they do not queue behind the loads of H (H200, session 9: decode-1
// 14.9 -> 14.5 us at num_iter = 30, 8.4 -> 8.0 at 1; decode-64 0.1745 -> 0.1713 ms at 30). They are
// then loaded as raw values, every load issued before any is converted, and U's cp.async after
// them: converting each value right after its load (a use) had made each load wait for the one
// before, and U's copies for all of them (H200, run 64: decode-1 14.7 -> 13.5 us at num_iter = 30,
// 8.1 -> 7.0 at 1; decode-64 0.1720 -> 0.1690 ms at 30). Storing the split head's final states
// during the last solve instead of after it was slower (decode-1 15.1 us at 30, run 64).
//
// Staggered first wave: with many more CTAs than fit at once (decode-64: 2048 CTAs, 264 resident
// on an H200), every CTA of a wave would load, solve and store in step with the others, so DRAM
// idles through the solves (at num_iter = 30 the step took ~0.04 ms more than at 10, i.e. the
// twenty extra solves of ~7.8 waves, none of it hidden). The first wave is therefore split into
// G = kStaggerGroups groups by linear block index, group j starting j * num_iter * C cycles later
// (C = kSolveCyclesPerIter): each resident slot then runs its CTAs back to back from its own start,
// so some groups load while others solve. Applied only when the grid is at least two waves long
// (decode-1 never waits). The environment variable GKA_KERNELS_GKA_DECODE_STAGGER overrides it:
// "0" turns it off, "G:C" uses G groups and C cycles per iteration.
// Measured on an H200 (run 34, decode-64, ms at num_iter = 30 / 10 / 1):
//     off 0.1854 / 0.1457 / 0.1401    2:440 0.1779 / 0.1432 / 0.1402    3:440 0.1755 / 0.1414
//     4:330 0.1753 / 0.1403 / 0.1403  4:440 0.1820 / 0.1404           8:220 0.1784 / 0.1403
//     2:1320 0.1928 (too long a wait costs more than it hides).
// (2:880 0.1804, 3:660 0.1804, 8:330 0.1824.) For scale: one Chebyshev iteration of a CTA takes
// ~440 cycles (0.22 us at decode-1, run 27, at 1.98 GHz).
//
// Dynamic shared memory 4 * (D UV + 26 D + 8 UV + 32) B with UV = D / S value columns per CTA:
// 83,072 B at D = 128 (48,256 B for a split head).
// ptxas -v (sm_90, nvcc 13.0, this machine), kernel<input dtype, tile dims, CTAs per head>, every
// input dtype the same; no spills, no stack:
//   <bf16,128,1> 123 regs   <bf16,128,2> 123 regs   <bf16,64,1> 80 regs   <bf16,64,2> 77 regs
#include "common.cuh"
#include "decode_params.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace gka {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStaggerGroups = 4;              // see above
constexpr long long kSolveCyclesPerIter = 330;  // wait per group and Chebyshev iteration

template <int KT, int UV>
struct Smem {  // float offsets into the dynamic shared memory; UV: the CTA's value columns
  static constexpr int U = 0;                          // [KT][UV] h_kv staging, then [Tn][warps][UV] partial o
  static constexpr int Q = U + KT * UV;                // [8][KT]
  static constexpr int Kv = Q + kMaxDecodeTokens * KT;  // [8][KT]
  static constexpr int QM = Kv + kMaxDecodeTokens * KT;  // [8][KT]
  static constexpr int Vv = QM + kMaxDecodeTokens * KT;  // [8][UV]
  static constexpr int X = Vv + kMaxDecodeTokens * UV;   // [2][KT] Chebyshev iterate
  static constexpr int RED = X + 2 * KT;                 // [2][warps] Frobenius partials
  static constexpr int DEC = RED + 2 * kWarps;           // [8] e^g
  static constexpr int ALPHA = DEC + kMaxDecodeTokens;   // [8]
  static constexpr int SIZE = ALPHA + kMaxDecodeTokens;
  static_assert(kMaxDecodeTokens * kWarps * UV <= KT * UV, "partial outputs must fit the U staging area");
};

// Stores a thread's rows of H (the register layout of gka_decode_kernel) that fall in
// [row_lo, row_hi) to h_out [K, K].
template <int HR, int HC>
__device__ __forceinline__ void store_h(float* h_out, const float4 (&Hm)[HR][HC], int hrow0, int cg, int K,
                                        int row_lo, int row_hi) {
#pragma unroll
  for (int i = 0; i < HR; ++i)
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      const int r = hrow0 + i, c = 32 * j + 4 * cg;
      if (r >= row_lo && r < row_hi && r < K && c < K) *reinterpret_cast<float4*>(h_out + (int64_t)r * K + c) = Hm[i][j];
    }
}

// Fills p.cheb for p.num_iter iterations from p.ridge_ratio (see the header comment).
void chebyshev_coefficients(GkaParams& p) {
  const double r = 1.0 / (1.0 + 2.0 * p.ridge_ratio);
  const double c = 0.25 * r * r;
  double w = 2.0;
  for (int i = 0; i < p.num_iter; ++i) {
    w = 1.0 / (1.0 - c * w);
    p.cheb[i][0] = static_cast<float>(r * w);
    p.cheb[i][1] = static_cast<float>(2.0 * r * w);
    p.cheb[i][2] = static_cast<float>(w - 1.0);
  }
}

// One square tile D covers both head dims (K, V <= D): KT = VT = D. A head runs on S CTAs (a
// cluster when S > 1), CTA s owning value columns [s UV, (s + 1) UV) of U and o and rows
// [s KT / S, (s + 1) KT / S) of the H store; each of them solves on the whole H.
template <typename T, int D, int S>
__global__ void __launch_bounds__(kThreads, 2) gka_decode_kernel(const GkaParams p) {
  constexpr int KT = D, UV = D / S;
  using SM = Smem<KT, UV>;
  constexpr int HR = KT / 32;  // H rows per thread
  constexpr int HC = KT / 32;  // H float4 column chunks per thread
  constexpr int ULPR = UV / 4;          // U lanes per row
  constexpr int URPI = 32 / ULPR;       // U rows per warp instruction
  constexpr int URG = kWarps * URPI;    // U row groups
  constexpr int URPT = KT / URG;        // U rows per thread
  GKA_DYNAMIC_SMEM(float4, smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  float* Us = smem + SM::U;
  float* qs = smem + SM::Q;
  float* ks = smem + SM::Kv;
  float* qms = smem + SM::QM;
  float* vs = smem + SM::Vv;
  float* xbuf = smem + SM::X;
  float* red = smem + SM::RED;
  float* decay = smem + SM::DEC;
  float* alph = smem + SM::ALPHA;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int b = blockIdx.y, h = blockIdx.x / S, part_s = blockIdx.x % S;
  const int block = b * gridDim.x + blockIdx.x;  // launch order: heads fastest
  if (p.stagger_groups > 1 && block < p.first_wave)
    spin_cycles((block % p.stagger_groups) * p.stagger_cycles);
  const int Tn = p.Tn, K = p.K, V = p.V;
  const int v0 = part_s * UV, nv = UV < V - v0 ? UV : V - v0;  // this CTA's value columns (nv <= 0: none)
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h + v0;

  // L1 prefetches of the token inputs (q and k rows, this CTA's v columns, g, alpha), issued before
  // the slot index is waited on: warp w takes tokens w, w + kWarps, ..., lane j line j of a row.
  for (int t = warp; t < Tn; t += kWarps) {
    prefetch_line(static_cast<const T*>(p.q) + b * p.sq.b + t * p.sq.t + (h / p.q_group) * p.sq.h, K * sizeof(T), lane);
    prefetch_line(static_cast<const T*>(p.k) + b * p.sk.b + t * p.sk.t + (h / p.k_group) * p.sk.h, K * sizeof(T), lane);
    prefetch_line(static_cast<const T*>(p.v) + b * p.sv.b + t * p.sv.t + (h / p.v_group) * p.sv.h + v0,
                  (nv > 0 ? nv : 0) * sizeof(T), lane);
    const int gb = dtype_bytes(p.g_dtype);
    prefetch_line(static_cast<const char*>(p.g) + (b * p.sg.b + t * p.sg.t + h * p.sg.h) * gb, gb, lane);
    if (p.alpha) {
      const int ab = dtype_bytes(p.alpha_dtype);
      prefetch_line(static_cast<const char*>(p.alpha) + (b * p.salpha.b + t * p.salpha.t + h * p.salpha.h) * ab, ab,
                    lane);
    }
  }
  const int64_t src = load_index(p.src_idx, p.src64, b);
  if (src < 0) {  // padding sequence (every CTA of the cluster): states untouched, output 0
    for (int i = tid; i < Tn * nv; i += kThreads) out[(i / nv) * p.so.t + i % nv] = from_float<T>(0.f);
    return;
  }
  const int64_t dst = load_index(p.dst_idx, p.dst64, b);
  const int64_t kk_slot = (int64_t)p.H * K * K, kv_slot = (int64_t)p.H * K * V;
  const int64_t kk_head = (int64_t)h * K * K, kv_head = (int64_t)h * K * V;

  // 1. H = h_kk[src, h] into registers: issued first, as the solve waits on it.
  const int cg = lane % 8, rg = lane / 8;
  const int hrow0 = (warp * 4 + rg) * HR;
  float4 Hm[HR][HC];
  {
    const float* h_in = p.h_kk + src * kk_slot + kk_head;
#pragma unroll
    for (int i = 0; i < HR; ++i)
#pragma unroll
      for (int j = 0; j < HC; ++j) {
        const int r = hrow0 + i, c = 32 * j + 4 * cg;
        Hm[i][j] = (r < K && c < K) ? *reinterpret_cast<const float4*>(h_in + (int64_t)r * K + c)
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
      }
  }

  // 2. Load q, k, this CTA's columns of v, g and alpha as raw values, every load issued before any
  //    value is used (converting each value right after its load made every load wait for the
  //    previous one); element j of a thread is flat index tid + j * kThreads of [Tn][KT] / [Tn][UV].
  constexpr int QKPT = (kMaxDecodeTokens * KT + kThreads - 1) / kThreads;  // q / k elements per thread
  constexpr int VPT = (kMaxDecodeTokens * UV + kThreads - 1) / kThreads;   // v elements per thread
  const T zero = from_float<T>(0.f);
  T qraw[QKPT], kraw[QKPT], vraw[VPT];
#pragma unroll
  for (int j = 0; j < QKPT; ++j) {
    const int i = tid + j * kThreads, t = i / KT, c = i % KT;
    const bool ok = i < Tn * KT && c < K;
    const T* qp = static_cast<const T*>(p.q) + b * p.sq.b + t * p.sq.t + (h / p.q_group) * p.sq.h;
    const T* kp = static_cast<const T*>(p.k) + b * p.sk.b + t * p.sk.t + (h / p.k_group) * p.sk.h;
    qraw[j] = ok ? qp[c] : zero;
    kraw[j] = ok ? kp[c] : zero;
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int i = tid + j * kThreads, t = i / UV, c = i % UV;
    const T* vp = static_cast<const T*>(p.v) + b * p.sv.b + t * p.sv.t + (h / p.v_group) * p.sv.h + v0;
    vraw[j] = i < Tn * UV && c < nv ? vp[c] : zero;
  }
  uint32_t gbits = 0, abits = 0;
  if (tid < Tn) {
    gbits = load_scalar_bits(p.g, p.g_dtype, b * p.sg.b + tid * p.sg.t + h * p.sg.h);
    if (p.alpha) abits = load_scalar_bits(p.alpha, p.alpha_dtype, b * p.salpha.b + tid * p.salpha.t + h * p.salpha.h);
  }
  // 3. Prefetch this CTA's columns of U = h_kv[src, h] into shared memory (rows of nv floats,
  //    padded to UV), issued after H and the inputs so that those arrive first; U is not read
  //    before the solves end.
  {
    const float* u_in = p.h_kv + src * kv_slot + kv_head + v0;
    const int v4 = nv > 0 ? nv / 4 : 0;
    for (int c = tid; c < K * v4; c += kThreads)
      cp_async16(Us + (c / v4) * UV + 4 * (c % v4), u_in + (int64_t)(c / v4) * V + 4 * (c % v4));
    cp_async_commit();
  }
  // 4. Stage the inputs as float32 (zero-padded to KT / UV), e^g and alpha.
#pragma unroll
  for (int j = 0; j < QKPT; ++j) {
    const int i = tid + j * kThreads;
    if (i < Tn * KT) {
      qs[i] = to_float(qraw[j]);
      ks[i] = to_float(kraw[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int i = tid + j * kThreads;
    if (i < Tn * UV) vs[i] = to_float(vraw[j]);
  }
  if (tid < Tn) {
    decay[tid] = __expf(scalar_from_bits(gbits, p.g_dtype));
    alph[tid] = p.alpha ? scalar_from_bits(abits, p.alpha_dtype) : 1.f;
  }

  __syncthreads();

  // After the butterfly over the 8 column lanes, this lane holds the sum of row own_row; the
  // (8 / HR) lanes holding the same row carry identical iterates, the first of them stores x.
  const int own_row = hrow0 + butterfly_first<HR, 8, 1>(lane);
  const bool writer = (cg % (8 / HR)) == 0;

  for (int t = 0; t < Tn; ++t) {
    // H update and ||H||_F^2.
    const float dec = decay[t];
    const float* kt = ks + t * KT;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      const float4 kc = reinterpret_cast<const float4*>(kt)[8 * j + cg];
#pragma unroll
      for (int i = 0; i < HR; ++i) {
        const float kr = kt[hrow0 + i];
        float4& m = Hm[i][j];
        m = fma4(kr, kc, scale4(dec, m));
        ss = dot4(m, m, ss);
      }
    }
    // Every CTA of a split head has read H[src] once its first update consumed the registers;
    // the H store below (dst may equal src) waits for the whole cluster to get here.
    if (S > 1 && t == 0) cluster_arrive();
    ss = warp_allreduce(ss);
    if (lane == 0) red[(t & 1) * kWarps + warp] = ss;
    __syncthreads();
    float fro2 = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) fro2 += red[(t & 1) * kWarps + w];
    const float inv_fro = fro2 > 0.f ? rsqrtf(fro2) : 1.f;
    const float gamma = 2.f * inv_fro / (1.f + 2.f * p.ridge_ratio);  // x_0 = gamma q

    if (S == 1 && t == Tn - 1 && dst >= 0) store_h(p.h_kk + dst * kk_slot + kk_head, Hm, hrow0, cg, K, 0, KT);

    // Chebyshev iteration; the first matvec H x_0 = gamma H q reads q directly.
    const float qr = qs[t * KT + own_row];
    float x = gamma * qr, xprev = 0.f;
    const float* xin = qs + t * KT;
    float ymul = gamma;
    for (int it = 0; it < p.num_iter; ++it) {
      const float ca = p.cheb[it][0], cb = p.cheb[it][1] * inv_fro, ce = p.cheb[it][2];
      float acc[HR];
#pragma unroll
      for (int i = 0; i < HR; ++i) acc[i] = 0.f;
#pragma unroll
      for (int j = 0; j < HC; ++j) {
        const float4 xv = reinterpret_cast<const float4*>(xin)[8 * j + cg];
#pragma unroll
        for (int i = 0; i < HR; ++i) acc[i] = dot4(Hm[i][j], xv, acc[i]);
      }
      butterfly_reduce<HR, 8, 1>(acc);
      const float r = fmaf(acc[0], ymul, -qr);  // H x - q
      const float xn = fmaf(ca, x, -fmaf(cb, r, ce * xprev));
      xprev = x;
      x = xn;
      if (it + 1 < p.num_iter) {
        float* xo = xbuf + (it & 1) * KT;
        if (writer) xo[own_row] = x;
        __syncthreads();
        xin = xo;
        ymul = 1.f;
      }
    }
    if (writer) qms[t * KT + own_row] = qr + alph[t] * (x - qr);
  }
  if (S > 1) {  // split head: store this CTA's rows of H once the cluster has read H[src]
    cluster_wait();
    if (dst >= 0) store_h(p.h_kk + dst * kk_slot + kk_head, Hm, hrow0, cg, K, part_s * (KT / S), (part_s + 1) * (KT / S));
  }

  // 5. U update and readout for every token.
  cp_async_wait_all();
  __syncthreads();
  const int ucg = lane % ULPR, url = lane / ULPR;
  const int urow0 = warp * URPI + url;
  const bool ucol_ok = 4 * ucg < nv;
  float4 Ur[URPT];
#pragma unroll
  for (int i = 0; i < URPT; ++i) {
    const int r = urow0 + URG * i;
    Ur[i] = (r < K && ucol_ok) ? reinterpret_cast<const float4*>(Us + r * UV)[ucg] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncthreads();  // the staging area now takes the partial outputs
  float* part = Us;
  for (int t = 0; t < Tn; ++t) {
    const float dec = decay[t];
    const float4 vv = reinterpret_cast<const float4*>(vs + t * UV)[ucg];
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < URPT; ++i) {
      const int r = urow0 + URG * i;
      Ur[i] = fma4(ks[t * KT + r], vv, scale4(dec, Ur[i]));
      const float qm = qms[t * KT + r];
      acc[0] = fmaf(qm, Ur[i].x, acc[0]);
      acc[1] = fmaf(qm, Ur[i].y, acc[1]);
      acc[2] = fmaf(qm, Ur[i].z, acc[2]);
      acc[3] = fmaf(qm, Ur[i].w, acc[3]);
    }
#pragma unroll
    for (int o = ULPR; o < 32; o <<= 1)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
    if (url == 0)
      reinterpret_cast<float4*>(part + (t * kWarps + warp) * UV)[ucg] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  }
  if (dst >= 0) {
    float* u_out = p.h_kv + dst * kv_slot + kv_head + v0;
#pragma unroll
    for (int i = 0; i < URPT; ++i) {
      const int r = urow0 + URG * i;
      if (r < K && ucol_ok) *reinterpret_cast<float4*>(u_out + (int64_t)r * V + 4 * ucg) = Ur[i];
    }
  }
  __syncthreads();
  for (int i = tid; i < Tn * nv; i += kThreads) {
    const int t = i / nv, c = i % nv;
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += part[(t * kWarps + w) * UV + c];
    out[t * p.so.t + c] = from_float<T>(p.scale * o);
  }
}

// (groups, cycles per Chebyshev iteration) of the staggered first wave: the defaults, or
// GKA_KERNELS_GKA_DECODE_STAGGER ("0": off; "G:C"), read once.
struct Stagger {
  int groups;
  long long cycles_per_iter;
};
Stagger stagger_setting() {
  static const Stagger s = [] {
    Stagger d{kStaggerGroups, kSolveCyclesPerIter};
    const char* v = std::getenv("GKA_KERNELS_GKA_DECODE_STAGGER");
    if (!v) return d;
    int g = 0;
    long long c = 0;
    if (std::string(v) == "0") return Stagger{1, 0};
    if (std::sscanf(v, "%d:%lld", &g, &c) == 2 && g >= 1 && c >= 0) return Stagger{g, c};
    throw std::invalid_argument("GKA_KERNELS_GKA_DECODE_STAGGER must be 0 or G:C, got " + std::string(v));
  }();
  return s;
}

// CTAs per head: GKA_KERNELS_GKA_DECODE_SPLIT = "auto" (the default), "1" or "2", read at every
// launch. "auto" takes 2 on sm_90 and later (clusters) when the grid still gets one SM per CTA and
// the second CTA owns value columns: a small batch (decode-1: 32 heads) then spreads each head's U
// traffic, readout and stores over two SMs. Measured on an H200 (run 47, us at num_iter 1 / 10 / 30,
// states from DRAM): batch 1: 1 CTA 9.6 / 11.6 / 16.0, 2 CTAs 8.3 / 10.3 / 14.8, 4 CTAs 8.0 / 11.1 /
// 17.7; batch 2: 10.3 / 12.3 / 16.7, 8.3 / 11.3 / 15.9, 13.4 / 18.3 / 29.3; batch 4 (256 CTAs at 2
// per head): 13.1 / 15.1 / 19.5, 13.1 / 16.0 / 22.6. Where CTAs have to share SMs, the repeated
// solves compete for the SM's FMA issue, which is the cost of an iteration (4 CTAs per head share
// SMs even at batch 1).
int split_setting(int D, int64_t heads, int V) {
  const int choice = env_choice("GKA_KERNELS_GKA_DECODE_SPLIT", {"auto", "1", "2"});
  if (choice == 1) return 1;
  const bool clusters = device_attribute<cudaDevAttrComputeCapabilityMajor>("gka_decode: device query") >= 9;
  if (choice == 2) {
    if (!clusters) throw std::invalid_argument("GKA_KERNELS_GKA_DECODE_SPLIT=2 needs thread block clusters (sm_90 or later)");
    return 2;
  }
  return clusters && heads * 2 <= sm_count("gka_decode: device query") && V > D / 2 ? 2 : 1;
}

template <typename T, int D, int S>
void launch(GkaParams& p, cudaStream_t stream) {
  constexpr size_t bytes = sizeof(float) * Smem<D, D / S>::SIZE;
  allow_dynamic_smem<gka_decode_kernel<T, D, S>>(bytes, "gka_decode: cudaFuncSetAttribute");
  if constexpr (S > 1) {
    p.first_wave = 0;
    p.stagger_groups = 1;
    p.stagger_cycles = 0;
    launch_cluster_kernel(gka_decode_kernel<T, D, S>, dim3(p.H * S, p.B), kThreads, bytes, stream, S, p);
  } else {
    // Resident CTAs: two per SM by the register budget (__launch_bounds__), fewer if shared memory
    // says so (sm_80: one).
    const int64_t resident = static_cast<int64_t>(std::min(2, ctas_by_smem(bytes))) * sm_count();
    const int64_t ctas = static_cast<int64_t>(p.B) * p.H;
    const Stagger st = stagger_setting();
    p.first_wave = static_cast<int>(std::min(ctas, resident));
    p.stagger_groups = ctas >= 2 * resident ? st.groups : 1;
    p.stagger_cycles = p.num_iter * st.cycles_per_iter;
    launch_kernel(gka_decode_kernel<T, D, S>, dim3(p.H, p.B), kThreads, bytes, stream, p);
  }
}

template <typename T, int D>
void launch_split(GkaParams& p, cudaStream_t stream) {
  if (split_setting(D, static_cast<int64_t>(p.B) * p.H, p.V) == 2) launch<T, D, 2>(p, stream);
  else launch<T, D, 1>(p, stream);
}

}  // namespace

void gka_decode_launch(const GkaParams& p, int dtype, uintptr_t stream) {
  if (p.Tn < 1 || p.Tn > kMaxDecodeTokens) throw std::invalid_argument("gka_decode: Tn must be in [1, 8]");
  if (p.K < 4 || p.K > 128 || p.K % 4) throw std::invalid_argument("gka_decode: K must be a multiple of 4 in [4, 128]");
  if (p.V < 4 || p.V > 128 || p.V % 4) throw std::invalid_argument("gka_decode: V must be a multiple of 4 in [4, 128]");
  if (p.num_iter < 1 || p.num_iter > kMaxChebyshevIter) throw std::invalid_argument("gka_decode: num_iter must be in [1, 64]");
  if (p.B > kMaxGridYZ) throw std::invalid_argument("gka_decode: B must be <= 65535");
  if (p.B == 0) return;
  GkaParams q = p;
  chebyshev_coefficients(q);
  dispatch_tag(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (q.K <= 64 && q.V <= 64) launch_split<T, 64>(q, as_stream(stream));
    else launch_split<T, 128>(q, as_stream(stream));
  });
  check_launch("gka_decode");
}

}  // namespace gka
