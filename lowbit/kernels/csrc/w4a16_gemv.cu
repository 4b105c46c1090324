// W4A16 matrix-vector product (M = 1) in CUDA C++, on the weight layout of lowbit/kernels/w4a16.py:
// qweight int32 [K_pad / 8, N], N-contiguous; row r = b * 16 + i holds, in bits [4j, 4j + 4), the
// code of column k = b * 128 + j * 16 + i. scales / zeros fp16 [G, N]; groups span a whole number of
// 64-column halves of a block (group_planes % 4 == 0), in natural order.
//
// Why not Triton: the Triton gemv (gemvh) reaches 33-63% of copy bandwidth on the 7B/8B shapes,
// spending ~4.8 instructions a weight (benchmarks/README.md). Here a thread owns 1, 2 or 4 adjacent
// output columns and streams their rows: one load brings 8 codes of each column, whose 8
// activations (the same for all columns) come from one broadcast 16-byte shared-memory load, and each
// int32 of 8 codes costs 5 integer ops (Marlin's LOP3 trick: code | 0x6400 is the fp16 1024 + code)
// and 8 half2 ops: ~1.3 instructions a weight in the SASS.
//
// Arithmetic, per int32 of 8 codes c0..c7 and one column: the LOP3 trick yields half2 pairs
// (c0, c4), (c1, c5), (c2, c6), (c3, c7) (the hi nibbles 16x, undone by an fma); minus (1024 + z)
// they are the exact integers code - zero. Their dot with the x pairs (x / 16, so no fp16 partial
// overflows below |x| ~ 17000 / kHalfRows) is half2 products summed in fp16 over kHalfRows rows,
// then once in fp32; lane .x holds the block's first 64 columns, lane .y its last 64, so each lane
// meets one group and is scaled in fp32 per block.
// Blocks are split over the warps of a program and over `split` programs along K; the last program
// of a column tile to arrive (a counter per tile in `locks`, re-armed by it) sums the fp32 partials.
// Three kernels share that arithmetic: a warp's blocks of codes held in flight in registers
// (w4a16_gemv_kernel), or streamed through shared-memory stages by cp.async with the warps along K
// or along N (both w4a16_gemv_async_kernel, the latter with kWide); the tuner times all three.
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "w4a16_groups.cuh"

namespace {

using w4a16_groups::Groups;

constexpr int kRows = 16;  // rows of one block of codes (128 columns of K)
// Rows whose products a lane sums in fp16 before one conversion to fp32: the conversion and the two
// fp32 adds cost 4 instructions a word, a quarter of the word's 16, when paid every row (Nsight
// Compute on the H200: the gate_up gemv issued 2.85 instructions a weight at 38% of issue slots,
// stalled on memory, with 10 warps an SM). 4 rows: 16 products in one fp16 sum, checked against the
// fp32 reference by the tests (activations of +-3000 among them) and by bench_gemv.py's error column.
constexpr int kHalfRows = 4;

__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));  // (a & mask) | bits
  return r;
}

__device__ __forceinline__ half2 as_half2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// kCols consecutive int32 (read once: not kept in L1)
template <int kCols>
__device__ __forceinline__ void load_words(uint32_t (&dst)[kCols], const uint32_t* p) {
  if constexpr (kCols == 4) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3]) : "l"(p));
  } else if constexpr (kCols == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(dst[0]), "=r"(dst[1]) : "l"(p));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(dst[0]) : "l"(p));
  }
}

// kCols consecutive fp16 values
template <int kCols>
__device__ __forceinline__ void load_halves(half (&dst)[kCols], const half* p) {
  if constexpr (kCols == 4) {
    *reinterpret_cast<uint2*>(dst) = __ldg(reinterpret_cast<const uint2*>(p));
  } else if constexpr (kCols == 2) {
    *reinterpret_cast<uint32_t*>(dst) = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    dst[0] = __ldg(p);
  }
}

