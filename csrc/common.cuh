// Shared helpers for the gka_kernels._C decode kernels: error checks, dtype tags and dispatch,
// scalar/index loads, warp reductions, cp.async, kernel launch.
//
// GKA_HOST_EMULATION (set only by the CPU test that compiles csrc with g++) swaps the few
// device-only constructs for the host emulation in emulation/host_emulation.h.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#if defined(GKA_HOST_EMULATION)
#include "emulation/host_emulation.h"
#endif

namespace gka {

// Element type tags shared with Python (gka_kernels/cuda/_dtypes.py keeps the same numbers).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Most tokens per sequence in one decode step (speculative decoding drafts up to 8).
constexpr int kMaxDecodeTokens = 8;
// Largest grid dimension y / z (the kernels put heads and sequences there).
constexpr int kMaxGridYZ = 65535;
// Largest grid dimension x.
constexpr int64_t kMaxGridX = 2147483647;

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Calls `body.template operator()<T>()` with T the element type named by `dtype`.
template <typename Body>
inline void dispatch_dtype(int dtype, Body&& body) {
  switch (dtype) {
    case kFloat32: body.template operator()<float>(); break;
    case kFloat16: body.template operator()<__half>(); break;
    case kBFloat16: body.template operator()<__nv_bfloat16>(); break;
    default: throw std::invalid_argument("unsupported dtype tag " + std::to_string(dtype));
  }
}

// C++17 form for generic lambdas: calls `body(TypeTag<T>{})`.
template <typename T> struct TypeTag { using type = T; };

template <typename Body>
inline void dispatch_tag(int dtype, Body&& body) {
  switch (dtype) {
    case kFloat32: body(TypeTag<float>{}); break;
    case kFloat16: body(TypeTag<__half>{}); break;
    case kBFloat16: body(TypeTag<__nv_bfloat16>{}); break;
    default: throw std::invalid_argument("unsupported dtype tag " + std::to_string(dtype));
  }
}

// Element i of a scalar array whose dtype is only known at run time (gates, per-head parameters),
// loaded and converted in one branch. (Written as scalar_from_bits(load_scalar_bits(...)) below, the
// same values compile differently: sm_90 ptxas then spills 16-24 bytes in the 64-register Mamba-2
// kernels.)
__device__ __forceinline__ float load_scalar(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// Bytes of one element of a run-time dtype.
__host__ __device__ __forceinline__ int dtype_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Asks for the 128-byte line `i` of the `bytes` bytes at `p` (if the span has one) to be brought
// into L1. A decode step issues these for its token inputs before it waits on the slot index, so
// that the inputs arrive during that wait instead of queueing behind the state loads.
#if defined(GKA_HOST_EMULATION)
inline void prefetch_line(const void*, int64_t, int) {}
#else
__device__ __forceinline__ void prefetch_line(const void* p, int64_t bytes, int i) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~static_cast<uintptr_t>(127);
  const uintptr_t line = first + 128 * static_cast<uintptr_t>(i);
  if (i >= 0 && line < reinterpret_cast<uintptr_t>(p) + bytes)
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(line));
}
#endif

// The same element in two steps, for callers that issue several loads before using any: the raw
// bits (no use of the loaded value inside the per-dtype branch, so the load does not wait), then
// their value.
__device__ __forceinline__ uint32_t load_scalar_bits(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return static_cast<const uint32_t*>(p)[i];
  return static_cast<const uint16_t*>(p)[i];
}
__device__ __forceinline__ float scalar_from_bits(uint32_t bits, int dtype) {
  if (dtype == kFloat16) {
    const uint16_t h16 = static_cast<uint16_t>(bits);
    __half h;
    std::memcpy(&h, &h16, sizeof(h));
    return __half2float(h);
  }
  const uint32_t f32 = dtype == kFloat32 ? bits : bits << 16;  // bfloat16: the high half of a float32
  float f;
  std::memcpy(&f, &f32, sizeof(f));
  return f;
}

// Element i of a slot-index array stored as int32 or int64; a null array means slot i.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  if (p == nullptr) return i;
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

__device__ __forceinline__ float4 fma4(float a, float4 x, float4 y) {  // a * x + y
  return make_float4(fmaf(a, x.x, y.x), fmaf(a, x.y, y.y), fmaf(a, x.z, y.z), fmaf(a, x.w, y.w));
}
__device__ __forceinline__ float4 scale4(float a, float4 x) {
  return make_float4(a * x.x, a * x.y, a * x.z, a * x.w);
}
__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, acc))));
}

__device__ __forceinline__ float warp_allreduce(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums each of the M values of `v` over the W lanes {base + S * j : j < W} of a warp (M, W powers
// of two; the lanes differ in lane bits log2(S) .. log2(S * W) - 1). log2(min(M, W)) halving stages
// exchange half of the remaining values each, so the cost is about M + log2(W) shuffles instead of
// M * log2(W). Afterwards v[0 .. max(M / W, 1)) hold the totals of values
// butterfly_first<M, W, S>(lane) + e; W / M lanes (when W > M) hold the same totals.
template <int M, int W, int S>
__device__ __forceinline__ void butterfly_reduce(float (&v)[M]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = W / 2, h = M / 2; o >= 1; o >>= 1, h >>= 1) {
    if (h >= 1) {
      const bool upper = (lane & (o * S)) != 0;
#pragma unroll
      for (int j = 0; j < h; ++j) {
        const float send = upper ? v[j] : v[j + h];
        const float keep = upper ? v[j + h] : v[j];
        v[j] = keep + __shfl_xor_sync(0xffffffffu, send, o * S);
      }
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], o * S);
    }
  }
}

