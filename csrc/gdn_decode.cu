// Fused Gated DeltaNet decode step (SPEC 3, 8) for 1..8 tokens per sequence, in place on a float32
// state pool [slots, H, K, V]:
//     (optional) q, k <- q / sqrt(|q|^2 + 1e-6), k / sqrt(|k|^2 + 1e-6)
//     S' = exp(g) S ;  u = beta (v - S'^T k) ;  S = S' + k u^T ;  o = scale S^T q
//                                              = scale (S'^T q + (q . k) u)
// Value columns are independent, so a work item is one (sequence b, head h, BV-column value tile);
// items are numbered b-major, then h, then tile, so the items in flight at one time cover
// neighbouring state memory. BV = 32, or 16 when the 32-column items would leave SMs idle (decode-1:
// 128 items at 32 heads; GKA_KERNELS_DECODE_TILES overrides): a small batch then spreads its state
// over twice the CTAs. H200 (session 9, bench suite, bf16, states from DRAM): decode-1 5.5 -> 5.2 us,
// while decode-64 at 16 columns would take 0.095 ms instead of 0.077. One token with narrow tiles
// runs gdn_decode_item_kernel (one CTA per item, no staging; see there); everything else the
// persistent kernel below.
//
// Persistent and software-pipelined: grid = min(items, resident CTAs per SM x SMs), 128 threads,
// CTA c takes items c, c + grid, c + 2 grid, ... The step is memory bound (each state byte is read
// and written once), so the point is to keep every CTA's next STAGES state tiles in flight while it
// works on the current one. Prologue: the first item's slot index load, then L1 prefetches of its
// token inputs (so that they arrive while the index is in flight instead of queueing behind the
// state copies: decode-1 5.3 -> 5.2 us, decode-64 0.0777 -> 0.0771 ms), its state copies and
// staging, then the copies of items 1 .. STAGES - 1. Per item n:
//     wait for tile n's cp.async copies (the STAGES - 1 later groups stay in flight), move them
//     from shared memory to registers
//     __syncthreads                         (inputs n visible; tile n's buffer free again)
//     cp.async tile n + STAGES into that buffer (its slot index was loaded one item earlier)
//     per token: column reductions, update, outputs;  store tile n to its dst slot
//     __syncthreads                         (inputs n no longer read)
//     load the slot indices of item n + STAGES + 1; stage the inputs (q, k, v, g, beta) of item n + 1
// tile_buf (dynamic shared memory, [STAGES][K / RG][128] float4) is private per thread: each thread
// copies and reads back only its own rows, so cp.async.wait_group alone makes them visible to it.
// STAGES = 2 where the second buffer costs no resident CTA (launch), else 1. H200, session 11 (run
// 75, decode-64, bf16, same build, GKA_KERNELS_GDN_DECODE_STAGES forced, two rounds): 1 stage
// 0.0781-0.0783 ms, 2 stages 0.0760-0.0762 ms; Nsight Compute (run 75): DRAM throughput 68.6% ->
// 70.5% of peak. (Triton's token loop reaches 78% with 8 CTAs of [128, 32] tiles per SM, run 74.) A
// padding item (src < 0) writes zero outputs and copies nothing; the item, hence the branch, is the
// same for every thread of the CTA, so all threads pass the same barriers.
//
// Tile layout: a CTA holds its [K, BV] state tile in registers: each lane owns one float4 of a
// row, BV / 4 lanes span the columns, so a warp instruction moves 128 / BV rows x 4 BV bytes
// (coalesced), and a thread holds KT / RG rows (RG = 512 / BV row groups). Per token, the two
// column reductions S'^T k and S'^T q run together: a butterfly over the row lanes of a warp, then
// across the 4 warps through shared memory (double-buffered by token parity: one __syncthreads per
// token). Inputs are staged by one warp per token (normalization and q . k by warp shuffles); v, g
// and beta loads are issued first.
//
// Resident CTAs per SM: the register budget of __launch_bounds__ (7 / 5 / 4 for KT = 64 / 128 /
// 256) capped by the device's shared memory per SM (static + dynamic at BV = 32: 15.1 / 27.1 / 51.1
// KiB per CTA, so sm_80 holds 3 CTAs at KT = 256, sm_90 all 4).
//
// ptxas -v (sm_90, nvcc 13.0 on this machine), kernel<input dtype, KT, BV, STAGES>; dynamic smem
// STAGES x 8 / 16 / 32 KiB at KT = 64 / 128 / 256 (half at BV = 16) on top of the static smem;
// fp16 inputs give the same registers as bf16 (fp32: 128 at <256,16,1>, 94 at <128,16,1>); no
// spills except where noted:
//   <bf16,128,32,1>    92 regs   <bf16,128,32,2>  96 regs, 8 B spill stores / 16 B loads (two values reloaded per item);  static smem 11360 B
//   <bf16,128,16,1>    92 regs   <bf16,128,16,2>  94 regs;  static smem 9824 B
//   <bf16,256,32,1>   128 regs   <bf16,256,32,2> 128 regs, 96 / 60 B (taken only when forced);  19552 B
//   <bf16,256,16,1>   122 regs   <bf16,256,16,2> 124 regs;  static smem 18016 B
//   <bf16,64,32,*>     72 regs, static smem 7264 B
//   <bf16,64,16,*>     72 regs, static smem 5728 B
// gdn_decode_item_kernel<input dtype, KT, 16>: 64 / 79 / 114 regs at KT = 64 / 128 / 256 (bf16;
// fp16 122 and fp32 108 at KT = 256), no spills, 512 B static smem.
#include "common.cuh"
#include "decode_params.h"

