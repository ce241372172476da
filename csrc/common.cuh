// Shared helpers for the gka_kernels._C decode kernels: error checks, dtype tags, loads.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gka {

// Element type tags shared with Python (gka_kernels/cuda/_dtypes.py keeps the same numbers).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorString(err));
  }
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

}  // namespace gka
