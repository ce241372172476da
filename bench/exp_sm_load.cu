// How fast one SM pulls a block of state from DRAM, by load path (GPU experiment, standalone).
//
// A decode-1 step runs few CTAs (32 GKA heads, 128 GDN / Mamba-2 tiles), so what bounds its fixed
// cost is how long one CTA takes to get its state on-chip, not the card's bandwidth. Each CTA of
// `ctas` reads `bytes` of its own, from one of enough rotated sets that every launch reads DRAM,
// and optionally writes them back to a second rotated buffer (read + write, as a decode step):
//   ldg      256 threads, 16-byte loads straight into registers, all issued before the first use
//   cpasync  256 threads, 16-byte cp.async into shared memory, one wait
//   tma      one thread issues bulk copies (cp.async.bulk, 32 KiB each) completing on an mbarrier
// Writes: ldg stores from registers, cpasync from shared memory by the same threads, tma by bulk
// copies shared -> global. Times are per launch, from CUDA-graph replay of back-to-back launches
// (the empty kernel's replay time is printed as the floor), plus the median over CTAs of the
// cycles from kernel entry until the data is in registers / shared memory (clock64, thread 0; for
// ldg with write-back the compiler reads the clock before the loads complete, so that column means
// nothing there).
// Last, the replay time of an empty 256-CTA kernel by the size of its parameter block.
//
//     nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/exp_sm_load bench/exp_sm_load.cu && /tmp/exp_sm_load [params]
// ("params": only the parameter-size part). Prints one JSON object.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "exp_check.cuh"

constexpr int kThreads = 256;
constexpr int kBulk = 32 * 1024;  // bytes per bulk copy

enum Method { kLdg = 0, kCpAsync = 1, kTma = 2, kEmpty = 3 };

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Reads `BYTES` at src + blockIdx.x * BYTES; writes them to dst + blockIdx.x * BYTES when WRITE.
// cycles[blockIdx.x] = clock64 cycles from entry until the data is on-chip (thread 0).
template <int M, int BYTES, bool WRITE>
__global__ void __launch_bounds__(kThreads, 1) load_kernel(const float4* src, float4* dst, float* sink,
                                                           long long* cycles) {
  constexpr int N4 = BYTES / 16 / kThreads;  // float4 per thread
  extern __shared__ __align__(128) float4 buf[];
  const long long t0 = clock64();
  const float4* s = src + static_cast<size_t>(blockIdx.x) * (BYTES / 16);
  float4* d = dst + static_cast<size_t>(blockIdx.x) * (BYTES / 16);
  float acc = 0.f;
  if constexpr (M == kLdg) {
    float4 r[N4];
#pragma unroll
    for (int i = 0; i < N4; ++i) r[i] = s[i * kThreads + threadIdx.x];
#pragma unroll
    for (int i = 0; i < N4; ++i) acc += r[i].x + r[i].y + r[i].z + r[i].w;
    __syncthreads();
    if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - t0;
    if constexpr (WRITE) {
#pragma unroll
      for (int i = 0; i < N4; ++i) d[i * kThreads + threadIdx.x] = r[i];
    }
  } else if constexpr (M == kCpAsync) {
#pragma unroll
    for (int i = 0; i < N4; ++i) {
      const int j = i * kThreads + threadIdx.x;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(buf + j)), "l"(s + j) : "memory");
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - t0;
    acc = buf[threadIdx.x].x;
    if constexpr (WRITE) {
#pragma unroll
      for (int i = 0; i < N4; ++i) d[i * kThreads + threadIdx.x] = buf[i * kThreads + threadIdx.x];
    }
  } else if constexpr (M == kTma) {
    __shared__ __align__(8) unsigned long long bar;
    const unsigned b = smem_addr(&bar);
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(b) : "memory");
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(BYTES) : "memory");
#pragma unroll
      for (int off = 0; off < BYTES; off += kBulk) {
        const int n = BYTES - off < kBulk ? BYTES - off : kBulk;
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                smem_addr(reinterpret_cast<char*>(buf) + off)),
            "l"(reinterpret_cast<const char*>(s) + off), "r"(n), "r"(b)
            : "memory");
      }
    }
    __syncthreads();  // the barrier is initialized before anyone waits on it
    unsigned done = 0;
    while (!done) {
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(b)
          : "memory");
    }
    if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - t0;
    acc = buf[threadIdx.x].x;
    if constexpr (WRITE) {
      if (threadIdx.x == 0) {
        for (int off = 0; off < BYTES; off += kBulk) {
          const int n = BYTES - off < kBulk ? BYTES - off : kBulk;
          asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(
                           reinterpret_cast<char*>(d) + off),
                       "r"(smem_addr(reinterpret_cast<char*>(buf) + off)), "r"(n)
                       : "memory");
        }
        asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;\n" ::: "memory");
      }
    }
  } else {
    if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - t0;
  }
  if (acc == 1234.5f) sink[threadIdx.x] = acc;  // keeps the loads (never true for the data used)
}