#include <algorithm>

namespace gka {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Value columns of a work item: wide tiles, and narrow ones for small batches (see launch_tiles).
constexpr int kWideBV = 32, kNarrowBV = 16;

template <int BV>
struct Tile {
  static constexpr int LPR = BV / 4;       // lanes per row (one float4 each)
  static constexpr int RPI = 32 / LPR;     // rows per warp instruction
  static constexpr int RG = kWarps * RPI;  // row groups per CTA
  static_assert(RPI <= 8, "the butterfly leaves each lane at least one of the 8 column sums");
  static_assert(kMaxDecodeTokens * BV <= 2 * kThreads, "staging loads at most two v values per thread");
};

// CTAs per SM the register budget is sized for (64 K registers / (128 threads x budget)).
constexpr int min_ctas(int KT) { return KT <= 64 ? 7 : KT <= 128 ? 5 : 4; }

// Dynamic shared memory: the prefetched state tile, [KT / RG][kThreads] float4.
template <int KT, int BV>
constexpr size_t state_smem_bytes() { return sizeof(float4) * (KT / Tile<BV>::RG) * kThreads; }

// Static shared memory: the staged inputs of one work item and the cross-warp reduction buffer.
template <int KT, int BV>
struct Shared {
  static constexpr int LPR = Tile<BV>::LPR;
  float q[kMaxDecodeTokens][KT];  // normalized q * scale
  float k[kMaxDecodeTokens][KT];  // normalized k
  __align__(16) float v[kMaxDecodeTokens][BV];  // read as float4
  float decay[kMaxDecodeTokens], beta[kMaxDecodeTokens], qk[kMaxDecodeTokens];
  __align__(16) float red[2][kWarps][LPR][8];  // [token parity][warp][col4][k-sums x4, q-sums x4]
};

// A work item: sequence b, head h, value columns [vt * BV, (vt + 1) * BV), and its slots (src < 0:
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

// L1 prefetches of item x's token inputs (q and k rows, its v columns, g, beta), issued before the
// item's slot index is waited on: warp w takes tokens w, w + kWarps, ..., lane j line j of a row.
template <typename T, int BV>
__device__ __forceinline__ void prefetch_inputs(const GdnParams& p, const Item& x) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c0 = x.vt * BV, nv = BV < p.V - c0 ? BV : p.V - c0;
  for (int t = warp; t < p.Tn; t += kWarps) {
    prefetch_line(static_cast<const T*>(p.q) + x.b * p.sq.b + t * p.sq.t + (x.h / p.q_group) * p.sq.h,
                  p.K * sizeof(T), lane);
    prefetch_line(static_cast<const T*>(p.k) + x.b * p.sk.b + t * p.sk.t + (x.h / p.k_group) * p.sk.h,
                  p.K * sizeof(T), lane);
    prefetch_line(static_cast<const T*>(p.v) + x.b * p.sv.b + t * p.sv.t + (x.h / p.v_group) * p.sv.h + c0,
                  nv * sizeof(T), lane);
    const int gb = dtype_bytes(p.g_dtype), bb = dtype_bytes(p.beta_dtype);
    prefetch_line(static_cast<const char*>(p.g) + (x.b * p.sg.b + t * p.sg.t + x.h * p.sg.h) * gb, gb, lane);
    prefetch_line(static_cast<const char*>(p.beta) + (x.b * p.sbeta.b + t * p.sbeta.t + x.h * p.sbeta.h) * bb, bb,
                  lane);
  }
}

