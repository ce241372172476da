// Launch parameters of the fused decode kernels (plain C++, shared by bindings.cpp and the .cu files).
//
// Every activation is addressed as base + b * stride[0] + t * stride[1] + head * stride[2] + i
// (last dimension contiguous), so views of a larger projection output need no copy. State pools are
// contiguous float32 [slots, H, ...]. Sequence b reads slot src_idx[b] and writes slot dst_idx[b]
// (the two arrays may be the same; a null array means slot b). src_idx[b] < 0 skips the sequence
// (state untouched, its output rows set to 0); dst_idx[b] < 0 computes the output without storing
// the new state. Destination slots must be distinct and must not be the source of another sequence.
#pragma once
#include <cstdint>

namespace gka {

struct Strides3 {
  int64_t b, t, h;
};

// Gated DeltaNet: S = exp(g) (I - beta k k^T) S + beta k v^T ; o = scale S^T q.
struct GdnParams {
  const void *q, *k, *v, *g, *beta;
  float* state;                   // [slots, H, K, V]
  const void *src_idx, *dst_idx;  // [B] int32 / int64
  void* out;                      // [B, Tn, H, V], dtype of q
  Strides3 sq, sk, sv, sg, sbeta, so;
  int B, Tn, H, q_group, k_group, v_group, K, V;  // *_group = H / heads of that input
  int g_dtype, beta_dtype;
  bool src64, dst64, l2norm;
  float scale;
};

// Mamba-2 selective state update, state [slots, H, P, N]:
// dt = clamp(softplus?(dt + dt_bias)); s = exp(dt A) s + dt x B^T; y = (s C + D x) * silu(z).
struct Mamba2Params {
  const void *x, *dt, *A, *Bm, *Cm, *D, *z, *dt_bias;  // D, z, dt_bias may be null
  float* state;
  const void *src_idx, *dst_idx;
  void* out;  // [B, Tn, H, P], dtype of x
  Strides3 sx, sdt, sB, sC, sz, so;
  int64_t D_stride_h, D_stride_p;  // D [H] (stride_p 0) or [H, P]
  int B, Tn, H, x_group, B_group, C_group, P, N;
  int dt_dtype, A_dtype, D_dtype, dt_bias_dtype;
  bool src64, dst64, softplus;
  float dt_min, dt_max;  // dt_limit, always applied (SPEC 4)
};

// Most Chebyshev iterations of the GKA decode step.
constexpr int kMaxChebyshevIter = 64;

// Gated KalmaNet with tied decays: H = e^g H + k k^T, U = e^g U + k v^T, Chebyshev solve of
// (H + lam I) x = q with lam = ridge * ||H||_F, qm = q + alpha (x - q), o = scale U^T qm.
struct GkaParams {
  const void *q, *k, *v, *g, *alpha;  // alpha may be null (alpha = 1)
  float *h_kk, *h_kv;                 // [slots, H, K, K], [slots, H, K, V]
  const void *src_idx, *dst_idx;
  void* out;  // [B, Tn, H, V], dtype of q
  Strides3 sq, sk, sv, sg, salpha, so;
  int B, Tn, H, q_group, k_group, v_group, K, V;
  int g_dtype, alpha_dtype, num_iter;
  bool src64, dst64;
  float scale, ridge_ratio;
  // Staggered first wave, set by gka_decode_launch: a CTA with linear index i < first_wave waits
  // (i % stagger_groups) * stagger_cycles before starting (stagger_groups <= 1: no wait). See
  // gka_decode.cu.
  int first_wave, stagger_groups;
  long long stagger_cycles;
  // Per-iteration Chebyshev coefficients (a_i, b_i, e_i), filled by gka_decode_launch: they depend
  // only on ridge_ratio (see gka_decode.cu).
  float cheb[kMaxChebyshevIter][3];
};

void gdn_decode_launch(const GdnParams& p, int dtype, uintptr_t stream);
void mamba2_decode_launch(const Mamba2Params& p, int dtype, uintptr_t stream);
void gka_decode_launch(const GkaParams& p, int dtype, uintptr_t stream);

}  // namespace gka
