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
// and the host computes (a_i, b_i, e_i) once per launch (double precision).
//
// Persistent and software-pipelined: one CTA of 256 threads per SM loops over the (sequence, head)
// work items with a grid stride. A step moves 4 K V + 4 K^2 bytes of state per item (256 KiB at
// K = V = 128) and its solve is latency-bound, so the loads of item j + 1 (H and U into shared
// memory with cp.async, its slot index, q/k/v/g/alpha into registers) are issued when item j starts
// and land while item j iterates; with independent CTAs in lockstep (the earlier one-item-per-CTA
// design) all SMs loaded together and then solved together, leaving DRAM idle half the time.
// Per item: H moves from shared memory into registers and is updated for each token (its final
// value is stored right after the last token's update, so the store drains during the solve). The
// matvec H x of every iteration uses the register copy: lane bits 0-2 pick a column group (D / 32
// float4 at stride 32 columns, conflict-free LDS.128 of x), lane bits 3-4 and the warp pick D / 32
// consecutive rows; an iteration is D / 32 LDS.128, the FMAs, a 3-stage butterfly over the 8 column
// lanes (row sums land on the lanes owning the row's iterate), three FMAs, one STS and one
// __syncthreads (x double-buffered). U is then updated and read out for all tokens with lanes along
// V (float4), warps along K, the K reduction finished across warps in shared memory.
// K and V are padded to one tile D = 64 or 128 (padding zero-filled once per CTA).
//
// Shared memory (floats): H staging D^2, NUB U staging buffers D^2 each (NUB = 2 where the device
// allows 4 (3 D^2 + 34 D + 32) bytes (218,240 B at D = 128: H100/H200), else 1, in which case U of
// item j is fetched at the start of item j and overlaps only its own solve), then q, k, qm, v
// [8][D] each, x [2][D], Frobenius partials, e^g and alpha.
//
// ptxas -v (sm_90, nvcc 13.0, this machine; launch bounds 256 threads, 1 CTA per SM),
// kernel<input dtype, tile D, U buffers>, every instantiation 0 B spill, 0 B stack:
//   <bf16|fp16|fp32, 128, 2>  232 regs     <bf16|fp16|fp32, 128, 1>  234 regs
//   <bf16|fp16|fp32,  64, 2>   93 regs     <bf16|fp16|fp32,  64, 1>   93 regs
#include "common.cuh"
#include "decode_params.h"

namespace gka {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <int D, int NUB>
struct Smem {  // float offsets into the dynamic shared memory
  static constexpr int H = 0;                               // [D][D] h_kk staging
  static constexpr int U = H + D * D;                       // NUB x [D][D] h_kv staging, then partial o
  static constexpr int Q = U + NUB * D * D;                 // [8][D]
  static constexpr int Kv = Q + kMaxDecodeTokens * D;       // [8][D]
  static constexpr int QM = Kv + kMaxDecodeTokens * D;      // [8][D]
  static constexpr int Vv = QM + kMaxDecodeTokens * D;      // [8][D]
  static constexpr int X = Vv + kMaxDecodeTokens * D;       // [2][D] Chebyshev iterate
  static constexpr int RED = X + 2 * D;                     // [2][warps] Frobenius partials
  static constexpr int DEC = RED + 2 * kWarps;              // [8] e^g
  static constexpr int ALPHA = DEC + kMaxDecodeTokens;      // [8]
  static constexpr int SIZE = ALPHA + kMaxDecodeTokens;
  static constexpr size_t BYTES = sizeof(float) * SIZE;
  static_assert(kMaxDecodeTokens * kWarps * D <= D * D, "partial outputs must fit one U staging buffer");
};

// Stores a thread's rows of H (the register layout of gka_decode_kernel) to h_out [K, K].
template <int HR, int HC>
__device__ __forceinline__ void store_h(float* h_out, const float4 (&Hm)[HR][HC], int hrow0, int cg, int K) {
#pragma unroll
  for (int i = 0; i < HR; ++i)
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      const int r = hrow0 + i, c = 32 * j + 4 * cg;
      if (r < K && c < K) *reinterpret_cast<float4*>(h_out + (int64_t)r * K + c) = Hm[i][j];
    }
}

// Issues cp.async copies of a contiguous [rows, cols] float32 matrix into a [rows][ld] staging tile.
__device__ __forceinline__ void stage_matrix(float* dst, const float* src, int rows, int cols, int ld) {
  const int c4 = cols / 4;
  for (int c = threadIdx.x; c < rows * c4; c += kThreads) cp_async16(dst + (c / c4) * ld + 4 * (c % c4), src + 4 * c);
}