// Writes the inputs of item x to `sh`. Every load (v, g, beta, and q and k of the warp's tokens) is
// issued as raw values before any of them is used, so that they are in flight together (converting
// each value right after its load made every load wait for the previous one); then one warp per
// token normalizes q and k and forms q . k. H200, run 64, against the per-value conversion:
// decode-1 5.4 -> 4.9 us, decode-64 0.0781 -> 0.0785 ms (two rounds each, same binary otherwise).
// One token's q and k scales from a warp's lanes, each holding NJ values of q and of k: the q
// scale (scale / ||q|| with the in-kernel L2 norm, else scale), the k scale (1 / ||k||, else 1) and
// q . k after both, every result the same on all lanes.
struct QkScales {
  float q, k, qk;
};
template <int NJ>
__device__ __forceinline__ QkScales qk_scales(const float (&qv)[NJ], const float (&kv)[NJ], bool l2norm,
                                              float scale) {
  float qq = 0.f, kk = 0.f, qkd = 0.f;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    qq = fmaf(qv[j], qv[j], qq);
    kk = fmaf(kv[j], kv[j], kk);
    qkd = fmaf(qv[j], kv[j], qkd);
  }
  float qn = 1.f, kn = 1.f;
  if (l2norm) {
    qn = rsqrtf(warp_allreduce(qq) + 1e-6f);
    kn = rsqrtf(warp_allreduce(kk) + 1e-6f);
  }
  const float qsc = qn * scale;
  return {qsc, kn, warp_allreduce(qkd) * qsc * kn};
}

template <typename T, int KT, int BV>
__device__ __forceinline__ void stage_inputs(const GdnParams& p, const Item& x, Shared<KT, BV>& sh) {
  constexpr int TPW = (kMaxDecodeTokens + kWarps - 1) / kWarps;  // tokens per warp, at most
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int Tn = p.Tn, K = p.K;
  T vraw[2], qraw[TPW][KT / 32], kraw[TPW][KT / 32];
  const T zero = from_float<T>(0.f);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int i = threadIdx.x + kThreads * j, c = x.vt * BV + i % BV;
    const T* vp = static_cast<const T*>(p.v) + x.b * p.sv.b + (i / BV) * p.sv.t + (x.h / p.v_group) * p.sv.h;
    vraw[j] = i < Tn * BV && c < p.V ? vp[c] : zero;
  }
  uint32_t gbits = 0, bbits = 0;
  if (threadIdx.x < Tn) {
    const int t = threadIdx.x;
    gbits = load_scalar_bits(p.g, p.g_dtype, x.b * p.sg.b + t * p.sg.t + x.h * p.sg.h);
    bbits = load_scalar_bits(p.beta, p.beta_dtype, x.b * p.sbeta.b + t * p.sbeta.t + x.h * p.sbeta.h);
  }
#pragma unroll
  for (int u = 0; u < TPW; ++u) {
    const int t = warp + kWarps * u;
    const T* qp = static_cast<const T*>(p.q) + x.b * p.sq.b + t * p.sq.t + (x.h / p.q_group) * p.sq.h;
    const T* kp = static_cast<const T*>(p.k) + x.b * p.sk.b + t * p.sk.t + (x.h / p.k_group) * p.sk.h;
#pragma unroll
    for (int j = 0; j < KT / 32; ++j) {
      const int i = lane + 32 * j;
      qraw[u][j] = t < Tn && i < K ? qp[i] : zero;
      kraw[u][j] = t < Tn && i < K ? kp[i] : zero;
    }
  }