// acc + the sum over one int32's 8 codes of (code - zero) * x/16, lane .x: codes 0-3, lane .y: codes 4-7
__device__ __forceinline__ half2 word_dot(uint32_t q, const uint4& xv, half2 z1024, half2 z64_neg, half2 acc) {
  const uint32_t kLo = 0x000f000f, kHi = 0x00f000f0, kMagic = 0x64006400;  // 0x6400 = fp16 1024
  const half2 inv16 = __float2half2_rn(0.0625f);
  const uint32_t q8 = q >> 8;
  const half2 d0 = __hsub2(as_half2(and_or(q, kLo, kMagic)), z1024);
  const half2 d1 = __hfma2(as_half2(and_or(q, kHi, kMagic)), inv16, z64_neg);
  const half2 d2 = __hsub2(as_half2(and_or(q8, kLo, kMagic)), z1024);
  const half2 d3 = __hfma2(as_half2(and_or(q8, kHi, kMagic)), inv16, z64_neg);
  half2 p = __hfma2(d0, as_half2(xv.x), acc);
  p = __hfma2(d1, as_half2(xv.y), p);
  p = __hfma2(d2, as_half2(xv.z), p);
  return __hfma2(d3, as_half2(xv.w), p);
}

// one block of a thread's columns: 16 rows of codes and the scales / zeros of the block's two halves
template <int kCols>
struct Block {
  uint32_t w[kRows][kCols];
  half s_a[kCols], s_b[kCols], z_a[kCols], z_b[kCols];
  __device__ __forceinline__ void words(int i, uint32_t (&dst)[kCols]) const {
#pragma unroll
    for (int c = 0; c < kCols; ++c) dst[c] = w[i][c];
  }
  __device__ __forceinline__ half scale_a(int c) const { return s_a[c]; }
  __device__ __forceinline__ half scale_b(int c) const { return s_b[c]; }
  __device__ __forceinline__ half zero_a(int c) const { return z_a[c]; }
  __device__ __forceinline__ half zero_b(int c) const { return z_b[c]; }
};

template <int kCols>
__device__ __forceinline__ void load_block(Block<kCols>& blk, const uint32_t* qweight, const half* scales,
                                           const half* zeros, int b, int n, int n0, const Groups& groups) {
  const uint32_t* src = qweight + static_cast<size_t>(b) * kRows * n + n0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) load_words<kCols>(blk.w[i], src + static_cast<size_t>(i) * n);
  const size_t g_a = groups.of(2 * b), g_b = groups.of(2 * b + 1);  // the halves' groups
  load_halves<kCols>(blk.s_a, scales + g_a * n + n0);
  load_halves<kCols>(blk.s_b, scales + g_b * n + n0);
  load_halves<kCols>(blk.z_a, zeros + g_a * n + n0);
  load_halves<kCols>(blk.z_b, zeros + g_b * n + n0);
}

