// pybind11 bindings of gka_kernels._C. Every launcher takes raw device pointers (uintptr_t from
// tensor.data_ptr(), 0 for an absent optional tensor), strides in elements as (batch, token, head)
// triples, and the caller's stream handle, so the build needs no torch headers. The Python
// wrappers in gka_kernels/cuda/ validate everything; the launchers re-check only what would make
// a kernel read out of bounds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>
#include <array>
#include <cstdint>

#include "decode_params.h"

namespace gka {
void state_copy_launch(uintptr_t src, uintptr_t dst, uintptr_t src_idx, uintptr_t dst_idx,
                       int64_t n, int64_t slot_elems, uintptr_t stream);
}

namespace py = pybind11;
using Str = std::array<int64_t, 3>;

static int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

template <typename P> static P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }
static gka::Strides3 strides(const Str& s) { return {s[0], s[1], s[2]}; }

static void gdn_decode(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t g, uintptr_t beta,
                       uintptr_t state, uintptr_t src_idx, uintptr_t dst_idx, uintptr_t out,
                       Str sq, Str sk, Str sv, Str sg, Str sbeta, Str so, int B, int Tn, int H,
                       int q_heads, int k_heads, int v_heads, int K, int V, int dtype, int g_dtype,
                       int beta_dtype, bool src64, bool dst64, float scale, bool l2norm, uintptr_t stream) {
  gka::GdnParams p{};
  p.q = ptr<const void>(q); p.k = ptr<const void>(k); p.v = ptr<const void>(v);
  p.g = ptr<const void>(g); p.beta = ptr<const void>(beta);
  p.state = ptr<float>(state);
  p.src_idx = ptr<const void>(src_idx); p.dst_idx = ptr<const void>(dst_idx);
  p.out = ptr<void>(out);
  p.sq = strides(sq); p.sk = strides(sk); p.sv = strides(sv); p.sg = strides(sg);
  p.sbeta = strides(sbeta); p.so = strides(so);
  p.B = B; p.Tn = Tn; p.H = H; p.K = K; p.V = V;
  if (q_heads < 1 || k_heads < 1 || v_heads < 1 || H % q_heads || H % k_heads || H % v_heads)
    throw std::invalid_argument("gdn_decode: q, k and v head counts must divide H");
  p.q_group = H / q_heads; p.k_group = H / k_heads; p.v_group = H / v_heads;
  p.g_dtype = g_dtype; p.beta_dtype = beta_dtype;
  p.src64 = src64; p.dst64 = dst64; p.l2norm = l2norm; p.scale = scale;
  gka::gdn_decode_launch(p, dtype, stream);
}

static void mamba2_decode(uintptr_t x, uintptr_t dt, uintptr_t A, uintptr_t Bm, uintptr_t Cm,
                          uintptr_t D, uintptr_t z, uintptr_t dt_bias, uintptr_t state,
                          uintptr_t src_idx, uintptr_t dst_idx, uintptr_t out, Str sx, Str sdt,
                          Str sB, Str sC, Str sz, Str so, int64_t D_stride_h, int64_t D_stride_p,
                          int B, int Tn, int H, int x_heads, int B_groups, int C_groups, int P, int N,
                          int dtype, int dt_dtype, int A_dtype, int D_dtype, int dt_bias_dtype,
                          bool src64, bool dst64, bool softplus, float dt_min,
                          float dt_max, uintptr_t stream) {
  gka::Mamba2Params p{};
  p.x = ptr<const void>(x); p.dt = ptr<const void>(dt); p.A = ptr<const void>(A);
  p.Bm = ptr<const void>(Bm); p.Cm = ptr<const void>(Cm); p.D = ptr<const void>(D);
  p.z = ptr<const void>(z); p.dt_bias = ptr<const void>(dt_bias);
  p.state = ptr<float>(state);
  p.src_idx = ptr<const void>(src_idx); p.dst_idx = ptr<const void>(dst_idx);
  p.out = ptr<void>(out);
  p.sx = strides(sx); p.sdt = strides(sdt); p.sB = strides(sB); p.sC = strides(sC);
  p.sz = strides(sz); p.so = strides(so);
  p.D_stride_h = D_stride_h; p.D_stride_p = D_stride_p;
  p.B = B; p.Tn = Tn; p.H = H; p.P = P; p.N = N;
  if (x_heads < 1 || B_groups < 1 || C_groups < 1 || H % x_heads || H % B_groups || H % C_groups)
    throw std::invalid_argument("mamba2_decode: x heads and B, C groups must divide H");
  p.x_group = H / x_heads; p.B_group = H / B_groups; p.C_group = H / C_groups;
  p.dt_dtype = dt_dtype; p.A_dtype = A_dtype; p.D_dtype = D_dtype; p.dt_bias_dtype = dt_bias_dtype;
  p.src64 = src64; p.dst64 = dst64; p.softplus = softplus;
  p.dt_min = dt_min; p.dt_max = dt_max;
  gka::mamba2_decode_launch(p, dtype, stream);
}