#pragma unroll
  for (int u = 0; u < TPW; ++u) {
    const int t = warp + kWarps * u;
    if (t >= Tn) break;
    float qv[KT / 32], kv[KT / 32];
#pragma unroll
    for (int j = 0; j < KT / 32; ++j) {
      qv[j] = to_float(qraw[u][j]);
      kv[j] = to_float(kraw[u][j]);
    }
    const QkScales sc = qk_scales(qv, kv, p.l2norm, p.scale);
#pragma unroll
    for (int j = 0; j < KT / 32; ++j) {
      sh.q[t][lane + 32 * j] = qv[j] * sc.q;
      sh.k[t][lane + 32 * j] = kv[j] * sc.k;
    }
    if (lane == 0) sh.qk[t] = sc.qk;
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int i = threadIdx.x + kThreads * j;
    if (i < Tn * BV) sh.v[i / BV][i % BV] = to_float(vraw[j]);
  }
  if (threadIdx.x < Tn) {
    sh.decay[threadIdx.x] = __expf(scalar_from_bits(gbits, p.g_dtype));
    sh.beta[threadIdx.x] = scalar_from_bits(bbits, p.beta_dtype);
  }
}

// Decays the thread's rows of a tile (S = dec S) and returns, for the lane's float4 of columns, the
// column sums S^T k and S^T q over all rows: partials over the thread's rows (k and q at them in kr,
// qr), a butterfly over the warp's row lanes, then across the warps through `red` (one
// __syncthreads; the caller orders any reuse of `red`).
template <int BV, int RPT>
__device__ __forceinline__ void decayed_column_sums(float4 (&S)[RPT], const float (&kr)[RPT], const float (&qr)[RPT],
                                                    float dec, float (*red)[Tile<BV>::LPR][8], float4& ksum,
                                                    float4& qsum) {
  using L = Tile<BV>;
  constexpr int PER = 8 / L::RPI;  // reduced values a lane keeps after the butterfly
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, cg = lane % L::LPR;
  float part[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) part[e] = 0.f;
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    S[i] = scale4(dec, S[i]);
    part[0] = fmaf(kr[i], S[i].x, part[0]);
    part[1] = fmaf(kr[i], S[i].y, part[1]);
    part[2] = fmaf(kr[i], S[i].z, part[2]);
    part[3] = fmaf(kr[i], S[i].w, part[3]);
    part[4] = fmaf(qr[i], S[i].x, part[4]);
    part[5] = fmaf(qr[i], S[i].y, part[5]);
    part[6] = fmaf(qr[i], S[i].z, part[6]);
    part[7] = fmaf(qr[i], S[i].w, part[7]);
  }
  butterfly_reduce<8, L::RPI, L::LPR>(part);
  float* slot = &red[warp][cg][butterfly_first<8, L::RPI, L::LPR>(lane)];
#pragma unroll
  for (int e = 0; e < PER; ++e) slot[e] = part[e];
  __syncthreads();
  ksum = make_float4(0.f, 0.f, 0.f, 0.f);
  qsum = ksum;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float4* r4 = reinterpret_cast<const float4*>(red[w][cg]);
    const float4 a = r4[0], c = r4[1];
    ksum = make_float4(ksum.x + a.x, ksum.y + a.y, ksum.z + a.z, ksum.w + a.w);
    qsum = make_float4(qsum.x + c.x, qsum.y + c.y, qsum.z + c.z, qsum.w + c.w);
  }
}