// The one arithmetic of both kernels over one block of a lane's columns, whose codes and scales come
// from `blk` (registers in the register-ring kernel, a shared-memory stage in the cp.async one):
// blk.word(i, c), blk.scale_a(c) / scale_b(c) / zero_a(c) / zero_b(c) for the block's two halves.
template <int kCols, class B>
__device__ __forceinline__ void dot_block(const B& blk, const uint4* x_block, float (&acc)[kCols]) {
  half2 z1024[kCols], z64_neg[kCols];
  float2 part[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const half2 z = __halves2half2(blk.zero_a(c), blk.zero_b(c));
    z1024[c] = __hadd2(z, __float2half2_rn(1024.f));
    z64_neg[c] = __hneg2(__hadd2(z, __float2half2_rn(64.f)));
    part[c] = make_float2(0.f, 0.f);
  }
#pragma unroll
  for (int i0 = 0; i0 < kRows; i0 += kHalfRows) {
    half2 h[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) h[c] = __float2half2_rn(0.f);
#pragma unroll
    for (int i = i0; i < i0 + kHalfRows; ++i) {
      const uint4 xv = x_block[i];  // the same address in every lane: one broadcast
      uint32_t w[kCols];
      blk.words(i, w);
#pragma unroll
      for (int c = 0; c < kCols; ++c) h[c] = word_dot(w[c], xv, z1024[c], z64_neg[c], h[c]);
    }
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const float2 p = __half22float2(h[c]);
      part[c].x += p.x;
      part[c].y += p.y;
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    acc[c] += part[c].x * __half2float(blk.scale_a(c)) + part[c].y * __half2float(blk.scale_b(c));
}

// x of blocks [b_start, b_end) into shared memory, x / 16, each row's 8 values in the order of the
// LOP3 pairs (read after the PDL wait: on the critical path)
template <int kWarps>
__device__ __forceinline__ void stage_x(const half* __restrict__ x, uint4* x_rows, int kx, int b_start, int b_end) {
  half* xh = reinterpret_cast<half*>(x_rows);
  const half inv16 = __float2half(0.0625f);
  const int cols = (b_end - b_start) * 128;
  const half* xs = x + static_cast<size_t>(b_start) * 128;
  const int x_here = min(cols, kx - b_start * 128);  // columns past kx are padding: zero
  if ((kx & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {
    // kBatch loads of 8 columns a thread in flight before their stores: one load, one store at a
    // time paid an L2 round trip per 8 columns (4 in a row for a 4-warp program of K = 4096, 11
    // for K = 11008)
    constexpr int kStride = kWarps * 32 * 8, kBatch = 4;
    for (int c0 = threadIdx.x * 8; c0 < cols; c0 += kBatch * kStride) {
      uint4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int c = c0 + u * kStride;
        v[u] = c < x_here ? __ldg(reinterpret_cast<const uint4*>(xs + c)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {  // 8 columns: one row each, one slot
        const int c = c0 + u * kStride;
        if (c >= cols) break;
        const half* vh = reinterpret_cast<const half*>(&v[u]);
        const int j = (c >> 4) & 7, i0 = c & 15;
        const int slot = ((j & 3) << 1) | (j >> 2);  // pairs (c0, c4), (c1, c5), (c2, c6), (c3, c7)
#pragma unroll
        for (int t = 0; t < 8; ++t) xh[(((c >> 7) * kRows + i0 + t) << 3) + slot] = __hmul(vh[t], inv16);
      }
    }
  } else {
    for (int c = threadIdx.x; c < cols; c += kWarps * 32) {
      const int j = (c >> 4) & 7, i = c & 15;
      const int slot = ((j & 3) << 1) | (j >> 2);
      xh[(((c >> 7) * kRows + i) << 3) + slot] = c < x_here ? __hmul(xs[c], inv16) : __float2half(0.f);
    }
  }
}

// One warp's column totals out: written, or under split-K left as this program's fp32 partial, where
// the last program of the column tile to arrive (a counter per tile in `locks`, re-armed by it)
// sums the partials and writes the output.
template <int kCols>
__device__ __forceinline__ void store_columns(float (&total)[kCols], half* __restrict__ out, float* __restrict__ partials,
                                              int* __restrict__ locks, int n, int n0, bool live, int tile, int s,
                                              int split) {
  const int lane = threadIdx.x & 31;
  if (split > 1) {
    float* mine = partials + static_cast<size_t>(s) * n + n0;
    if (live) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) mine[c] = total[c];
    }
    __threadfence();  // this program's partial is visible before its arrival is counted
    __syncwarp();
    int arrived = 0;
    if (lane == 0) arrived = atomicAdd(locks + tile, 1);
    arrived = __shfl_sync(0xffffffffu, arrived, 0);
    if (arrived != split - 1) return;
    __threadfence();
    if (live) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) total[c] = 0.f;
      for (int t = 0; t < split; ++t) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) total[c] += __ldcg(partials + static_cast<size_t>(t) * n + n0 + c);
      }
    }
    if (lane == 0) locks[tile] = 0;  // re-armed for the next call
  }
  if (live) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) out[n0 + c] = __float2half_rn(total[c]);
  }
}