// The step inputs of one work item, held in registers between their load and their use: element
// i = tid + kThreads * r of the flattened [q (Tn x K), k (Tn x K), v (Tn x V)], plus e^g and alpha of
// token tid (tid < Tn).
template <typename T, int D>
struct StepInputs {
  static constexpr int R = (kMaxDecodeTokens * 3 * D + kThreads - 1) / kThreads;
  T x[R];
  float g, alpha;

  __device__ __forceinline__ void load(const GkaParams& p, int b, int h) {
    const int Tn = p.Tn, K = p.K, V = p.V, nq = Tn * K, nv = Tn * V;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = threadIdx.x + kThreads * r;
      if (i < nq) {
        x[r] = static_cast<const T*>(p.q)[b * p.sq.b + (i / K) * p.sq.t + (h / p.q_group) * p.sq.h + i % K];
      } else if (i < 2 * nq) {
        const int e = i - nq;
        x[r] = static_cast<const T*>(p.k)[b * p.sk.b + (e / K) * p.sk.t + (h / p.k_group) * p.sk.h + e % K];
      } else if (i < 2 * nq + nv) {
        const int e = i - 2 * nq;
        x[r] = static_cast<const T*>(p.v)[b * p.sv.b + (e / V) * p.sv.t + (h / p.v_group) * p.sv.h + e % V];
      }
    }
    const int t = threadIdx.x;
    if (t < Tn) {
      g = load_scalar(p.g, p.g_dtype, b * p.sg.b + t * p.sg.t + h * p.sg.h);
      alpha = p.alpha ? load_scalar(p.alpha, p.alpha_dtype, b * p.salpha.b + t * p.salpha.t + h * p.salpha.h) : 1.f;
    }
  }

  // Writes the inputs into the zero-padded [8][D] tiles qs, ks, vs and e^g, alpha.
  __device__ __forceinline__ void store(const GkaParams& p, float* qs, float* ks, float* vs, float* decay,
                                        float* alph) const {
    const int Tn = p.Tn, K = p.K, V = p.V, nq = Tn * K, nv = Tn * V;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = threadIdx.x + kThreads * r;
      if (i < nq) qs[(i / K) * D + i % K] = to_float(x[r]);
      else if (i < 2 * nq) ks[((i - nq) / K) * D + (i - nq) % K] = to_float(x[r]);
      else if (i < 2 * nq + nv) vs[((i - 2 * nq) / V) * D + (i - 2 * nq) % V] = to_float(x[r]);
    }
    if (threadIdx.x < Tn) {
      decay[threadIdx.x] = __expf(g);
      alph[threadIdx.x] = alpha;
    }
  }
};