static void gka_decode(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t g, uintptr_t alpha,
                       uintptr_t h_kk, uintptr_t h_kv, uintptr_t src_idx, uintptr_t dst_idx,
                       uintptr_t out, Str sq, Str sk, Str sv, Str sg, Str salpha, Str so, int B,
                       int Tn, int H, int q_heads, int k_heads, int v_heads, int K, int V, int dtype,
                       int g_dtype, int alpha_dtype, bool src64, bool dst64, int num_iter,
                       float ridge_ratio, float scale, uintptr_t stream) {
  gka::GkaParams p{};
  p.q = ptr<const void>(q); p.k = ptr<const void>(k); p.v = ptr<const void>(v);
  p.g = ptr<const void>(g); p.alpha = ptr<const void>(alpha);
  p.h_kk = ptr<float>(h_kk); p.h_kv = ptr<float>(h_kv);
  p.src_idx = ptr<const void>(src_idx); p.dst_idx = ptr<const void>(dst_idx);
  p.out = ptr<void>(out);
  p.sq = strides(sq); p.sk = strides(sk); p.sv = strides(sv); p.sg = strides(sg);
  p.salpha = strides(salpha); p.so = strides(so);
  p.B = B; p.Tn = Tn; p.H = H; p.K = K; p.V = V;
  if (q_heads < 1 || k_heads < 1 || v_heads < 1 || H % q_heads || H % k_heads || H % v_heads)
    throw std::invalid_argument("gka_decode: q, k and v head counts must divide H");
  p.q_group = H / q_heads; p.k_group = H / k_heads; p.v_group = H / v_heads;
  p.g_dtype = g_dtype; p.alpha_dtype = alpha_dtype; p.num_iter = num_iter;
  p.src64 = src64; p.dst64 = dst64; p.scale = scale; p.ridge_ratio = ridge_ratio;
  gka::gka_decode_launch(p, dtype, stream);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "gka-kernels CUDA C++ decode kernels (raw-pointer launchers)";
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.def("state_copy", &gka::state_copy_launch, py::arg("src"), py::arg("dst"), py::arg("src_idx"),
        py::arg("dst_idx"), py::arg("n"), py::arg("slot_elems"), py::arg("stream"),
        "dst[dst_idx[i]] = src[src_idx[i]] over float32 state pools; -1 skips the pair");
  m.def("gdn_decode", &gdn_decode, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"),
        py::arg("beta"), py::arg("state"), py::arg("src_idx"), py::arg("dst_idx"), py::arg("out"),
        py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("g_strides"),
        py::arg("beta_strides"), py::arg("out_strides"), py::arg("B"), py::arg("Tn"), py::arg("H"),
        py::arg("q_heads"), py::arg("k_heads"), py::arg("v_heads"), py::arg("K"), py::arg("V"),
        py::arg("dtype"), py::arg("g_dtype"), py::arg("beta_dtype"), py::arg("src64"),
        py::arg("dst64"), py::arg("scale"), py::arg("l2norm"), py::arg("stream"),
        "Gated DeltaNet decode step in place on a float32 state pool [slots, H, K, V]");
  m.def("mamba2_decode", &mamba2_decode, py::arg("x"), py::arg("dt"), py::arg("A"), py::arg("B_mat"),
        py::arg("C_mat"), py::arg("D"), py::arg("z"), py::arg("dt_bias"), py::arg("state"),
        py::arg("src_idx"), py::arg("dst_idx"), py::arg("out"), py::arg("x_strides"),
        py::arg("dt_strides"), py::arg("B_strides"), py::arg("C_strides"), py::arg("z_strides"),
        py::arg("out_strides"), py::arg("D_stride_h"), py::arg("D_stride_p"), py::arg("B"),
        py::arg("Tn"), py::arg("H"), py::arg("x_heads"), py::arg("B_groups"), py::arg("C_groups"),
        py::arg("P"), py::arg("N"), py::arg("dtype"), py::arg("dt_dtype"), py::arg("A_dtype"),
        py::arg("D_dtype"), py::arg("dt_bias_dtype"), py::arg("src64"), py::arg("dst64"),
        py::arg("softplus"), py::arg("dt_min"), py::arg("dt_max"), py::arg("stream"),
        "Mamba-2 selective state update in place on a float32 state pool [slots, H, P, N]");
  m.def("gka_decode", &gka_decode, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"),
        py::arg("alpha"), py::arg("h_kk"), py::arg("h_kv"), py::arg("src_idx"), py::arg("dst_idx"),
        py::arg("out"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("g_strides"), py::arg("alpha_strides"), py::arg("out_strides"), py::arg("B"),
        py::arg("Tn"), py::arg("H"), py::arg("q_heads"), py::arg("k_heads"), py::arg("v_heads"),
        py::arg("K"), py::arg("V"), py::arg("dtype"), py::arg("g_dtype"), py::arg("alpha_dtype"),
        py::arg("src64"), py::arg("dst64"), py::arg("num_iter"), py::arg("ridge_ratio"),
        py::arg("scale"), py::arg("stream"),
        "Gated KalmaNet decode step in place on float32 pools h_kk [slots, H, K, K], h_kv [slots, H, K, V]");
}