// The warps' sums of a program's columns added (x 16, undoing the x / 16) by warp 0, then stored.
template <int kWarps, int kCols>
__device__ __forceinline__ void finish(const float (&acc)[kCols], float (*warp_sums)[32 * kCols], half* __restrict__ out,
                                       float* __restrict__ partials, int* __restrict__ locks, int n, int n0,
                                       bool live, int tile, int s, int split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < kCols; ++c) warp_sums[warp][lane * kCols + c] = acc[c];
  __syncthreads();
  if (warp != 0) return;

  float total[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    float t = 0.f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) t += warp_sums[v][lane * kCols + c];
    total[c] = 16.f * t;  // undo the x / 16
  }
  store_columns<kCols>(total, out, partials, locks, n, n0, live, tile, s, split);
}

// A program owns 32 * kCols output columns (kCols adjacent ones per lane) and the blocks
// [b_start, b_end) of K; its warps take every kWarps-th block and keep kDepth blocks of codes in
// flight (a ring of registers, refilled as each block is consumed): a warp's few blocks then cost one
// memory latency, not one each. The first kDepth blocks are requested before the program waits for
// the kernel before it (programmatic dependent launch), as they are nothing that kernel writes; the
// next kernel may launch once the weights are read.
template <int kWarps, int kCols, int kDepth>
__global__ void __launch_bounds__(kWarps * 32)
w4a16_gemv_kernel(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                  const half* __restrict__ scales, const half* __restrict__ zeros,
                  half* __restrict__ out, float* __restrict__ partials, int* __restrict__ locks,
                  int n, int kx, int n_blocks, int blocks_per_split, int split, Groups groups) {
  constexpr int kTileCols = 32 * kCols;
  // x of this program's blocks, x / 16, each row's 8 values in the order of the LOP3 pairs
  extern __shared__ uint4 x_rows[];
  __shared__ float warp_sums[kWarps][kTileCols];
  const int tile = blockIdx.x, s = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = tile * kTileCols + lane * kCols;
  const bool live = n0 < n;
  const int b_start = s * blocks_per_split;
  const int b_end = min(b_start + blocks_per_split, n_blocks);
  const int b_first = b_start + warp;

  Block<kCols> ring[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) {
    const int b = b_first + d * kWarps;
    if (live && b < b_end) load_block(ring[d], qweight, scales, zeros, b, n, n0, groups);
  }

  // programmatic dependent launch (a no-op without it): wait for the kernel before, which wrote x
  asm volatile("griddepcontrol.wait;" ::: "memory");
  stage_x<kWarps>(x, x_rows, kx, b_start, b_end);
  __syncthreads();

  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  if (live) {
    for (int base = b_first; base < b_end; base += kDepth * kWarps) {
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const int b = base + d * kWarps;
        if (b < b_end) {
          dot_block<kCols>(ring[d], x_rows + (b - b_start) * kRows, acc);
          if (b + kDepth * kWarps < b_end)
            load_block(ring[d], qweight, scales, zeros, b + kDepth * kWarps, n, n0, groups);
        }
      }
    }
  }
  // the weights are read: let the next kernel launch (and prefetch) while the sums are reduced
  asm volatile("griddepcontrol.launch_dependents;");
  finish<kWarps, kCols>(acc, warp_sums, out, partials, locks, n, n0, live, tile, s, split);
}

// ---- the cp.async kernel ------------------------------------------------------------------------
// Nsight Compute on the register-ring kernel (H200, gate_up): 49% of DRAM peak with 10 warps an SM,
// each holding its blocks of codes in flight in registers (128 a thread), stalled on memory most of
// the time: too few bytes in flight. Here each warp streams its blocks through a ring of kStages
// shared-memory stages with cp.async (codes, scales and zeros; no registers held while in flight),
// so the bytes in flight an SM are bounded by shared memory (~228 KB) instead of registers. A lane
// copies and later reads only its own columns' words, so its cp.async.wait_group alone makes them
// visible to it: no barrier in the loop. kCols >= 2 (cp.async moves 4, 8 or 16 bytes).
// Measured (H200, bench_gemv.py): 2 stages do as well as 4, 6 or 8, and the kernel beats the
// register ring only on Llama-3-8B's gate_up (19.2 against 20.4 us, 77% of copy): more bytes in
// flight were not what the register ring lacked.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <int kBytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
  } else {
    // ("memory": the stage's earlier shared-memory reads stay before its refill)
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(smem_addr(dst)), "l"(src), "n"(kBytes) : "memory");
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory"); }