template <typename T, int KT, int BV, int STAGES>
__global__ void __launch_bounds__(kThreads, min_ctas(KT)) gdn_decode_kernel(const GdnParams p) {
  using L = Tile<BV>;
  constexpr int RPT = KT / L::RG;   // rows per thread
  __shared__ Shared<KT, BV> sh;
  GKA_DYNAMIC_SMEM(float4, tile_buf);  // [STAGES][RPT][kThreads]: each thread's own rows of prefetched tiles

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cg = lane % L::LPR, rgl = lane / L::LPR;
  const int row0 = warp * L::RPI + rgl;
  const int Tn = p.Tn, K = p.K, V = p.V;
  const int nvt = (V + BV - 1) / BV;
  const Stride stride{static_cast<int>(gridDim.x / nvt / p.H), static_cast<int>(gridDim.x / nvt % p.H),
                      static_cast<int>(gridDim.x % nvt)};
  const int64_t slot_stride = static_cast<int64_t>(p.H) * K * V;

  // Issues the asynchronous copies of this thread's rows of item x's state tile into buffer `buf`
  // (one group, committed even when empty so that every item counts as one group).
  auto fetch_state = [&](const Item& x, int buf) {
    const int col = x.vt * BV + 4 * cg;
    if (x.src >= 0 && col < V) {
      const float* s = p.state + x.src * slot_stride + static_cast<int64_t>(x.h) * K * V + col;
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = row0 + L::RG * i;
        if (r < K) cp_async16(&tile_buf[(buf * RPT + i) * kThreads + threadIdx.x], s + static_cast<int64_t>(r) * V);
      }
    }
    cp_async_commit();
  };

  // Prologue: the first item's input prefetches, state copies and inputs; then the next STAGES
  // items' slots (ahead[]), the first STAGES - 1 of them fetched.
  Item cur;
  cur.vt = static_cast<int>(blockIdx.x % nvt);
  cur.h = static_cast<int>(blockIdx.x / nvt % p.H);
  cur.b = static_cast<int>(blockIdx.x / nvt / p.H);
  load_slots(p, cur);
  prefetch_inputs<T, BV>(p, cur);  // issued while the slot index is in flight
  fetch_state(cur, 0);
  if (cur.src >= 0) stage_inputs<T, KT, BV>(p, cur, sh);
  Item ahead[STAGES];
  ahead[0] = advance(p, cur, stride, nvt);
#pragma unroll
  for (int s = 1; s < STAGES; ++s) {
    fetch_state(ahead[s - 1], s);
    ahead[s] = advance(p, ahead[s - 1], stride, nvt);
  }
  int buf = 0;  // cur's buffer; the item fetched during cur's turn takes it over

  while (cur.b < p.B) {
    const int col = cur.vt * BV + 4 * cg;
    const bool col_ok = col < V;
    float4 S[RPT];
    if (cur.src >= 0) {
      cp_async_wait_group<STAGES - 1>();  // cur's copies; the STAGES - 1 later items' stay in flight
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = row0 + L::RG * i;
        S[i] = col_ok && r < K ? tile_buf[(buf * RPT + i) * kThreads + threadIdx.x] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    // Makes the staged inputs visible, and orders every read of tile_buf above before the copies
    // of a later item into it.
    __syncthreads();
    fetch_state(ahead[STAGES - 1], buf);

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
        float kr[RPT], qr[RPT];
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          kr[i] = sh.k[t][row0 + L::RG * i];
          qr[i] = sh.q[t][row0 + L::RG * i];
        }
        float4 ksum, qsum;
        decayed_column_sums<BV>(S, kr, qr, sh.decay[t], sh.red[t & 1], ksum, qsum);
        const float bt = sh.beta[t];
        const float4 v4 = *reinterpret_cast<const float4*>(&sh.v[t][4 * cg]);
        const float4 u = make_float4(bt * (v4.x - ksum.x), bt * (v4.y - ksum.y), bt * (v4.z - ksum.z),
                                     bt * (v4.w - ksum.w));
#pragma unroll
        for (int i = 0; i < RPT; ++i) S[i] = fma4(sh.k[t][row0 + L::RG * i], u, S[i]);
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
          const int r = row0 + L::RG * i;
          if (r < K) *reinterpret_cast<float4*>(s_out + static_cast<int64_t>(r) * V) = S[i];
        }
      }
    }
    // Every read of this item's inputs is done before they are overwritten by the next item's.
    __syncthreads();
    const Item after = advance(p, ahead[STAGES - 1], stride, nvt);
    if (ahead[0].src >= 0) stage_inputs<T, KT, BV>(p, ahead[0], sh);
    cur = ahead[0];
#pragma unroll
    for (int s = 0; s + 1 < STAGES; ++s) ahead[s] = ahead[s + 1];
    ahead[STAGES - 1] = after;
    buf = buf + 1 < STAGES ? buf + 1 : 0;
  }
}

