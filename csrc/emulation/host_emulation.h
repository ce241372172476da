// Host emulation of the CUDA features the decode kernels use, for CPU tests of their logic
// (tests/test_cuda_decode.py builds csrc with g++ and -DGKA_HOST_EMULATION; never part of the
// extension). Each CUDA thread of a block is a ucontext fiber on one OS thread; __syncthreads and
// warp shuffles are cooperative barriers; blocks run one after another; fibers run in a shuffled
// order at every barrier round so that missing barriers show up as wrong results.
#pragma once
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <vector>

namespace emu {

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 tid;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* cur = nullptr;
  int bar_arrived = 0;
  long bar_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<long> warp_gen;
  std::vector<float> exchange;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
};

inline Block* blk = nullptr;
inline char* dyn_smem = nullptr;

inline void yield() { swapcontext(&blk->cur->ctx, &blk->sched); }

inline void barrier(int& arrived, long& gen, int count) {
  const long g = gen;
  if (++arrived == count) {
    arrived = 0;
    ++gen;
    return;
  }
  while (gen == g) yield();
}

inline void syncthreads() { barrier(blk->bar_arrived, blk->bar_gen, (int)blk->fibers.size()); }

inline float shfl_xor(unsigned, float v, int mask) {
  const int t = blk->cur->tid.x, w = t / 32;
  blk->exchange[t] = v;
  barrier(blk->warp_arrived[w], blk->warp_gen[w], 32);
  const float r = blk->exchange[(t & ~31) | ((t & 31) ^ mask)];
  barrier(blk->warp_arrived[w], blk->warp_gen[w], 32);
  return r;
}

inline void trampoline() {
  blk->body();
  blk->cur->done = true;
  swapcontext(&blk->cur->ctx, &blk->sched);
}

template <typename F>
void launch(F&& body, dim3 grid, dim3 block, size_t smem) {
  if (block.x % 32 || block.y != 1 || block.z != 1) throw std::runtime_error("emu: 1-d blocks of whole warps only");
  constexpr size_t kStack = 128 * 1024;
  std::vector<char> smem_buf(smem + 16), stacks(kStack * block.x);
  dyn_smem = smem_buf.data();
  static std::mt19937 rng(1234);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.block_idx = dim3(x, y, z);
        b.block_dim = block;
        b.grid_dim = grid;
        b.warp_arrived.assign(block.x / 32, 0);
        b.warp_gen.assign(block.x / 32, 0);
        b.exchange.assign(block.x, 0.f);
        b.fibers.resize(block.x);
        b.body = body;
        blk = &b;
        std::vector<Fiber*> order;
        for (unsigned t = 0; t < block.x; ++t) {
          Fiber& f = b.fibers[t];
          f.tid = dim3(t, 0, 0);
          f.stack = stacks.data() + kStack * t;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, trampoline, 0);
          order.push_back(&f);
        }
        for (bool running = true; running;) {
          running = false;
          std::shuffle(order.begin(), order.end(), rng);
          for (Fiber* f : order) {
            if (f->done) continue;
            running = true;
            b.cur = f;
            swapcontext(&b.sched, &f->ctx);
          }
        }
        blk = nullptr;
      }
}

}  // namespace emu

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (emu::blk->cur->tid)
#define blockIdx (emu::blk->block_idx)
#define blockDim (emu::blk->block_dim)
#define gridDim (emu::blk->grid_dim)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync emu::shfl_xor
#define __expf expf
#define rsqrtf(x) (1.0f / sqrtf(x))