// One warp's stage: 16 rows of the warp's 32 * kCols columns of codes, then the scales and zeros of
// the block's two halves (a lane's kCols values adjacent).
template <int kCols>
struct Stage {
  uint32_t w[kRows][32 * kCols];
  half sz[4][32 * kCols];  // s_a, s_b, z_a, z_b
};

// A lane's view of one stage (its own columns)
template <int kCols>
struct StageView {
  const Stage<kCols>* st;
  int col;  // lane * kCols
  __device__ __forceinline__ void words(int i, uint32_t (&dst)[kCols]) const {
    const uint32_t* p = &st->w[i][col];
    if constexpr (kCols == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(p);
      dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      dst[0] = v.x, dst[1] = v.y;
    }
  }
  __device__ __forceinline__ half scale_a(int c) const { return st->sz[0][col + c]; }
  __device__ __forceinline__ half scale_b(int c) const { return st->sz[1][col + c]; }
  __device__ __forceinline__ half zero_a(int c) const { return st->sz[2][col + c]; }
  __device__ __forceinline__ half zero_b(int c) const { return st->sz[3][col + c]; }
};

template <int kCols>
__device__ __forceinline__ void copy_block(Stage<kCols>* st, const uint32_t* qweight, const half* scales,
                                           const half* zeros, int b, int n, int n0, const Groups& groups, int col) {
  const uint32_t* src = qweight + static_cast<size_t>(b) * kRows * n + n0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) cp_async<4 * kCols>(&st->w[i][col], src + static_cast<size_t>(i) * n);
  const size_t g_a = groups.of(2 * b), g_b = groups.of(2 * b + 1);
  cp_async<2 * kCols>(&st->sz[0][col], scales + g_a * n + n0);
  cp_async<2 * kCols>(&st->sz[1][col], scales + g_b * n + n0);
  cp_async<2 * kCols>(&st->sz[2][col], zeros + g_a * n + n0);
  cp_async<2 * kCols>(&st->sz[3][col], zeros + g_b * n + n0);
}

