// Fused Gated DeltaNet decode step (SPEC 3, 8) for 1..8 tokens per sequence, in place on a float32
// state pool [slots, H, K, V]:
//     (optional) q, k <- q / sqrt(|q|^2 + 1e-6), k / sqrt(|k|^2 + 1e-6)
//     S' = exp(g) S ;  u = beta (v - S'^T k) ;  S = S' + k u^T ;  o = scale S^T q
//                                              = scale (S'^T q + (q . k) u)
// Value columns are independent, so a work item is one (sequence b, head h, 32-column value tile);
// items are numbered b-major, then h, then tile, so the items in flight at one time cover
// neighbouring state memory.
//
// Persistent and software-pipelined: grid = min(items, resident CTAs per SM x SMs), 128 threads,
// CTA c takes items c, c + grid, c + 2 grid, ... The step is memory bound (each state byte is read
// and written once), so the point is to keep every CTA's next state tile in flight while it works
// on the current one. Per item n:
//     wait for tile n's cp.async copies, move them from shared memory to registers
//     __syncthreads                         (inputs n visible; tile_buf free again)
//     cp.async tile n + 1 into tile_buf     (its slot index was loaded one item earlier)
//     per token: column reductions, update, outputs;  store tile n to its dst slot
//     __syncthreads                         (inputs n no longer read)
//     load the slot indices of item n + 2; stage the inputs (q, k, v, g, beta) of item n + 1
// so a CTA has a tile of loads outstanding through its whole compute, store and input staging.
// tile_buf (dynamic shared memory, [K/16][128] float4) is private per thread: each thread copies
// and reads back only its own rows, so cp.async.wait_group alone makes them visible to it. A
// padding item (src < 0) writes zero outputs and copies nothing; the item, hence the branch, is the
// same for every thread of the CTA, so all threads pass the same barriers.
//
// Tile layout: a CTA holds its [K, 32] state tile in registers: each lane owns one float4 of a row,
// 8 lanes span the 32 columns, so a warp instruction moves 4 rows x 128 B (coalesced), and a thread
// holds KT / 16 rows. Per token, the two column reductions S'^T k and S'^T q run together: a
// butterfly over the 4 row lanes of a warp, then across the 4 warps through shared memory
// (double-buffered by token parity: one __syncthreads per token). Inputs are staged by one warp
// per token (normalization and q . k by warp shuffles); v, g and beta loads are issued first.
//
// Resident CTAs per SM: the register budget of __launch_bounds__ (7 / 5 / 4 for KT = 64 / 128 /
// 256) capped by the device's shared memory per SM (static + dynamic: 15.1 / 27.1 / 51.1 KiB per
// CTA, so sm_80 holds 3 CTAs at KT = 256, sm_90 all 4).
//
// ptxas -v (sm_90, nvcc 13.0 on this machine), kernel<input dtype, tile dims>; dynamic smem
// 8 / 16 / 32 KiB at KT = 64 / 128 / 256 on top of the static smem listed:
//   <bf16,128>        96 regs, 0/0 B spill st/ld, stack 0 B, static smem 11360 B
//   <bf16,256>       128 regs, 0/0 B spill st/ld, stack 0 B, static smem 19552 B
//   <bf16,64>         72 regs, 0/0 B spill st/ld, stack 0 B, static smem 7264 B
//   <fp16,128>        96 regs, 0/0 B spill st/ld, stack 0 B, static smem 11360 B
//   <fp16,256>       128 regs, 0/0 B spill st/ld, stack 0 B, static smem 19552 B
//   <fp16,64>         72 regs, 0/0 B spill st/ld, stack 0 B, static smem 7264 B
//   <fp32,128>        96 regs, 0/0 B spill st/ld, stack 0 B, static smem 11360 B
//   <fp32,256>       128 regs, 0/0 B spill st/ld, stack 0 B, static smem 19552 B
//   <fp32,64>         72 regs, 0/0 B spill st/ld, stack 0 B, static smem 7264 B
#include "common.cuh"
#include "decode_params.h"

#include <algorithm>