// Microseconds per launch of `launches` launches (enqueue(i) issues the i-th on `st`) captured in
// one CUDA graph, replayed 10 times after a warm-up replay.
template <typename Enqueue>
double graph_us(cudaStream_t st, int launches, Enqueue enqueue) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  for (int i = 0; i < launches; ++i) enqueue(i);
  CHECK(cudaStreamEndCapture(st, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  CHECK(cudaGraphLaunch(ge, st));
  CHECK(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  const int reps = 10;
  CHECK(cudaEventRecord(a, st));
  for (int r = 0; r < reps; ++r) CHECK(cudaGraphLaunch(ge, st));
  CHECK(cudaEventRecord(b, st));
  CHECK(cudaEventSynchronize(b));
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  return 1000.0 * ms / (reps * launches);
}

// An empty kernel whose by-value parameter block is BYTES long (the decode kernels pass 0.2-1 KB
// structs; the loads above pass 32 B).
template <int BYTES>
struct Params {
  float* sink;
  char pad[BYTES - sizeof(float*)];
};
template <int BYTES>
__global__ void params_kernel(const Params<BYTES> p) {
  if (threadIdx.x == 1024) p.sink[0] = p.pad[0];  // never true: keeps the parameter
}

template <int BYTES>
double time_params(int ctas, float* sink, cudaStream_t st) {
  Params<BYTES> p{};
  p.sink = sink;
  return graph_us(st, 256, [&](int) { params_kernel<BYTES><<<ctas, kThreads, 0, st>>>(p); });
}

struct Result {
  const char* method;
  int ctas, bytes, write;
  double us, cycles_median;
};

template <int M, int BYTES, bool WRITE>
Result measure(const char* name, int ctas, char* src, char* dst, size_t pool, float* sink, long long* cycles,
               cudaStream_t st) {
  auto kern = load_kernel<M, BYTES, WRITE>;
  const int smem = M == kLdg || M == kEmpty ? 0 : BYTES;
  CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const size_t set = static_cast<size_t>(ctas) * BYTES;
  const int sets = static_cast<int>(std::min<size_t>(256, pool / set));
  const double us = graph_us(st, sets, [&](int i) {
    kern<<<ctas, kThreads, smem, st>>>(reinterpret_cast<const float4*>(src + i * set),
                                       reinterpret_cast<float4*>(dst + i * set), sink, cycles);
  });
  std::vector<long long> cyc(ctas);
  CHECK(cudaMemcpy(cyc.data(), cycles, ctas * sizeof(long long), cudaMemcpyDeviceToHost));
  std::sort(cyc.begin(), cyc.end());
  return Result{name, ctas, BYTES, WRITE ? 1 : 0, us, static_cast<double>(cyc[ctas / 2])};
}

template <int BYTES, bool WRITE>
void sweep(std::vector<Result>& out, int ctas, char* src, char* dst, size_t pool, float* sink, long long* cyc,
           cudaStream_t st) {
  out.push_back(measure<kLdg, BYTES, WRITE>("ldg", ctas, src, dst, pool, sink, cyc, st));
  out.push_back(measure<kCpAsync, BYTES, WRITE>("cpasync", ctas, src, dst, pool, sink, cyc, st));
  out.push_back(measure<kTma, BYTES, WRITE>("tma", ctas, src, dst, pool, sink, cyc, st));
}

int main(int argc, char** argv) {
  const bool sweep_loads = !(argc > 1 && std::string(argv[1]) == "params");
  const size_t pool = static_cast<size_t>(1) << 30;  // 1 GiB per buffer: >= 256 sets or 16x L2
  char *src, *dst;
  float* sink;
  long long* cycles;
  CHECK(cudaMalloc(&src, pool));
  CHECK(cudaMalloc(&dst, pool));
  CHECK(cudaMalloc(&sink, 4096));
  CHECK(cudaMalloc(&cycles, 4096 * sizeof(long long)));
  CHECK(cudaMemset(src, 0, pool));
  cudaStream_t st;
  CHECK(cudaStreamCreate(&st));
  std::vector<Result> res;
  res.push_back(measure<kEmpty, 16384, false>("empty", 32, src, dst, pool, sink, cycles, st));
  for (int ctas : {32, 64, 128}) {
    if (!sweep_loads) break;
    sweep<16384, false>(res, ctas, src, dst, pool, sink, cycles, st);
    sweep<16384, true>(res, ctas, src, dst, pool, sink, cycles, st);
    sweep<65536, false>(res, ctas, src, dst, pool, sink, cycles, st);
    sweep<65536, true>(res, ctas, src, dst, pool, sink, cycles, st);
    sweep<131072, false>(res, ctas, src, dst, pool, sink, cycles, st);
    sweep<131072, true>(res, ctas, src, dst, pool, sink, cycles, st);
  }
  const double p32 = time_params<32>(256, sink, st), p256 = time_params<256>(256, sink, st);
  const double p1k = time_params<1024>(256, sink, st), p4k = time_params<4096>(256, sink, st);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  std::printf("{\"device\": \"%s\", \"sms\": %d, \"l2_bytes\": %d, \"clock_khz\": %d, \"results\": [\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize, clock_khz);
  for (size_t i = 0; i < res.size(); ++i)
    std::printf("  {\"method\": \"%s\", \"ctas\": %d, \"bytes\": %d, \"write\": %d, \"us\": %.3f, \"cycles_to_data\": %.0f}%s\n",
                res[i].method, res[i].ctas, res[i].bytes, res[i].write, res[i].us, res[i].cycles_median,
                i + 1 < res.size() ? "," : "");
  std::printf("], \"empty_kernel_us_by_param_bytes\": {\"32\": %.3f, \"256\": %.3f, \"1024\": %.3f, \"4096\": %.3f}}\n",
              p32, p256, p1k, p4k);
  return 0;
}