// kWide puts the warps side by side along N instead of along K: a program's warps read adjacent
// 32 * kCols-column pieces of the same rows, so each row of codes is read as kWarps * 128 * kCols
// contiguous bytes at once (along K a program reads 128 * kCols, 512 at most, from rows N * 4 bytes
// apart), and each warp walks all of the program's blocks of K through its own stages. A wide warp
// owns its columns whole: its sums need no reduction across warps, and under split-K each warp's
// column tile has its own counter.
// Measured (H200, bench_gemv.py): wide beats the register ring only on Llama-2-7B's gate_up (16.8
// against 17.3 us): reading rows in longer contiguous runs was not what the register ring lacked either.
template <int kWarps, int kCols, int kStages, bool kWide>
__global__ void __launch_bounds__(kWarps * 32)
w4a16_gemv_async_kernel(const half* __restrict__ x, const uint32_t* __restrict__ qweight,
                        const half* __restrict__ scales, const half* __restrict__ zeros,
                        half* __restrict__ out, float* __restrict__ partials, int* __restrict__ locks,
                        int n, int kx, int n_blocks, int blocks_per_split, int split, Groups groups) {
  static_assert(kCols == 2 || kCols == 4, "cp.async moves a lane's 4 or 8 codes' words in one copy");
  // dynamic shared memory: the warps' rings of stages, then the staged x of this program's blocks
  extern __shared__ uint4 smem[];
  const int s = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = kWide ? blockIdx.x * kWarps + warp : blockIdx.x;  // whose counter; its 32 * kCols columns
  const int n0 = tile * 32 * kCols + lane * kCols;
  const bool live = n0 < n;
  const int b_start = s * blocks_per_split;
  const int b_end = min(b_start + blocks_per_split, n_blocks);
  // this warp's blocks: every one of the program's (wide), or every kWarps-th from its own
  constexpr int kStride = kWide ? 1 : kWarps;
  const int b_first = kWide ? b_start : b_start + warp;
  const int mine = b_first < b_end ? (b_end - b_first + kStride - 1) / kStride : 0;
  Stage<kCols>* ring = reinterpret_cast<Stage<kCols>*>(smem) + warp * kStages;
  uint4* x_rows = smem + (kWarps * kStages * sizeof(Stage<kCols>)) / sizeof(uint4);

  // the first kStages blocks are requested before the wait (nothing the kernel before writes)
#pragma unroll
  for (int d = 0; d < kStages; ++d) {
    if (live && d < mine) copy_block(ring + d, qweight, scales, zeros, b_first + d * kStride, n, n0, groups, lane * kCols);
    cp_async_commit();  // one group a stage in every lane, empty or not: the wait counts groups
  }

  asm volatile("griddepcontrol.wait;" ::: "memory");
  stage_x<kWarps>(x, x_rows, kx, b_start, b_end);
  __syncthreads();

  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;
  if (live) {
    for (int j = 0; j < mine; ++j) {
      const int d = j % kStages, b = b_first + j * kStride;
      cp_async_wait<kStages - 1>();  // block j's group is done (kStages + j committed so far)
      dot_block<kCols>(StageView<kCols>{ring + d, lane * kCols}, x_rows + (b - b_start) * kRows, acc);
      // the stage's words were read into the sums above: refill it with block j + kStages
      if (j + kStages < mine) copy_block(ring + d, qweight, scales, zeros, b + kStages * kStride, n, n0, groups, lane * kCols);
      cp_async_commit();
    }
  }
  asm volatile("griddepcontrol.launch_dependents;");
  if constexpr (kWide) {
    if (tile * 32 * kCols >= n) return;  // a warp past N (the last program's): no columns, no counter
    float total[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) total[c] = 16.f * acc[c];  // undo the x / 16
    store_columns<kCols>(total, out, partials, locks, n, n0, live, tile, s, split);
  } else {
    __shared__ float warp_sums[kWarps][32 * kCols];
    finish<kWarps, kCols>(acc, warp_sums, out, partials, locks, n, n0, live, tile, s, split);
  }
}

// Dynamic shared memory of an async program: its warps' stages and its staged x
template <int kWarps, int kCols, int kStages>
constexpr size_t async_smem(int blocks_per_split) {
  return static_cast<size_t>(kWarps) * kStages * sizeof(Stage<kCols>) + static_cast<size_t>(blocks_per_split) * kRows * sizeof(uint4);
}

// Opts an async kernel into more than 48 KB of dynamic shared memory (once per kernel and process)
template <int kWarps, int kCols, int kStages, bool kWide>
void allow_large_smem() {
  static bool done = false;
  if (done) return;
  const auto kernel = w4a16_gemv_async_kernel<kWarps, kCols, kStages, kWide>;
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaFuncAttributes attrs;
  cudaFuncGetAttributes(&attrs, kernel);
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               optin - static_cast<int>(attrs.sharedSizeBytes));
  TORCH_CHECK(err == cudaSuccess, "w4a16_gemv: shared memory opt-in failed: ", cudaGetErrorString(err));
  done = true;
}