namespace gka {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBV = 32;             // value columns per work item
constexpr int kLPR = kBV / 4;       // lanes per row (one float4 each)
constexpr int kRPI = 32 / kLPR;     // rows per warp instruction
constexpr int kRG = kWarps * kRPI;  // row groups per CTA
static_assert(kMaxDecodeTokens * kBV <= 2 * kThreads, "staging loads at most two v values per thread");

// CTAs per SM the register budget is sized for (64 K registers / (128 threads x budget)).
constexpr int min_ctas(int KT) { return KT <= 64 ? 7 : KT <= 128 ? 5 : 4; }

// Dynamic shared memory: the prefetched state tile, [KT / kRG][kThreads] float4.
constexpr size_t state_smem_bytes(int KT) { return sizeof(float4) * (KT / kRG) * kThreads; }

// Static shared memory: the staged inputs of one work item and the cross-warp reduction buffer.
template <int KT>
struct Shared {
  float q[kMaxDecodeTokens][KT];  // normalized q * scale
  float k[kMaxDecodeTokens][KT];  // normalized k
  __align__(16) float v[kMaxDecodeTokens][kBV];  // read as float4
  float decay[kMaxDecodeTokens], beta[kMaxDecodeTokens], qk[kMaxDecodeTokens];
  __align__(16) float red[2][kWarps][kLPR][8];  // [token parity][warp][col4][k-sums x4, q-sums x4]
};

// A work item: sequence b, head h, value columns [vt * kBV, (vt + 1) * kBV), and its slots (src < 0:
// padding, or no item at all once b >= B).
struct Item {
  int b, h, vt;
  int64_t src, dst;
};

// Work items are numbered b-major, then h, then vt; a CTA takes items blockIdx.x + i * gridDim.x.
// The stride gridDim.x, decomposed the same way, is added digit by digit (no 64-bit division).
struct Stride {
  int b, h, vt;
};

__device__ __forceinline__ void load_slots(const GdnParams& p, Item& x) {
  x.src = x.b < p.B ? load_index(p.src_idx, p.src64, x.b) : -1;
  x.dst = x.b < p.B ? load_index(p.dst_idx, p.dst64, x.b) : -1;
}

__device__ __forceinline__ Item advance(const GdnParams& p, const Item& x, const Stride& s, int nvt) {
  Item y;
  y.vt = x.vt + s.vt;
  y.h = x.h + s.h + (y.vt >= nvt);
  if (y.vt >= nvt) y.vt -= nvt;
  y.b = x.b + s.b + (y.h >= p.H);
  if (y.h >= p.H) y.h -= p.H;
  load_slots(p, y);
  return y;
}

// Writes the inputs of item x to `sh`: v, g and beta loads are issued first so that all of the
// item's loads are in flight together; one warp per token normalizes q and k and forms q . k.
template <typename T, int KT>
__device__ __forceinline__ void stage_inputs(const GdnParams& p, const Item& x, Shared<KT>& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Tn = p.Tn, K = p.K;
  float vr[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int i = threadIdx.x + kThreads * j, c = x.vt * kBV + i % kBV;
    const T* vp = static_cast<const T*>(p.v) + x.b * p.sv.b + (i / kBV) * p.sv.t + (x.h / p.v_group) * p.sv.h;
    vr[j] = i < Tn * kBV && c < p.V ? to_float(vp[c]) : 0.f;
  }
  float gr = 0.f, br = 0.f;
  if (threadIdx.x < Tn) {
    const int t = threadIdx.x;
    gr = load_scalar(p.g, p.g_dtype, x.b * p.sg.b + t * p.sg.t + x.h * p.sg.h);
    br = load_scalar(p.beta, p.beta_dtype, x.b * p.sbeta.b + t * p.sbeta.t + x.h * p.sbeta.h);
  }
  for (int t = warp; t < Tn; t += kWarps) {
    const T* qp = static_cast<const T*>(p.q) + x.b * p.sq.b + t * p.sq.t + (x.h / p.q_group) * p.sq.h;
    const T* kp = static_cast<const T*>(p.k) + x.b * p.sk.b + t * p.sk.t + (x.h / p.k_group) * p.sk.h;
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
      sh.q[t][lane + 32 * j] = qv[j] * qsc;
      sh.k[t][lane + 32 * j] = kv[j] * kn;
    }
    if (lane == 0) sh.qk[t] = qkd * qsc * kn;
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int i = threadIdx.x + kThreads * j;
    if (i < Tn * kBV) sh.v[i / kBV][i % kBV] = vr[j];
  }
  if (threadIdx.x < Tn) {
    sh.decay[threadIdx.x] = __expf(gr);
    sh.beta[threadIdx.x] = br;
  }
}

