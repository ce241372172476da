// Cycles per Chebyshev iteration of the CUDA GKA decode solve, by register layout of H (GPU
// experiment, standalone).
//
// The decode step's solve (csrc/gka_decode.cu) runs num_iter sequential matvecs y = H x with the
// 128 x 128 float32 H held in registers, then the three-FMA update
//     x' = a_i x - (b_i / fro) (H x - q) - e_i x_prev
// and hands x' to every thread through shared memory and one barrier. This measures that loop
// alone (no state traffic) for layouts of H over the threads:
//   main   256 threads, 4 rows x 16 columns each (4 float4 at stride 32 columns), 8 lanes per row:
//          4 LDS.128 of x, 64 FMAs, a 3-stage butterfly (csrc/gka_decode.cu's layout)
//   r8     128 threads, 8 rows x 16 columns each, 8 lanes per row: 4 LDS.128, 128 FMAs, 3 stages
//          with 7 shuffles; half the x loads and half the barrier's warps of main
//   row    128 threads, one whole row each: 32 broadcast LDS.128, 128 FMAs in 8 partial sums,
//          no shuffle
//   tN-rR-cC   N threads, R rows x (128 / C) columns each, C lanes per row (more warps per
//          scheduler to hide the FMA and shuffle latencies, at more x loads or shuffle stages);
//          main-na2: main with two partial sums per row
//   split2 a cluster of 2 CTAs (256 threads each) on two SMs, CTA s owning rows [64 s, 64 s + 64):
//          2 rows x 16 columns per thread, 4 LDS.128, 32 FMAs, 3 stages; the new rows go to both
//          CTAs' shared memory (st.shared::cluster) and each CTA waits for its peer's rows on an
//          mbarrier (the peer's thread 0 arrives remotely with release after a CTA barrier), or,
//          in split2-bar, on a cluster barrier
// and main's loop taken apart: main-exchange keeps the update, the store of x, the barrier and the
// load of the own row of x but no matvec (the "row sum" is x[own_row] itself); main-matvec keeps
// the FMAs and the butterfly on an iterate that stays in registers (every column takes the thread's
// own x: no store, no barrier, no load), so that each iteration still waits for the one before.
// Each layout runs num_iter = 8 and 64 in one launch of `ctas` CTAs; thread 0 of every CTA reads
// clock64 after the barrier before the loop and after the barrier that ends it, so the cycles per
// iteration are (c64 - c8) / 56 (median over CTAs). ctas = 64 is decode-1's grid (one CTA per SM),
// 264 puts two CTAs on every SM (decode-64's residency: the layouts then share FMA issue; a
// 1024-thread CTA fills an SM alone). The x of every full loop is checked against a float64 host
// loop of the same recurrence (the loops taken apart report max_rel_err -1).
//
//     nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/exp_gka_decode_loop bench/exp_gka_decode_loop.cu && /tmp/exp_gka_decode_loop
// Prints one JSON object.
#include "../csrc/common.cuh"
#include "exp_check.cuh"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

constexpr int D = 128;
constexpr int kMaxIter = 64;

struct LoopParams {
  const float* h;    // [D, D]
  const float* q;    // [D]
  float* x;          // [ctas, D]
  long long* cycles;  // [ctas]
  float inv_fro, gamma;
  int num_iter;
  float cheb[kMaxIter][3];
};

