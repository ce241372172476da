// State-pool slot copy: dst_pool[dst_idx[i]] = src_pool[src_idx[i]] for i in [0, n), skipping any
// pair with an index of -1. Used for beam reordering and for keeping the pre-step state in
// speculative decoding. Pools are float32 [slots, slot_elems]; one block row per slot pair,
// each thread copies float4 when the slot size allows it. All offsets are 64-bit.
#include "common.cuh"

namespace gka {

__global__ void state_copy_kernel(const float* __restrict__ src, float* __restrict__ dst,
                                  const int64_t* __restrict__ src_idx,
                                  const int64_t* __restrict__ dst_idx, int64_t slot_elems) {
  const int64_t i = blockIdx.y;
  const int64_t s = src_idx[i];
  const int64_t d = dst_idx[i];
  if (s < 0 || d < 0) return;
  const float* from = src + s * slot_elems;
  float* to = dst + d * slot_elems;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if ((slot_elems & 3) == 0) {
    const float4* from4 = reinterpret_cast<const float4*>(from);
    float4* to4 = reinterpret_cast<float4*>(to);
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < slot_elems / 4; e += stride)
      to4[e] = from4[e];
  } else {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < slot_elems; e += stride)
      to[e] = from[e];
  }
}

void state_copy_launch(uintptr_t src, uintptr_t dst, uintptr_t src_idx, uintptr_t dst_idx,
                       int64_t n, int64_t slot_elems, uintptr_t stream) {
  if (n == 0 || slot_elems == 0) return;
  const int threads = 256;
  const int64_t vec = (slot_elems & 3) == 0 ? slot_elems / 4 : slot_elems;
  int64_t blocks_x = (vec + threads - 1) / threads;
  if (blocks_x > 1024) blocks_x = 1024;
  dim3 grid((unsigned)blocks_x, (unsigned)n);
  launch_kernel(state_copy_kernel, grid, threads, 0, as_stream(stream), reinterpret_cast<const float*>(src),
                reinterpret_cast<float*>(dst), reinterpret_cast<const int64_t*>(src_idx),
                reinterpret_cast<const int64_t*>(dst_idx), slot_elems);
  check_launch("state_copy");
}

}  // namespace gka