// Single-token step (Tn = 1) with narrow tiles (decode-1): one CTA per work item (grid = items,
// numbered as above), the state tile loaded straight into registers in the layout of
// gdn_decode_kernel (coalesced: LPR lanes share a row), every load issued before any value is used,
// no staging: each lane loads the q and k elements of its own rows, and each warp the strided ones
// its norms need (L1 serves the repeats). One barrier, for the cross-warp column sums. H200 (run
// 70, suite, bf16, states from DRAM, against the persistent kernel in the same call): decode-1 4.9
// -> 4.3 us; at decode-64 it was slower (0.0831 against 0.0783 ms with wide tiles), so wide tiles
// keep the persistent kernel. (Lanes along rows instead, with no barrier at all, was slower at both
// sizes: run 68.)
template <typename T, int KT, int BV>
__global__ void __launch_bounds__(kThreads, min_ctas(KT)) gdn_decode_item_kernel(const GdnParams p) {
  using L = Tile<BV>;
  constexpr int RPT = KT / L::RG;  // rows per thread
  constexpr int NJ = KT / 32;      // q and k elements per lane for the norms
  __shared__ __align__(16) float red[kWarps][L::LPR][8];  // [warp][col4][k-sums x4, q-sums x4]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cg = lane % L::LPR, rgl = lane / L::LPR;
  const int row0 = warp * L::RPI + rgl;
  const int K = p.K, V = p.V;
  const int nvt = (V + BV - 1) / BV;
  const int vt = static_cast<int>(blockIdx.x % nvt), h = static_cast<int>(blockIdx.x / nvt % p.H);
  const int b = static_cast<int>(blockIdx.x / nvt / p.H);
  const int col = vt * BV + 4 * cg;
  const bool col_ok = col < V;
  const bool writer = warp == 0 && rgl == 0 && col_ok;  // the lanes that store the outputs
  T* o = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h + col;

  const int64_t src = load_index(p.src_idx, p.src64, b);
  const int64_t dst = load_index(p.dst_idx, p.dst64, b);
  if (src < 0) {  // padding sequence: state untouched, output 0
    if (writer) o[0] = o[1] = o[2] = o[3] = from_float<T>(0.f);
    return;
  }
  const int64_t slot_stride = static_cast<int64_t>(p.H) * K * V;
  const int64_t head_off = static_cast<int64_t>(h) * K * V + col;
  float4 S[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int r = row0 + L::RG * i;
    S[i] = col_ok && r < K ? *reinterpret_cast<const float4*>(p.state + src * slot_stride + head_off + static_cast<int64_t>(r) * V)
                           : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const T zero = from_float<T>(0.f);
  const T* qp = static_cast<const T*>(p.q) + b * p.sq.b + (h / p.q_group) * p.sq.h;
  const T* kp = static_cast<const T*>(p.k) + b * p.sk.b + (h / p.k_group) * p.sk.h;
  const T* vp = static_cast<const T*>(p.v) + b * p.sv.b + (h / p.v_group) * p.sv.h + col;
  T qn_raw[NJ], kn_raw[NJ], qr_raw[RPT], kr_raw[RPT], v_raw[4];
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    const int i = lane + 32 * j;
    qn_raw[j] = i < K ? qp[i] : zero;
    kn_raw[j] = i < K ? kp[i] : zero;
  }
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    const int r = row0 + L::RG * i;
    qr_raw[i] = r < K ? qp[r] : zero;
    kr_raw[i] = r < K ? kp[r] : zero;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) v_raw[e] = col_ok ? vp[e] : zero;
  const uint32_t gbits = load_scalar_bits(p.g, p.g_dtype, b * p.sg.b + h * p.sg.h);
  const uint32_t bbits = load_scalar_bits(p.beta, p.beta_dtype, b * p.sbeta.b + h * p.sbeta.h);

  float qv[NJ], kv[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    qv[j] = to_float(qn_raw[j]);
    kv[j] = to_float(kn_raw[j]);
  }
  const QkScales sc = qk_scales(qv, kv, p.l2norm, p.scale);
  const float dec = __expf(scalar_from_bits(gbits, p.g_dtype));
  const float beta = scalar_from_bits(bbits, p.beta_dtype);

  float kr[RPT], qr[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    kr[i] = to_float(kr_raw[i]) * sc.k;
    qr[i] = to_float(qr_raw[i]) * sc.q;
  }
  float4 ksum, qsum;
  decayed_column_sums<BV>(S, kr, qr, dec, red, ksum, qsum);
  const float4 u = make_float4(beta * (to_float(v_raw[0]) - ksum.x), beta * (to_float(v_raw[1]) - ksum.y),
                               beta * (to_float(v_raw[2]) - ksum.z), beta * (to_float(v_raw[3]) - ksum.w));
  if (dst >= 0 && col_ok) {
    float* s_out = p.state + dst * slot_stride + head_off;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = row0 + L::RG * i;
      if (r < K) *reinterpret_cast<float4*>(s_out + static_cast<int64_t>(r) * V) = fma4(kr[i], u, S[i]);
    }
  }
  if (writer) {
    o[0] = from_float<T>(fmaf(sc.qk, u.x, qsum.x));
    o[1] = from_float<T>(fmaf(sc.qk, u.y, qsum.y));
    o[2] = from_float<T>(fmaf(sc.qk, u.z, qsum.z));
    o[3] = from_float<T>(fmaf(sc.qk, u.w, qsum.w));
  }
}