template <int M, int W, int S>
__device__ __forceinline__ int butterfly_first(int lane) {
  int idx = 0;
#pragma unroll
  for (int o = W / 2, h = M / 2; o >= 1 && h >= 1; o >>= 1, h >>= 1)
    if (lane & (o * S)) idx += h;
  return idx;
}

// 16-byte asynchronous global -> shared copies (sm_80+), completed by cp_async_wait_all(), or
// cp_async_wait_group<N>() (all but the N most recently committed groups).
#if defined(GKA_HOST_EMULATION)
inline void cp_async16(void* smem, const void* gmem) { std::memcpy(smem, gmem, 16); }
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}
template <int N> inline void cp_async_wait_group() {}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

// An attribute of the current device, cached per device; `what` names the caller in errors.
template <cudaDeviceAttr Attr>
inline int device_attribute(const char* what = "cudaDeviceGetAttribute") {
  static int values[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), what);
  if (dev < 64 && values[dev]) return values[dev];
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, Attr, dev), what);
  if (dev < 64) values[dev] = n;
  return n;
}

// Streaming multiprocessors of the current device, for persistent grids.
inline int sm_count(const char* what = "cudaDeviceGetAttribute") {
  return device_attribute<cudaDevAttrMultiProcessorCount>(what);
}

// Position in `choices` of the value of environment variable `name` (choices[0] when it is unset);
// any other value is an invalid_argument (a ValueError in Python) naming the variable.
inline int env_choice(const char* name, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(name);
  const std::string s = v ? v : *choices.begin();
  std::string allowed;
  int i = 0;
  for (const char* c : choices) {
    if (s == c) return i;
    allowed += (i++ ? ", " : "") + std::string(c);
  }
  throw std::invalid_argument(std::string(name) + " must be one of " + allowed + ", got " + s);
}

// Tile width of the GDN and Mamba-2 decode steps: GKA_KERNELS_DECODE_TILES = "auto" (the default),
// "wide" or "narrow", read at every launch. Narrow tiles halve the state each CTA moves (GDN: 16
// instead of 32 value columns; Mamba-2: 16 instead of 32 state rows at N > 64), so that a small
// batch spreads its state over twice the CTAs; "auto" lets the launcher decide (see each kernel).
enum class TileWidth { kAuto, kWide, kNarrow };
inline TileWidth decode_tile_setting() {
  return static_cast<TileWidth>(env_choice("GKA_KERNELS_DECODE_TILES", {"auto", "wide", "narrow"}));
}

// CTAs of `bytes` shared memory that fit on one SM of the current device (at least 1).
inline int ctas_by_smem(size_t bytes) {
  const size_t per_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>();
  const size_t reserved = device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>();
  return std::max(1, static_cast<int>(per_sm / (bytes + reserved)));
}

// Waits about `cycles` SM clock cycles, sleeping between clock reads so that the waiting warps
// leave the issue slots to the other CTAs on the SM (no-op in the host emulation).
#if defined(GKA_HOST_EMULATION)
inline void spin_cycles(long long) {}
#else
__device__ __forceinline__ void spin_cycles(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) __nanosleep(256);
}
#endif

// Thread block clusters (sm_90): a split barrier over every thread of the cluster, arrive with
// release and wait with acquire semantics at cluster scope. Older architectures trap: the launchers
// use clusters only on devices of compute capability 9 or later.
#if defined(GKA_HOST_EMULATION)
inline void cluster_arrive() { emu::cluster_arrive(); }
inline void cluster_wait() { emu::cluster_wait(); }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
__device__ __forceinline__ void cluster_arrive() { __trap(); }
__device__ __forceinline__ void cluster_wait() { __trap(); }
#else
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
#endif

// Dynamic shared memory of a kernel, as an array `name` of T.
#if defined(GKA_HOST_EMULATION)
#define GKA_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem)
#else
#define GKA_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// kernel<<<grid, threads, smem, stream>>>(args...).
template <typename... Params, typename... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, int threads, size_t smem, cudaStream_t stream,
                          const Args&... args) {
#if defined(GKA_HOST_EMULATION)
  (void)stream;
  emu::launch([&] { kernel(args...); }, grid, dim3(threads), smem);
#else
  kernel<<<grid, threads, smem, stream>>>(args...);
#endif
}

// The same launch in clusters of `cluster` CTAs along x (grid.x a multiple of it; sm_90).
template <typename... Params, typename... Args>
inline void launch_cluster_kernel(void (*kernel)(Params...), dim3 grid, int threads, size_t smem,
                                  cudaStream_t stream, unsigned cluster, const Args&... args) {
#if defined(GKA_HOST_EMULATION)
  (void)stream;
  emu::launch([&] { kernel(args...); }, grid, dim3(threads), smem, cluster);
#else
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  check_cuda(cudaLaunchKernelEx(&config, kernel, args...), "cudaLaunchKernelEx");
#endif
}

// Lets `Kernel` use `bytes` of dynamic shared memory on the current device (more than 48 KiB needs
// this opt-in, which is per device): once per device and kernel.
template <auto Kernel>
inline void allow_dynamic_smem(size_t bytes, const char* what) {
  static bool configured[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), what);
  if (dev < 64 && configured[dev]) return;
#if !defined(GKA_HOST_EMULATION)
  check_cuda(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
#else
  (void)bytes;
#endif
  if (dev < 64) configured[dev] = true;
}

}  // namespace gka