enum LoopMode { kFull = 0, kExchangeOnly = 1, kMatvecOnly = 2 };
// How x' reaches the threads: one CTA's barrier, or a cluster of 2 CTAs (each owning half of the
// rows and storing its new rows into both CTAs' shared memory) that waits on an mbarrier per CTA
// (two arrivals a phase: its own thread 0 and the peer's, each after its CTA's barrier, the remote
// one with release at cluster scope) or on a cluster barrier.
enum Exchange { kCta = 0, kClusterMbarrier = 1, kClusterBarrier = 2 };

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ uint32_t peer_addr(uint32_t a, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_cluster(uint32_t a, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(a), "f"(v) : "memory");
}
__device__ __forceinline__ void arrive_remote(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void arrive_local(uint32_t bar) {
  asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void wait_parity(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{ .reg .pred done;\n"
      "WAIT: mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT; }" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// THREADS threads, each holding HR rows x (32 / CL) float4 of H; CL lanes share a row (float4
// index CL j + lane % CL of a row); NA partial sums per row (chains the FMAs can overlap). With a
// cluster exchange, CTA s of the pair owns rows [64 s, 64 s + 64).
template <int THREADS, int HR, int CL, int NA, int MODE = kFull, int EXCHANGE = kCta>
__global__ void __launch_bounds__(THREADS) chebyshev_loop_kernel(const LoopParams p) {
  constexpr int HC = 32 / CL, S = EXCHANGE == kCta ? 1 : 2;
  static_assert((THREADS / 32) * (32 / CL) * HR * S == D, "the CTAs must cover the 128 rows");
  static_assert(MODE == kFull || S == 1, "loops are taken apart in one CTA only");
  __shared__ __align__(16) float qs[D];
  __shared__ __align__(16) float xbuf[2][D];
  __shared__ __align__(8) unsigned long long bar;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const uint32_t rank = S > 1 ? cluster_rank() : 0u, peer = rank ^ 1u;
  const int cg = lane % CL, hrow0 = (D / S) * rank + (warp * (32 / CL) + lane / CL) * HR;
  float4 Hm[HR][HC];
#pragma unroll
  for (int i = 0; i < HR; ++i)
#pragma unroll
    for (int j = 0; j < HC; ++j) Hm[i][j] = reinterpret_cast<const float4*>(p.h + (hrow0 + i) * D)[CL * j + cg];
  for (int i = tid; i < D; i += THREADS) qs[i] = p.q[i];
  const uint32_t bar_local = smem_addr(&bar), bar_peer = S > 1 ? peer_addr(bar_local, peer) : 0u;
  if (EXCHANGE == kClusterMbarrier && tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 2;" ::"r"(bar_local) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (S > 1) {
    gka::cluster_arrive();
    gka::cluster_wait();
  } else {
    __syncthreads();
  }

  const int own_row = hrow0 + gka::butterfly_first<HR, CL, 1>(lane);
  const bool writer = (cg % (CL / HR > 1 ? CL / HR : 1)) == 0;
  const float qr = qs[own_row];
  float x = p.gamma * qr, xprev = 0.f, ymul = p.gamma;
  const float* xin = qs;
  const long long start = clock64();
  for (int it = 0; it < p.num_iter; ++it) {
    const float ca = p.cheb[it][0], cb = p.cheb[it][1] * p.inv_fro, ce = p.cheb[it][2];
    float acc[HR][NA];
#pragma unroll
    for (int i = 0; i < HR; ++i)
#pragma unroll
      for (int a = 0; a < NA; ++a) acc[i][a] = 0.f;
    if (MODE != kExchangeOnly) {
#pragma unroll
      for (int j = 0; j < HC; ++j) {
        const float4 xv = MODE == kMatvecOnly ? make_float4(x, x, x, x) : reinterpret_cast<const float4*>(xin)[CL * j + cg];
#pragma unroll
        for (int i = 0; i < HR; ++i) acc[i][j % NA] = gka::dot4(Hm[i][j], xv, acc[i][j % NA]);
      }
    }
    float row[HR];
#pragma unroll
    for (int i = 0; i < HR; ++i) {
      row[i] = acc[i][0];
#pragma unroll
      for (int a = 1; a < NA; ++a) row[i] += acc[i][a];
    }
    if (MODE == kExchangeOnly) row[0] = xin[own_row];
    if (MODE != kExchangeOnly) gka::butterfly_reduce<HR, CL, 1>(row);
    const float r = fmaf(row[0], ymul, -qr);
    const float xn = fmaf(ca, x, -fmaf(cb, r, ce * xprev));
    xprev = x;
    x = xn;
    if (MODE != kMatvecOnly) {
      float* xo = xbuf[it & 1];
      if (writer) {
        xo[own_row] = x;
        if (S > 1) st_cluster(peer_addr(smem_addr(xo + own_row), peer), x);
      }
      if (EXCHANGE == kClusterBarrier) {
        gka::cluster_arrive();
        gka::cluster_wait();
      } else {
        __syncthreads();
        if (EXCHANGE == kClusterMbarrier) {
          if (tid == 0) {
            arrive_local(bar_local);
            arrive_remote(bar_peer);
          }
          wait_parity(bar_local, it & 1);
        }
      }
      xin = xo;
    }
    ymul = 1.f;
  }
  __syncthreads();
  const long long stop = clock64();
  if (writer) p.x[blockIdx.x / S * D + own_row] = x;
  if (tid == 0) p.cycles[blockIdx.x] = stop - start;
  if (S > 1) {  // the peer may still write into this CTA's shared memory
    gka::cluster_arrive();
    gka::cluster_wait();
  }
}

// float64 host loop of the same recurrence.
std::vector<double> reference(const std::vector<float>& h, const std::vector<float>& q, const LoopParams& p) {
  std::vector<double> x(D), xprev(D, 0.0), xin(q.begin(), q.end()), y(D);
  for (int i = 0; i < D; ++i) x[i] = p.gamma * (double)q[i];
  double ymul = p.gamma;
  for (int it = 0; it < p.num_iter; ++it) {
    for (int i = 0; i < D; ++i) {
      double s = 0;
      for (int j = 0; j < D; ++j) s += (double)h[i * D + j] * xin[j];
      y[i] = s;
    }
    for (int i = 0; i < D; ++i) {
      const double r = y[i] * ymul - q[i];
      const double xn = p.cheb[it][0] * x[i] - ((double)p.cheb[it][1] * p.inv_fro * r + p.cheb[it][2] * xprev[i]);
      xprev[i] = x[i];
      x[i] = xn;
    }
    xin = x;
    ymul = 1.0;
  }
  return x;
}

// n CTAs of 256 threads in clusters of 2.
void launch_pair(void (*kernel)(LoopParams), int n, const LoopParams& p) {
  gka::launch_cluster_kernel(kernel, dim3(n), 256, 0, nullptr, 2, p);
}

struct Result {
  double cycles_per_iter, max_rel_err;  // max_rel_err < 0: not checked (a loop taken apart)
};

// ctas CTAs of `launch` (results of CTA b at x[b / per_x]), num_iter 8 and 64.
template <typename Launch>
Result run_layout(Launch launch, int per_x, LoopParams p, int ctas, const std::vector<float>& h, const std::vector<float>& q,
                  bool check = true) {
  long long* cyc;
  float* x;
  CHECK(cudaMalloc(&cyc, ctas * sizeof(long long)));
  CHECK(cudaMalloc(&x, ctas * D * sizeof(float)));
  p.cycles = cyc;
  p.x = x;
  double med[2];
  double err = 0;
  const int iters[2] = {8, 64};
  for (int k = 0; k < 2; ++k) {
    p.num_iter = iters[k];
    std::vector<long long> best(ctas, -1);
    for (int rep = 0; rep < 5; ++rep) {  // the fastest of 5 launches per CTA (warm code and clocks)
      launch(ctas, p);
      CHECK(cudaGetLastError());
      std::vector<long long> c(ctas);
      CHECK(cudaMemcpy(c.data(), cyc, ctas * sizeof(long long), cudaMemcpyDeviceToHost));
      for (int i = 0; i < ctas; ++i) best[i] = best[i] < 0 ? c[i] : std::min(best[i], c[i]);
    }
    std::sort(best.begin(), best.end());
    med[k] = (double)best[ctas / 2];
    std::vector<float> xs(ctas * D);
    CHECK(cudaMemcpy(xs.data(), x, xs.size() * sizeof(float), cudaMemcpyDeviceToHost));
    const std::vector<double> ref = reference(h, q, p);
    double scale = 0;
    for (double v : ref) scale = std::max(scale, std::fabs(v));
    for (int b = 0; b < ctas / per_x; ++b)
      for (int i = 0; i < D; ++i) err = std::max(err, std::fabs(xs[b * D + i] - ref[i]) / scale);
  }
  CHECK(cudaFree(cyc));
  CHECK(cudaFree(x));
  return {(med[1] - med[0]) / (iters[1] - iters[0]), check ? err : -1.0};
}

int main() {
  // H = A A^T / D (symmetric positive semidefinite, as the decode state), q standard normal.
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  std::vector<float> a(D * D), h(D * D), q(D);
  for (auto& v : a) v = nd(gen);
  for (auto& v : q) v = nd(gen);
  double fro2 = 0;
  for (int i = 0; i < D; ++i)
    for (int j = 0; j < D; ++j) {
      double s = 0;
      for (int k = 0; k < D; ++k) s += (double)a[i * D + k] * a[j * D + k];
      h[i * D + j] = (float)(s / D);
      fro2 += (s / D) * (s / D);
    }
  LoopParams p{};
  const double ridge = 0.02, r = 1.0 / (1.0 + 2.0 * ridge), c = 0.25 * r * r;
  double w = 2.0;
  for (int i = 0; i < kMaxIter; ++i) {  // as chebyshev_coefficients in csrc/gka_decode.cu
    w = 1.0 / (1.0 - c * w);
    p.cheb[i][0] = (float)(r * w);
    p.cheb[i][1] = (float)(2.0 * r * w);
    p.cheb[i][2] = (float)(w - 1.0);
  }
  p.inv_fro = (float)(1.0 / std::sqrt(fro2));
  p.gamma = (float)(2.0 * p.inv_fro / (1.0 + 2.0 * ridge));
  float *dh, *dq;
  CHECK(cudaMalloc(&dh, h.size() * sizeof(float)));
  CHECK(cudaMalloc(&dq, q.size() * sizeof(float)));
  CHECK(cudaMemcpy(dh, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dq, q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice));
  p.h = dh;
  p.q = dq;

  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  std::printf("{\"card\": \"%s\", \"sms\": %d, \"clock_khz\": %d, \"rows\": [", prop.name, prop.multiProcessorCount, clock_khz);
  const int grids[2] = {64, 2 * prop.multiProcessorCount};
  bool first = true;
  for (int ctas : grids) {
    const Result res[12] = {
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<256, 4, 8, 1><<<n, 256>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<128, 8, 8, 1><<<n, 128>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<128, 1, 1, 8><<<n, 128>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { launch_pair(chebyshev_loop_kernel<256, 2, 8, 1, kFull, kClusterMbarrier>, n, lp); },
                   2, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { launch_pair(chebyshev_loop_kernel<256, 2, 8, 1, kFull, kClusterBarrier>, n, lp); },
                   2, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<256, 4, 8, 1, kExchangeOnly><<<n, 256>>>(lp); }, 1, p,
                   ctas, h, q, false),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<256, 4, 8, 1, kMatvecOnly><<<n, 256>>>(lp); }, 1, p,
                   ctas, h, q, false),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<512, 2, 8, 1><<<n, 512>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<512, 4, 16, 1><<<n, 512>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<1024, 1, 8, 1><<<n, 1024>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<1024, 2, 16, 1><<<n, 1024>>>(lp); }, 1, p, ctas, h, q),
        run_layout([](int n, const LoopParams& lp) { chebyshev_loop_kernel<256, 4, 8, 2><<<n, 256>>>(lp); }, 1, p, ctas, h, q)};
    const char* names[12] = {"main", "r8", "row", "split2", "split2-bar", "main-exchange", "main-matvec",
                             "t512-r2-c8", "t512-r4-c16", "t1024-r1-c8", "t1024-r2-c16", "main-na2"};
    for (int l = 0; l < 12; ++l) {
      std::printf("%s\n  {\"layout\": \"%s\", \"ctas\": %d, \"cycles_per_iter\": %.1f, \"max_rel_err\": %.2e}",
                  first ? "" : ",", names[l], ctas, res[l].cycles_per_iter, res[l].max_rel_err);
      first = false;
    }
  }
  std::printf("\n]}\n");
  return 0;
}
