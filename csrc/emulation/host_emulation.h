// Host emulation of the CUDA features the decode kernels use, for CPU tests of their logic
// (tests/test_cuda_decode.py builds csrc with g++ and -DGKA_HOST_EMULATION; never part of the
// extension). Each CUDA thread of a block is a ucontext fiber on one OS thread; __syncthreads,
// warp shuffles and cluster barriers are cooperative barriers; clusters of blocks (one block
// without a cluster launch) run one after another, the blocks of a cluster together; fibers run in
// a shuffled order at every barrier round so that missing barriers show up as wrong results.
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

struct Block;

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  Block* block = nullptr;
  dim3 tid;
  bool done = false;
  long cluster_gen = 0;  // cluster barrier generation at this fiber's last arrive
};

// The blocks of one cluster (a cluster of 1 for plain launches) run together: their fibers share
// one scheduler loop, so cluster barriers work across them.
struct Cluster {
  std::vector<Block*> blocks;
  int arrived = 0;
  long gen = 0;
  int threads = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  Cluster* cluster = nullptr;
  std::vector<char> smem;
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
inline ucontext_t sched;

inline void yield() { swapcontext(&blk->cur->ctx, &sched); }

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

// Split cluster barrier: arrive records the generation, wait returns once every thread of every
// block of the cluster has arrived in it.
inline void cluster_arrive() {
  Cluster& c = *blk->cluster;
  blk->cur->cluster_gen = c.gen;
  if (++c.arrived == c.threads) {
    c.arrived = 0;
    ++c.gen;
  }
}

inline void cluster_wait() {
  const long g = blk->cur->cluster_gen;
  while (blk->cluster->gen == g) yield();
}

inline void trampoline() {
  blk->body();
  blk->cur->done = true;
  swapcontext(&blk->cur->ctx, &sched);
}

// Runs body on every thread of grid x block; consecutive groups of `cluster` blocks along x form a
// cluster (grid.x must be a multiple of it).
template <typename F>
void launch(F&& body, dim3 grid, dim3 block, size_t smem, unsigned cluster = 1) {
  if (block.x % 32 || block.y != 1 || block.z != 1) throw std::runtime_error("emu: 1-d blocks of whole warps only");
  if (cluster < 1 || grid.x % cluster) throw std::runtime_error("emu: grid.x must be a multiple of the cluster size");
  constexpr size_t kStack = 128 * 1024;
  std::vector<char> stacks(kStack * block.x * cluster);
  static std::mt19937 rng(1234);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x0 = 0; x0 < grid.x; x0 += cluster) {
        std::vector<Block> blocks(cluster);
        Cluster c;
        c.threads = block.x * cluster;
        std::vector<Fiber*> order;
        for (unsigned r = 0; r < cluster; ++r) {
          Block& b = blocks[r];
          c.blocks.push_back(&b);
          b.cluster = &c;
          b.smem.assign(smem + 16, 0);
          b.block_idx = dim3(x0 + r, y, z);
          b.block_dim = block;
          b.grid_dim = grid;
          b.warp_arrived.assign(block.x / 32, 0);
          b.warp_gen.assign(block.x / 32, 0);
          b.exchange.assign(block.x, 0.f);
          b.fibers.resize(block.x);
          b.body = body;
          for (unsigned t = 0; t < block.x; ++t) {
            Fiber& f = b.fibers[t];
            f.block = &b;
            f.tid = dim3(t, 0, 0);
            f.stack = stacks.data() + kStack * (r * block.x + t);
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack;
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, trampoline, 0);
            order.push_back(&f);
          }
        }
        for (bool running = true; running;) {
          running = false;
          std::shuffle(order.begin(), order.end(), rng);
          for (Fiber* f : order) {
            if (f->done) continue;
            running = true;
            blk = f->block;
            dyn_smem = blk->smem.data();
            blk->cur = f;
            swapcontext(&sched, &f->ctx);
          }
        }
        blk = nullptr;
        dyn_smem = nullptr;
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