template <typename T, int KT>
__global__ void __launch_bounds__(kThreads, min_ctas(KT)) gdn_decode_kernel(const GdnParams p) {
  constexpr int RPT = KT / kRG;   // rows per thread
  constexpr int PER = 8 / kRPI;   // reduced values a lane keeps after the butterfly
  __shared__ Shared<KT> sh;
  GKA_DYNAMIC_SMEM(float4, tile_buf);  // [RPT][kThreads]: each thread's own rows of a prefetched tile

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cg = lane % kLPR, rgl = lane / kLPR;
  const int row0 = warp * kRPI + rgl;
  const int Tn = p.Tn, K = p.K, V = p.V;
  const int nvt = (V + kBV - 1) / kBV;
  const Stride stride{static_cast<int>(gridDim.x / nvt / p.H), static_cast<int>(gridDim.x / nvt % p.H),
                      static_cast<int>(gridDim.x % nvt)};
  const int64_t slot_stride = static_cast<int64_t>(p.H) * K * V;

  // Issues the asynchronous copies of this thread's rows of item x's state tile (one group).
  auto fetch_state = [&](const Item& x) {
    const int col = x.vt * kBV + 4 * cg;
    if (x.src >= 0 && col < V) {
      const float* s = p.state + x.src * slot_stride + static_cast<int64_t>(x.h) * K * V + col;
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = row0 + kRG * i;
        if (r < K) cp_async16(&tile_buf[i * kThreads + threadIdx.x], s + static_cast<int64_t>(r) * V);
      }
    }
    cp_async_commit();
  };

  // Prologue: the first item's state copies and inputs, the second item's slots.
  Item cur;
  cur.vt = static_cast<int>(blockIdx.x % nvt);
  cur.h = static_cast<int>(blockIdx.x / nvt % p.H);
  cur.b = static_cast<int>(blockIdx.x / nvt / p.H);
  load_slots(p, cur);
  fetch_state(cur);
  if (cur.src >= 0) stage_inputs<T, KT>(p, cur, sh);
  Item nxt = advance(p, cur, stride, nvt);

  while (cur.b < p.B) {
    const int col = cur.vt * kBV + 4 * cg;
    const bool col_ok = col < V;
    float4 S[RPT];
    if (cur.src >= 0) {
      cp_async_wait_group<0>();
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = row0 + kRG * i;
        S[i] = col_ok && r < K ? tile_buf[i * kThreads + threadIdx.x] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    // Makes the staged inputs visible, and orders every read of tile_buf above before the copies
    // of the next item into it.
    __syncthreads();
    fetch_state(nxt);

    T* out = static_cast<T*>(p.out) + cur.b * p.so.b + cur.h * p.so.h;
    const bool writer = warp == 0 && rgl == 0 && col_ok;  // the lanes that store the outputs
    if (cur.src < 0) {  // padding sequence: state untouched, output 0
      if (writer) {
        for (int t = 0; t < Tn; ++t) {
          T* o = out + t * p.so.t + col;
          o[0] = o[1] = o[2] = o[3] = from_float<T>(0.f);
        }
      }
    } else {  // cur.src is the same in every thread: all of them take this branch's barriers
      for (int t = 0; t < Tn; ++t) {
        const float dec = sh.decay[t];
        float part[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) part[e] = 0.f;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          const int r = row0 + kRG * i;
          const float kr = sh.k[t][r], qr = sh.q[t][r];
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
        float* slot = &sh.red[t & 1][warp][cg][butterfly_first<8, kRPI, kLPR>(lane)];
#pragma unroll
        for (int e = 0; e < PER; ++e) slot[e] = part[e];
        __syncthreads();
        float4 ksum = make_float4(0.f, 0.f, 0.f, 0.f), qsum = ksum;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float4* r4 = reinterpret_cast<const float4*>(sh.red[t & 1][w][cg]);
          const float4 a = r4[0], c = r4[1];
          ksum = make_float4(ksum.x + a.x, ksum.y + a.y, ksum.z + a.z, ksum.w + a.w);
          qsum = make_float4(qsum.x + c.x, qsum.y + c.y, qsum.z + c.z, qsum.w + c.w);
        }
        const float bt = sh.beta[t];
        const float4 v4 = *reinterpret_cast<const float4*>(&sh.v[t][4 * cg]);
        const float4 u = make_float4(bt * (v4.x - ksum.x), bt * (v4.y - ksum.y), bt * (v4.z - ksum.z),
                                     bt * (v4.w - ksum.w));
#pragma unroll
        for (int i = 0; i < RPT; ++i) S[i] = fma4(sh.k[t][row0 + kRG * i], u, S[i]);
        if (writer) {
          const float c = sh.qk[t];
          T* o = out + t * p.so.t + col;
          o[0] = from_float<T>(fmaf(c, u.x, qsum.x));
          o[1] = from_float<T>(fmaf(c, u.y, qsum.y));
          o[2] = from_float<T>(fmaf(c, u.z, qsum.z));
          o[3] = from_float<T>(fmaf(c, u.w, qsum.w));
        }
      }
      if (cur.dst >= 0 && col_ok) {
        float* s_out = p.state + cur.dst * slot_stride + static_cast<int64_t>(cur.h) * K * V + col;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          const int r = row0 + kRG * i;
          if (r < K) *reinterpret_cast<float4*>(s_out + static_cast<int64_t>(r) * V) = S[i];
        }
      }
    }
    // Every read of this item's inputs is done before they are overwritten by the next item's.
    __syncthreads();
    const Item after = advance(p, nxt, stride, nvt);
    if (nxt.src >= 0) stage_inputs<T, KT>(p, nxt, sh);
    cur = nxt;
    nxt = after;
  }
}

template <typename T, int KT>
void launch(const GdnParams& p, cudaStream_t stream) {
  constexpr size_t smem = state_smem_bytes(KT);
  // Static plus dynamic shared memory exceeds 48 KiB at KT = 256.
  allow_dynamic_smem<gdn_decode_kernel<T, KT>>(smem, "gdn_decode: cudaFuncSetAttribute");
  // Persistent grid: every CTA resident at once, each looping over its work items.
  const int per_sm = std::min(min_ctas(KT), ctas_by_smem(sizeof(Shared<KT>) + smem));
  const int64_t items = static_cast<int64_t>(p.B) * p.H * ((p.V + kBV - 1) / kBV);
  const int grid = static_cast<int>(std::min<int64_t>(items, static_cast<int64_t>(per_sm) * sm_count()));
  launch_kernel(gdn_decode_kernel<T, KT>, dim3(grid), kThreads, smem, stream, p);
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