template <typename T, int D, int NUB>
__global__ void __launch_bounds__(kThreads, 1) gka_decode_kernel(const GkaParams p) {
  using SM = Smem<D, NUB>;
  constexpr int HR = D / 32;             // H rows per thread
  constexpr int HC = D / 32;             // H float4 column chunks per thread
  constexpr int ULPR = D / 4;            // U lanes per row
  constexpr int URPI = 32 / ULPR;        // U rows per warp instruction
  constexpr int URG = kWarps * URPI;     // U row groups
  constexpr int URPT = D / URG;          // U rows per thread
  GKA_DYNAMIC_SMEM(float4, smem4);
  float* smem = reinterpret_cast<float*>(smem4);
  float* Hs = smem + SM::H;
  float* qs = smem + SM::Q;
  float* ks = smem + SM::Kv;
  float* qms = smem + SM::QM;
  float* vs = smem + SM::Vv;
  float* xbuf = smem + SM::X;
  float* red = smem + SM::RED;
  float* decay = smem + SM::DEC;
  float* alph = smem + SM::ALPHA;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int Tn = p.Tn, K = p.K, V = p.V;
  const int n_items = p.B * p.H, stride = gridDim.x;
  const int64_t kk_slot = (int64_t)p.H * K * K, kv_slot = (int64_t)p.H * K * V;

  // Zero the staging tiles once: their padding (rows or columns past K / V) is never written again.
  for (int i = tid; i < SM::X; i += kThreads) smem[i] = 0.f;
  __syncthreads();

  // Prologue: slot indices of items 0 and 1 of this CTA, the states of item 0 (and its inputs).
  int item = blockIdx.x;
  int64_t src = load_index(p.src_idx, p.src64, item / p.H);
  int64_t src_next = item + stride < n_items ? load_index(p.src_idx, p.src64, (item + stride) / p.H) : -1;
  if (src >= 0) {
    const int h = item % p.H;
    stage_matrix(Hs, p.h_kk + src * kk_slot + (int64_t)h * K * K, K, K, D);
    cp_async_commit();
    if (NUB == 2) stage_matrix(smem + SM::U, p.h_kv + src * kv_slot + (int64_t)h * K * V, K, V, D);
  } else {
    cp_async_commit();
  }
  if (NUB == 2) cp_async_commit();
  StepInputs<T, D> in;
  in.load(p, item / p.H, item % p.H);

  const int cg = lane % 8, rg = lane / 8;
  const int hrow0 = (warp * 4 + rg) * HR;
  // After the butterfly over the 8 column lanes, this lane holds the sum of row own_row; the
  // (8 / HR) lanes holding the same row carry identical iterates, the first of them stores x.
  const int own_row = hrow0 + butterfly_first<HR, 8, 1>(lane);
  const bool writer = (cg % (8 / HR)) == 0;
  const int ucg = lane % ULPR, url = lane / ULPR;
  const int urow0 = warp * URPI + url;
  const bool ucol_ok = 4 * ucg < V;

  for (int j = 0; item < n_items; item += stride, ++j) {
    const int b = item / p.H, h = item % p.H;
    const int next = item + stride;
    float* Us = smem + SM::U + (NUB == 2 ? (j & 1) : 0) * D * D;
    T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h;
    const int64_t dst = load_index(p.dst_idx, p.dst64, b);

    // 1. H of this item: shared memory -> registers; the staging tile is then free for item j + 1.
    cp_async_wait_group<NUB - 1>();
    __syncthreads();
    float4 Hm[HR][HC];
#pragma unroll
    for (int i = 0; i < HR; ++i)
#pragma unroll
      for (int c = 0; c < HC; ++c)
        Hm[i][c] = reinterpret_cast<const float4*>(Hs + (hrow0 + i) * D)[8 * c + cg];
    in.store(p, qs, ks, vs, decay, alph);
    __syncthreads();

    // 2. Prefetch item j + 1 (H, and U when double-buffered; else this item's U) and its inputs.
    if (next < n_items && src_next >= 0)
      stage_matrix(Hs, p.h_kk + src_next * kk_slot + (int64_t)(next % p.H) * K * K, K, K, D);
    cp_async_commit();
    if (NUB == 2) {
      if (next < n_items && src_next >= 0)
        stage_matrix(smem + SM::U + ((j + 1) & 1) * D * D, p.h_kv + src_next * kv_slot + (int64_t)(next % p.H) * K * V,
                     K, V, D);
    } else if (src >= 0) {
      stage_matrix(Us, p.h_kv + src * kv_slot + (int64_t)h * K * V, K, V, D);
    }
    cp_async_commit();
    const int64_t src_after = next + stride < n_items ? load_index(p.src_idx, p.src64, (next + stride) / p.H) : -1;
    if (next < n_items) in.load(p, next / p.H, next % p.H);

    if (src < 0) {  // padding sequence: states untouched, output 0
      for (int i = tid; i < Tn * V; i += kThreads) out[(i / V) * p.so.t + i % V] = from_float<T>(0.f);
    } else {
      for (int t = 0; t < Tn; ++t) {
        // H update and ||H||_F^2.
        const float dec = decay[t];
        const float* kt = ks + t * D;
        float ss = 0.f;
#pragma unroll
        for (int c = 0; c < HC; ++c) {
          const float4 kc = reinterpret_cast<const float4*>(kt)[8 * c + cg];
#pragma unroll
          for (int i = 0; i < HR; ++i) {
            float4& m = Hm[i][c];
            m = fma4(kt[hrow0 + i], kc, scale4(dec, m));
            ss = dot4(m, m, ss);
          }
        }
        ss = warp_allreduce(ss);
        if (lane == 0) red[(t & 1) * kWarps + warp] = ss;
        __syncthreads();
        float fro2 = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) fro2 += red[(t & 1) * kWarps + w];
        const float inv_fro = fro2 > 0.f ? rsqrtf(fro2) : 1.f;
        const float gamma = 2.f * inv_fro / (1.f + 2.f * p.ridge_ratio);  // x_0 = gamma q

        if (t == Tn - 1 && dst >= 0) store_h(p.h_kk + dst * kk_slot + (int64_t)h * K * K, Hm, hrow0, cg, K);

        // Chebyshev iteration; the first matvec H x_0 = gamma H q reads q directly.
        const float qr = qs[t * D + own_row];
        float x = gamma * qr, xprev = 0.f;
        const float* xin = qs + t * D;
        float ymul = gamma;
        for (int it = 0; it < p.num_iter; ++it) {
          const float ca = p.cheb[it][0], cb = p.cheb[it][1] * inv_fro, ce = p.cheb[it][2];
          float acc[HR];
#pragma unroll
          for (int i = 0; i < HR; ++i) acc[i] = 0.f;
#pragma unroll
          for (int c = 0; c < HC; ++c) {
            const float4 xv = reinterpret_cast<const float4*>(xin)[8 * c + cg];
#pragma unroll
            for (int i = 0; i < HR; ++i) acc[i] = dot4(Hm[i][c], xv, acc[i]);
          }
          butterfly_reduce<HR, 8, 1>(acc);
          const float r = fmaf(acc[0], ymul, -qr);  // H x - q
          const float xn = fmaf(ca, x, -fmaf(cb, r, ce * xprev));
          xprev = x;
          x = xn;
          if (it + 1 < p.num_iter) {
            float* xo = xbuf + (it & 1) * D;
            if (writer) xo[own_row] = x;
            __syncthreads();
            xin = xo;
            ymul = 1.f;
          }
        }
        if (writer) qms[t * D + own_row] = qr + alph[t] * (x - qr);
      }

      // 3. U update and readout for every token.
      if (NUB == 2) cp_async_wait_group<2>();
      else cp_async_wait_group<0>();
      __syncthreads();
      float4 Ur[URPT];
#pragma unroll
      for (int i = 0; i < URPT; ++i) {
        const int r = urow0 + URG * i;
        Ur[i] = (r < K && ucol_ok) ? reinterpret_cast<const float4*>(Us + r * D)[ucg] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      __syncthreads();  // the staging buffer now takes the partial outputs
      float* part = Us;
      for (int t = 0; t < Tn; ++t) {
        const float dec = decay[t];
        const float4 vv = reinterpret_cast<const float4*>(vs + t * D)[ucg];
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < URPT; ++i) {
          const int r = urow0 + URG * i;
          Ur[i] = fma4(ks[t * D + r], vv, scale4(dec, Ur[i]));
          const float qm = qms[t * D + r];
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
          reinterpret_cast<float4*>(part + (t * kWarps + warp) * D)[ucg] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      }
      if (dst >= 0) {
        float* u_out = p.h_kv + dst * kv_slot + (int64_t)h * K * V;
#pragma unroll
        for (int i = 0; i < URPT; ++i) {
          const int r = urow0 + URG * i;
          if (r < K && ucol_ok) *reinterpret_cast<float4*>(u_out + (int64_t)r * V + 4 * ucg) = Ur[i];
        }
      }
      __syncthreads();
      for (int i = tid; i < Tn * V; i += kThreads) {
        const int t = i / V, c = i % V;
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) o += part[(t * kWarps + w) * D + c];
        out[t * p.so.t + c] = from_float<T>(p.scale * o);
      }
    }
    src = src_next;
    src_next = src_after;
  }
  cp_async_wait_group<0>();
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