// One launch of one of the kernels: kStages == 0 is the register-ring kernel with kDepth blocks in
// flight a warp, kStages >= 2 the cp.async kernel with that many shared-memory stages a warp (kWide:
// its warps along N).
template <int kWarps, int kCols, int kDepth, int kStages, bool kWide>
void launch(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
            const torch::Tensor& zeros, torch::Tensor& out, torch::Tensor& partials, torch::Tensor& locks,
            int kx, int group_planes, int split, bool pdl) {
  const int n = static_cast<int>(qweight.size(1));
  const int n_blocks = static_cast<int>(qweight.size(0)) / kRows;
  const int bps = (n_blocks + split - 1) / split;
  split = (n_blocks + bps - 1) / bps;
  const int tiles = (n + 32 * kCols - 1) / (32 * kCols);  // counters: one per program, or per warp if wide
  TORCH_CHECK(split == 1 || (partials.scalar_type() == at::kFloat && partials.numel() >= split * n &&
                             locks.numel() >= tiles),
              "w4a16_gemv: split ", split, " needs fp32 partials [split, N] and ", tiles, " int32 locks");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kWide ? (tiles + kWarps - 1) / kWarps : tiles, split);
  cfg.blockDim = dim3(kWarps * 32);
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const half* xp = reinterpret_cast<const half*>(x.data_ptr());
  const uint32_t* qp = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
  const half* sp = reinterpret_cast<const half*>(scales.data_ptr());
  const half* zp = reinterpret_cast<const half*>(zeros.data_ptr());
  half* op = reinterpret_cast<half*>(out.data_ptr());
  float* pp = split > 1 ? partials.data_ptr<float>() : nullptr;
  const Groups groups = w4a16_groups::make_groups(group_planes, static_cast<int>(scales.size(0)));
  cudaError_t err;
  if constexpr (kStages == 0) {
    cfg.dynamicSmemBytes = static_cast<size_t>(bps) * kRows * sizeof(uint4);
    err = cudaLaunchKernelEx(&cfg, w4a16_gemv_kernel<kWarps, kCols, kDepth>, xp, qp, sp, zp, op, pp,
                             locks.data_ptr<int>(), n, kx, n_blocks, bps, split, groups);
  } else {
    allow_large_smem<kWarps, kCols, kStages, kWide>();
    cfg.dynamicSmemBytes = async_smem<kWarps, kCols, kStages>(bps);
    err = cudaLaunchKernelEx(&cfg, w4a16_gemv_async_kernel<kWarps, kCols, kStages, kWide>,
                             xp, qp, sp, zp, op, pp, locks.data_ptr<int>(), n, kx, n_blocks, bps, split, groups);
  }
  TORCH_CHECK(err == cudaSuccess, "w4a16_gemv: launch failed: ", cudaGetErrorString(err));
}

// The built (warps, columns a lane, blocks in flight, stages) kernels, each handed to `f` as a Shape.
// Register ring (stages 0): more columns or blocks would spill registers, 16 warps of 4 columns
// exceed them. cp.async (stages >= 2): 2 or 4 columns a lane.
template <int W, int C, int D, int S, bool Wide = false>
struct Shape {
  static constexpr int kWarps = W, kCols = C, kDepth = D, kStages = S;
  static constexpr bool kWide = Wide;
};

template <class F>
void with_shape(int64_t warps, int64_t cols, int64_t depth, int64_t stages, bool wide, F&& f) {
  const auto is = [&](int w, int c, int d, int s) { return warps == w && cols == c && depth == d && stages == s; };
  // the cp.async shapes that were fastest somewhere on the H200's 7B / 8B shapes (2 to 8 stages, 4 or
  // 8 warps, 2 or 4 columns were timed: benchmarks/results/bench_gemv_async_wide_h200.json); more
  // stages never helped
  if (wide) {  // cp.async, warps along N
    if (is(8, 4, 1, 2)) return f(Shape<8, 4, 1, 2, true>{});
    TORCH_CHECK(false, "w4a16_gemv: the wide kernel of ", warps, " warps of ", cols, " columns a lane, ", stages,
                " stages is not built");
  }
  // register ring
  if (is(4, 1, 4, 0)) return f(Shape<4, 1, 4, 0>{});
  if (is(4, 1, 2, 0)) return f(Shape<4, 1, 2, 0>{});
  if (is(4, 2, 2, 0)) return f(Shape<4, 2, 2, 0>{});
  if (is(4, 4, 2, 0)) return f(Shape<4, 4, 2, 0>{});
  if (is(8, 1, 4, 0)) return f(Shape<8, 1, 4, 0>{});
  if (is(8, 1, 2, 0)) return f(Shape<8, 1, 2, 0>{});
  if (is(8, 2, 2, 0)) return f(Shape<8, 2, 2, 0>{});
  if (is(8, 4, 2, 0)) return f(Shape<8, 4, 2, 0>{});
  if (is(16, 1, 4, 0)) return f(Shape<16, 1, 4, 0>{});
  if (is(16, 1, 2, 0)) return f(Shape<16, 1, 2, 0>{});
  if (is(16, 2, 2, 0)) return f(Shape<16, 2, 2, 0>{});
  // cp.async (depth unused: 1)
  if (is(8, 2, 1, 2)) return f(Shape<8, 2, 1, 2>{});
  if (is(4, 4, 1, 2)) return f(Shape<4, 4, 1, 2>{});
  TORCH_CHECK(false, "w4a16_gemv: ", warps, " warps of ", cols, " columns a lane, ", depth, " blocks in flight, ",
              stages, " shared-memory stages is not built");
}

}  // namespace