// Persistent grid (every CTA resident at once, each looping over its work items) with STAGES
// state tiles in flight per CTA.
template <typename T, int KT, int BV, int STAGES>
void launch_persistent(const GdnParams& p, int per_sm, int64_t items, cudaStream_t stream) {
  constexpr size_t smem = STAGES * state_smem_bytes<KT, BV>();
  allow_dynamic_smem<gdn_decode_kernel<T, KT, BV, STAGES>>(smem, "gdn_decode: cudaFuncSetAttribute");
  const int grid = static_cast<int>(std::min<int64_t>(items, static_cast<int64_t>(per_sm) * sm_count()));
  launch_kernel(gdn_decode_kernel<T, KT, BV, STAGES>, dim3(grid), kThreads, smem, stream, p);
}

// Tiles in flight per CTA of the persistent kernel: GKA_KERNELS_GDN_DECODE_STAGES = "auto" (the
// default), "1" or "2", read at every launch. "auto" takes two where the shared memory of two
// still lets the register budget's CTAs per SM reside (sm_90 at K <= 128), one otherwise.
template <typename T, int KT, int BV>
void launch(const GdnParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.B) * p.H * ((p.V + BV - 1) / BV);
  if constexpr (BV == kNarrowBV) {
    if (p.Tn == 1 && items <= kMaxGridX) {  // one CTA per item (beyond 2^31 - 1 items: persistent)
      launch_kernel(gdn_decode_item_kernel<T, KT, BV>, dim3(static_cast<unsigned>(items)), kThreads, 0, stream, p);
      return;
    }
  }
  const int choice = env_choice("GKA_KERNELS_GDN_DECODE_STAGES", {"auto", "1", "2"});
  const int one = std::min(min_ctas(KT), ctas_by_smem(sizeof(Shared<KT, BV>) + state_smem_bytes<KT, BV>()));
  const int two = std::min(min_ctas(KT), ctas_by_smem(sizeof(Shared<KT, BV>) + 2 * state_smem_bytes<KT, BV>()));
  if (choice == 2 || (choice == 0 && two == one)) launch_persistent<T, KT, BV, 2>(p, two, items, stream);
  else launch_persistent<T, KT, BV, 1>(p, one, items, stream);
}

// 16-column tiles when the 32-column ones would leave SMs without an item (decode-1: 128 items at
// 32 heads), so the state spreads over twice the CTAs; GKA_KERNELS_DECODE_TILES overrides it.
template <typename T, int KT>
void launch_tiles(const GdnParams& p, cudaStream_t stream) {
  const TileWidth w = decode_tile_setting();
  const int64_t wide_items = static_cast<int64_t>(p.B) * p.H * ((p.V + kWideBV - 1) / kWideBV);
  const bool narrow = w == TileWidth::kNarrow || (w == TileWidth::kAuto && wide_items < sm_count("gdn_decode: device query"));
  if (narrow) launch<T, KT, kNarrowBV>(p, stream);
  else launch<T, KT, kWideBV>(p, stream);
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
    if (p.K <= 64) launch_tiles<T, 64>(p, as_stream(stream));
    else if (p.K <= 128) launch_tiles<T, 128>(p, as_stream(stream));
    else launch_tiles<T, 256>(p, as_stream(stream));
  });
  check_launch("gdn_decode");
}

}  // namespace gka