template <typename T, int D, int NUB>
void launch_with(const GkaParams& p, cudaStream_t stream) {
  auto kernel = gka_decode_kernel<T, D, NUB>;
  // The opt-in above 48 KiB is per device; set it once per device and instantiation.
  static bool configured[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "gka_decode: cudaGetDevice");
  if (dev >= 64 || !configured[dev]) {
    allow_dynamic_smem(kernel, Smem<D, NUB>::BYTES, "gka_decode: cudaFuncSetAttribute");
    if (dev < 64) configured[dev] = true;
  }
  const int grid = std::min(p.B * p.H, sm_count());
  launch_kernel(kernel, dim3(grid), kThreads, Smem<D, NUB>::BYTES, stream, p);
}

// Double-buffered U staging where the device's shared memory allows it.
template <typename T, int D>
void launch(const GkaParams& p, cudaStream_t stream) {
  if (smem_optin() >= Smem<D, 2>::BYTES) launch_with<T, D, 2>(p, stream);
  else launch_with<T, D, 1>(p, stream);
}

}  // namespace

void gka_decode_launch(const GkaParams& p, int dtype, uintptr_t stream) {
  if (p.Tn < 1 || p.Tn > kMaxDecodeTokens) throw std::invalid_argument("gka_decode: Tn must be in [1, 8]");
  if (p.K < 4 || p.K > 128 || p.K % 4) throw std::invalid_argument("gka_decode: K must be a multiple of 4 in [4, 128]");
  if (p.V < 4 || p.V > 128 || p.V % 4) throw std::invalid_argument("gka_decode: V must be a multiple of 4 in [4, 128]");
  if (p.num_iter < 1 || p.num_iter > kMaxChebyshevIter) throw std::invalid_argument("gka_decode: num_iter must be in [1, 64]");
  if ((int64_t)p.B * p.H > 0x7fffffff) throw std::invalid_argument("gka_decode: B * H must fit in int32");
  if (p.B == 0) return;
  GkaParams q = p;
  chebyshev_coefficients(q);
  dispatch_tag(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (q.K <= 64 && q.V <= 64) launch<T, 64>(q, as_stream(stream));
    else launch<T, 128>(q, as_stream(stream));
  });
  check_launch("gka_decode");
}

}  // namespace gka