// out[N] = x[kx] @ dequant(W).T, 32 * cols output columns per program of `warps` warps, each warp
// with `depth` blocks of codes in flight in registers (stages 0) or streamed through `stages`
// shared-memory stages by cp.async, K split over `split` programs (fp32 partials [split, N] and
// int32 zero locks, one per program column; unused when split == 1)
void w4a16_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                torch::Tensor out, torch::Tensor partials, torch::Tensor locks, int64_t kx,
                int64_t group_planes, int64_t split, int64_t warps, int64_t cols, int64_t depth, int64_t stages,
                bool wide, bool pdl) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.is_contiguous(), "w4a16_gemv: x must be contiguous fp16 on the GPU");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.size(0) % kRows == 0,
              "w4a16_gemv: qweight must be contiguous int32 [K_pad / 8, N] with K_pad a multiple of 128");
  const int64_t n = qweight.size(1);
  TORCH_CHECK(n % cols == 0 && n % 4 == 0, "w4a16_gemv: N = ", n, " must be a multiple of 4");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kHalf && scales.is_contiguous() &&
              zeros.is_contiguous() && scales.size(1) == n && zeros.sizes() == scales.sizes(),
              "w4a16_gemv: scales and zeros must be contiguous fp16 [G, N]");
  TORCH_CHECK(group_planes % 4 == 0 && group_planes > 0, "w4a16_gemv: groups must span whole 64-column halves");
  TORCH_CHECK(out.scalar_type() == at::kHalf && out.is_contiguous() && out.numel() == n, "w4a16_gemv: out must be fp16 [N]");
  TORCH_CHECK(x.numel() >= kx && kx <= qweight.size(0) * 8, "w4a16_gemv: x is shorter than kx");
  TORCH_CHECK(split >= 1, "w4a16_gemv: split must be >= 1");
  const int k = static_cast<int>(kx), gp = static_cast<int>(group_planes), sp = static_cast<int>(split);
  with_shape(warps, cols, depth, stages, wide, [&](auto shape) {
    using S = decltype(shape);
    launch<S::kWarps, S::kCols, S::kDepth, S::kStages, S::kWide>(x, qweight, scales, zeros, out, partials, locks, k, gp, sp, pdl);
  });
}

// Programs of this shape one multiprocessor holds at once, for a K of `blocks_per_split` blocks
// a program (its staged x, and its stages, are dynamic shared memory): the tuner's measure of one wave.
int64_t w4a16_gemv_resident(int64_t warps, int64_t cols, int64_t depth, int64_t stages, bool wide,
                            int64_t blocks_per_split) {
  int resident = 0;
  with_shape(warps, cols, depth, stages, wide, [&](auto shape) {
    using S = decltype(shape);
    cudaError_t err;
    if constexpr (S::kStages == 0) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &resident, w4a16_gemv_kernel<S::kWarps, S::kCols, S::kDepth>, S::kWarps * 32,
          static_cast<size_t>(blocks_per_split) * kRows * sizeof(uint4));
    } else {
      allow_large_smem<S::kWarps, S::kCols, S::kStages, S::kWide>();
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &resident, w4a16_gemv_async_kernel<S::kWarps, S::kCols, S::kStages, S::kWide>, S::kWarps * 32,
          async_smem<S::kWarps, S::kCols, S::kStages>(static_cast<int>(blocks_per_split)));
    }
    TORCH_CHECK(err == cudaSuccess, "w4a16_gemv_resident: ", cudaGetErrorString(err));
  });
  return resident;
}
