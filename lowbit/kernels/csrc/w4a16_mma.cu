// W4A16 matrix product at decode batches (M = 2..64) on tensor cores, in CUDA C++, on the weight
// layout of lowbit/kernels/w4a16.py (the one csrc/w4a16_gemv.cu reads: no second copy of the weights):
// qweight int32 [K_pad / 8, N], N-contiguous; row r = b * 16 + i holds, in bits [4j, 4j + 4), the code
// of column k = b * 128 + j * 16 + i; scales / zeros fp16 [G, N], groups of whole 64-column halves.
//
// Why not Triton: the Triton tensor-core kernels (mmh, mmt) ran at 1.4-2.1x cuBLAS fp16 at M = 16 and
// 0.84-1.09x at M = 64 on the H100 (benchmarks/README.md): every weight tile goes through shared
// memory before the MMA. Here it does not. The layout already is the MMA's B fragment: for
// mma.m16n8k16 a thread holds B[k][n] at k = 2t, 2t + 1, 2t + 8, 2t + 9 (t = lane % 4) of one column n
// (= lane / 4), and plane j of block b (its 16 columns of K) sits in nibble j of the rows
// b * 16 + k. So a thread loads rows 2t, 2t + 1, 2t + 8, 2t + 9 of a block, 16 bytes each (4 adjacent
// output columns, one per MMA n-tile: n-tile u's column n is output column 4n + u of the warp's 32),
// and these four int32 a column are its B fragments for all 8 planes. PRMT pairs two rows' words,
// Marlin's LOP3 trick (code | 0x6400 is the fp16 1024 + code) makes each half2 of codes, and one HSUB2
// (minus 1024 + zero) the exact fp16 code - zero: ~1.25 instructions a weight, paid once however many
// rows M has; the group's scale multiplies the fp32 sums after the MMAs. x (the A operand) is staged
// in shared memory, in chunks of K, and read with ldmatrix (copied in chunks of K by cp.async,
// double-buffered); the accumulators are fp32.
//
// A program has kWarps warps, each owning 32 output columns and all of the program's K blocks (so x
// in shared memory serves kWarps * 32 columns); K is split over `split` programs whose fp32 partials
// the last one of a column tile to arrive sums (a counter per tile in `locks`, re-armed by it).
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include "w4a16_groups.cuh"

namespace w4a16_mma_impl {

using w4a16_groups::Groups;

constexpr int kRows = 16;  // rows of one block of codes (128 columns of K)

__device__ __forceinline__ uint32_t with_magic(uint32_t a, uint32_t mask) {
  uint32_t r;  // (a & mask) | 0x64006400
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(0x64006400u));
  return r;
}

__device__ __forceinline__ half2 as_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }
__device__ __forceinline__ uint32_t as_u32(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ uint32_t word(const uint4& v, int u) {
  return u == 0 ? v.x : u == 1 ? v.y : u == 2 ? v.z : v.w;
}

__device__ __forceinline__ half half_of(const uint2& v, int u) {
  const half* h = reinterpret_cast<const half*>(&v);
  return h[u];
}

// A thread's share of one block: rows 2t, 2t + 1, 2t + 8, 2t + 9 of 4 columns, and the scales /
// zeros of those columns for the block's two 64-column halves
struct Block {
  uint4 r[4];
  uint2 s[2], z[2];
};

// Where a lane reads: its row 2t of block 0 and the scales / zeros of its 4 columns (row 0), set up
// once, so that a block's loads cost one multiply-add for the block's words and one per half for
// its group's row (the per-block index arithmetic had been ~110 instructions, a quarter of a block's)
struct LaneWeights {
  const uint32_t* words;  // qweight + (2t) * N + n0
  const half* scales;     // scales + n0
  const half* zeros;      // zeros + n0
  size_t block_words;     // 16 * N: one block of codes
  int n;
  Groups groups;
};

__device__ __forceinline__ void load_block(Block& blk, const LaneWeights& lw, int b) {
  const uint32_t* src = lw.words + b * lw.block_words;
  const size_t rows[4] = {0, static_cast<size_t>(lw.n), 8 * static_cast<size_t>(lw.n), 9 * static_cast<size_t>(lw.n)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t* p = src + rows[i];
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(blk.r[i].x), "=r"(blk.r[i].y), "=r"(blk.r[i].z), "=r"(blk.r[i].w) : "l"(p));
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const size_t g = lw.groups.of(2 * b + h);
    blk.s[h] = __ldg(reinterpret_cast<const uint2*>(lw.scales + g * lw.n));
    blk.z[h] = __ldg(reinterpret_cast<const uint2*>(lw.zeros + g * lw.n));
  }
}

// the B fragments (fp16 code - zero, exact) of planes 4h .. 4h + 3 from two rows' words of one
// column: PRMT puts the rows' low (h = 0) or high (h = 1) 16 bits side by side, so each LOP3 yields
// the half2 {1024 + code of row a, 1024 + code of row b} of one plane (16x for the odd planes)
__device__ __forceinline__ void dequant_pair(uint32_t wa, uint32_t wb, int h, half2 z1024, half2 z64_neg,
                                             uint32_t (&frag)[4]) {
  const half2 inv16 = __float2half2_rn(0.0625f);
  const uint32_t p = __byte_perm(wa, wb, h ? 0x7632 : 0x5410);
  const uint32_t p8 = p >> 8;
  frag[0] = as_u32(__hsub2(as_h2(with_magic(p, 0x000f000f)), z1024));
  frag[1] = as_u32(__hfma2(as_h2(with_magic(p, 0x00f000f0)), inv16, z64_neg));
  frag[2] = as_u32(__hsub2(as_h2(with_magic(p8, 0x000f000f)), z1024));
  frag[3] = as_u32(__hfma2(as_h2(with_magic(p8, 0x00f000f0)), inv16, z64_neg));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// the same MMA onto zero sums (the first plane of a group's part: no registers to clear)
__device__ __forceinline__ void mma_16816_fresh(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const half* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}

// acc += part * the group's scales of the lane's C columns. A lane holds B columns 4g .. 4g + 3 of
// the warp's 32 (its scales s_b) but C columns 8t .. 8t + 7: those are lanes 8t's and 8t + 4's B
// columns, fetched by shuffle; C element e of n-tile u is column 8t + 4 * (e & 1) + u.
template <int kMT>
__device__ __forceinline__ void add_scaled(float (&acc)[kMT][4][4], const float (&part)[kMT][4][4], uint2 s_b, int t) {
  uint2 s_c[2];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    s_c[hi].x = __shfl_sync(0xffffffffu, s_b.x, 8 * t + 4 * hi);
    s_c[hi].y = __shfl_sync(0xffffffffu, s_b.y, 8 * t + 4 * hi);
  }
  float sc[2][4];
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const float2 lo = __half22float2(as_h2(s_c[hi].x)), up = __half22float2(as_h2(s_c[hi].y));
    sc[hi][0] = lo.x, sc[hi][1] = lo.y, sc[hi][2] = up.x, sc[hi][3] = up.y;
  }
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][u][e] = fmaf(part[mt][u][e], sc[e & 1][u], acc[mt][u][e]);
}

// one block against the x rows staged in shared memory (its 128 columns start at x_block; rows
// `stride` halves apart): per half of the block, the 4 columns' B fragments (code - zero, exact in
// fp16), then per plane one ldmatrix of x per 16 rows and one MMA per (16 rows, n-tile) into fp32
// sums of the group, scaled once per group into acc. `one_group`: both halves lie in one group
// (groups of >= 128 columns), so the block's sums are scaled once.
// Why the scale after the MMA: per weight it was an HMUL2 more in every fragment's chain (64 of a
// block's ~320 instructions a warp), and Nsight Compute found the warps of this kernel idle ~9 cycles
// between issues on such chains (benchmarks/README.md, stop 12); in fp32, once per group, it is 16
// FMAs a block.
template <int kMT>
__device__ __forceinline__ void mma_block(const Block& blk, const half* x_block, int stride, int lane,
                                          float (&acc)[kMT][4][4], bool one_group) {
  // ldmatrix.x4 addresses: lanes 0-7 rows 0-7 of K 0-7, 8-15 rows 8-15, 16-23 rows 0-7 of K 8-15, 24-31
  const half* x_lane = x_block + ((lane & 7) + ((lane >> 3) & 1) * 8) * stride + (lane >> 4) * 8;
  float part[kMT][4][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t frag[4][2][4];  // [column u][k rows 2t.. / 2t + 8..][plane of the half]
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const half z = half_of(blk.z[h], u);
      const half2 z1024 = __half2half2(__hadd(z, __float2half(1024.f)));
      const half2 z64_neg = __half2half2(__hneg(__hadd(z, __float2half(64.f))));
      dequant_pair(word(blk.r[0], u), word(blk.r[1], u), h, z1024, z64_neg, frag[u][0]);
      dequant_pair(word(blk.r[2], u), word(blk.r[3], u), h, z1024, z64_neg, frag[u][1]);
    }
    const bool fresh = h == 0 || !one_group;  // this half starts a group's sums
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int j = 4 * h + jj;
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        uint32_t a[4];
        ldmatrix_x4(a, x_lane + mt * 16 * stride + j * 16);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (jj == 0 && fresh)
            mma_16816_fresh(part[mt][u], a, frag[u][0][jj], frag[u][1][jj]);
          else
            mma_16816(part[mt][u], a, frag[u][0][jj], frag[u][1][jj]);
        }
      }
    }
    if (h == 1 || !one_group) add_scaled<kMT>(acc, part, blk.s[h], lane & 3);
  }
}

// x rows [0, kMT * 16) of the blocks [b0, b0 + nblk) into shared memory, zero past m and past kx, as
// one group of asynchronous copies (all in flight at once: one L2 round trip, not one per piece)
template <int kMT>
__device__ __forceinline__ void stage_x(half* xs, int stride, const half* x, int ldx, int m, int kx, int b0, int nblk,
                                        bool vec) {
  const int per_row = nblk * 16;  // 8-column pieces a row
  // the thread's pieces idx = threadIdx.x + i * blockDim.x as (row, piece), stepped without dividing
  int row = threadIdx.x / per_row, piece = threadIdx.x - row * per_row;
  while (row < kMT * 16) {
    const int k = b0 * 128 + piece * 8;
    half* dst = xs + row * stride + piece * 8;
    const half* src = x + static_cast<size_t>(row) * ldx + k;
    if (vec) {  // a piece past m or kx reads nothing and is zero-filled
      const bool in = row < m && k < kx;
      const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(addr), "l"(in ? src : x), "r"(in ? 16 : 0));
    } else {
      uint4 v = make_uint4(0, 0, 0, 0);
      half* vh = reinterpret_cast<half*>(&v);
      if (row < m) {
#pragma unroll
        for (int e = 0; e < 8; ++e) vh[e] = k + e < kx ? src[e] : __float2half(0.f);
      }
      *reinterpret_cast<uint4*>(dst) = v;
    }
    for (piece += blockDim.x; piece >= per_row; piece -= per_row) ++row;
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// shared memory for x, two chunk buffers: up to 32 rows two programs of 8 warps fit an SM (their
// registers allow two), beyond that one; programs of 4 warps take less, so that 3-4 fit (their
// registers allow 3-4 up to 32 rows), at the price of more, shorter chunks
template <int kWarps, int kMT>
constexpr int smem_budget() {
  return kMT > 2 ? 192 * 1024 : kWarps == 4 ? (kMT == 1 ? 48 : 64) * 1024 : 96 * 1024;
}

// The 4 accumulators a lane holds of row g + 8 * rr (of one 16-row tile), columns 8t + 4 * hi + u
// for the n-tiles u = 0..3 (the C fragment's element 2 * rr + hi of each)
__device__ __forceinline__ float4 lane_cols(const float (&acc)[4][4], int rr, int hi) {
  const int e = 2 * rr + hi;
  return make_float4(acc[0][e], acc[1][e], acc[2][e], acc[3][e]);
}

__device__ __forceinline__ void set_lane_cols(float (&acc)[4][4], int rr, int hi, const float4& v) {
  const int e = 2 * rr + hi;
  acc[0][e] = v.x; acc[1][e] = v.y; acc[2][e] = v.z; acc[3][e] = v.w;
}

template <int kWarps, int kMT, int kDepth>
__global__ void __launch_bounds__(kWarps * 32)
w4a16_mma_kernel(const half* __restrict__ x, const uint32_t* __restrict__ qweight, const half* __restrict__ scales,
                 const half* __restrict__ zeros, half* __restrict__ out, float* __restrict__ partials,
                 int* __restrict__ locks, int m, int n, int kx, int ldx, int n_blocks, int blocks_per_split, int split,
                 int chunk, Groups groups, bool vec) {
  extern __shared__ uint4 smem[];
  half* xs = reinterpret_cast<half*>(smem);
  const int stride = chunk * 128 + 8;  // halves a row: + 16 bytes so ldmatrix's 8 rows hit 8 bank groups
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x, s = blockIdx.y;
  const int n_warp = (tile * kWarps + warp) * 32;
  // a lane's 4 columns; a lane past N reads the last 4 columns and stores nothing (mma.sync needs
  // every lane of the warp)
  const int n0 = min(n_warp + 4 * g, n - 4);
  const int b_start = s * blocks_per_split;
  const int nblk = min(b_start + blocks_per_split, n_blocks) - b_start;

  float acc[kMT][4][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][u][e] = 0.f;

  const LaneWeights lw{qweight + static_cast<size_t>(2 * t) * n + n0, scales + n0, zeros + n0,
                       static_cast<size_t>(kRows) * n, n, groups};
  const bool one_group = groups.shift >= 1;  // a group spans both halves of every block
  Block ring[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
    if (d < nblk) load_block(ring[d], lw, b_start + d);

  // programmatic dependent launch (a no-op without it): the weights above are nothing the kernel
  // before writes; x is
  asm volatile("griddepcontrol.wait;" ::: "memory");

  // x in chunks of K, double-buffered: chunk c + 1 is copied while chunk c is multiplied
  const int buf_halves = kMT * 16 * stride;
  const int n_chunks = (nblk + chunk - 1) / chunk;
  stage_x<kMT>(xs, stride, x, ldx, m, kx, b_start, min(chunk, nblk), vec);
  int c = 0, in_chunk = 0;  // block lb's chunk and its place there (counted: no division a block)
  for (int base = 0; base < nblk; base += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int lb = base + d;
      if (lb < nblk) {
        if (in_chunk == 0) {  // the same for every warp: the barriers are uniform
          __syncthreads();      // every warp is done with chunk c - 1, whose buffer chunk c + 1 takes
          if (c + 1 < n_chunks) {
            const int next = (c + 1) * chunk;
            stage_x<kMT>(xs + ((c + 1) & 1) * buf_halves, stride, x, ldx, m, kx, b_start + next,
                         min(chunk, nblk - next), vec);
          } else {
            asm volatile("cp.async.commit_group;" ::: "memory");  // an empty group keeps the count
          }
          asm volatile("cp.async.wait_group 1;" ::: "memory");  // chunk c has landed (this thread's part)
          __syncthreads();                                      // (everyone's)
        }
        mma_block<kMT>(ring[d], xs + (c & 1) * buf_halves + in_chunk * 128, stride, lane, acc, one_group);
        if (lb + kDepth < nblk) load_block(ring[d], lw, b_start + lb + kDepth);
        if (++in_chunk == chunk) in_chunk = 0, ++c;
      }
    }
  }
  asm volatile("griddepcontrol.launch_dependents;");

  // C fragment of n-tile u: rows g and g + 8 (of each 16), its columns 2t, 2t + 1, i.e. output columns
  // n_warp + 8t + u and n_warp + 8t + 4 + u: a lane holds 8 adjacent columns of two rows, in two
  // groups of 4 (lane_cols)
  const int c0 = n_warp + 8 * t;
  const bool live[2] = {c0 < n, c0 + 4 < n};  // N % 4 == 0
  if (split > 1) {
    float* mine = partials + static_cast<size_t>(s) * m * n;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int row = mt * 16 + g + 8 * rr;
        if (row >= m) continue;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi)
          if (live[hi])
            *reinterpret_cast<float4*>(mine + static_cast<size_t>(row) * n + c0 + 4 * hi) = lane_cols(acc[mt], rr, hi);
      }
    __threadfence();  // this program's partials are visible before its arrival is counted
    __syncthreads();
    __shared__ int arrived;
    if (threadIdx.x == 0) arrived = atomicAdd(locks + tile, 1);
    __syncthreads();
    if (arrived != split - 1) return;
    __threadfence();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int row = mt * 16 + g + 8 * rr;
        if (row >= m) continue;
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
          if (!live[hi]) continue;
          float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int q = 0; q < split; ++q) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(
                partials + (static_cast<size_t>(q) * m + row) * n + c0 + 4 * hi));
            sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
          }
          set_lane_cols(acc[mt], rr, hi, sum);
        }
      }
    if (threadIdx.x == 0) locks[tile] = 0;  // re-armed for the next call
  }
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = mt * 16 + g + 8 * rr;
      if (row >= m) continue;
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        if (!live[hi]) continue;
        const float4 v = lane_cols(acc[mt], rr, hi);
        const half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
        *reinterpret_cast<uint2*>(out + static_cast<size_t>(row) * n + c0 + 4 * hi) = make_uint2(as_u32(a), as_u32(b));
      }
    }
}

template <int kWarps, int kMT, int kDepth>
void launch(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
            const torch::Tensor& zeros, torch::Tensor& out, torch::Tensor& partials, torch::Tensor& locks, int kx,
            int group_planes, int split, bool pdl) {
  const int m = static_cast<int>(x.size(0)), n = static_cast<int>(qweight.size(1));
  const int n_blocks = static_cast<int>(qweight.size(0)) / kRows;
  const int bps = (n_blocks + split - 1) / split;
  split = (n_blocks + bps - 1) / bps;
  const int tiles = (n + kWarps * 32 - 1) / (kWarps * 32);
  TORCH_CHECK(split == 1 || (partials.scalar_type() == at::kFloat && partials.numel() >= static_cast<int64_t>(split) * m * n &&
                             locks.numel() >= tiles),
              "w4a16_mma: split ", split, " needs fp32 partials [split, M, N] and ", tiles, " int32 locks");
  constexpr int budget = smem_budget<kWarps, kMT>();
  const int max_chunk = (budget / 2 / (kMT * 16 * 2) - 8) / 128;  // blocks a buffer holds
  const int chunk = min(bps, max_chunk);
  const size_t smem = 2 * static_cast<size_t>(kMT) * 16 * (chunk * 128 + 8) * sizeof(half);
  auto kernel = w4a16_mma_kernel<kWarps, kMT, kDepth>;
  static bool attr_set = false;  // once per instantiation: shared memory above the 48 KB default
  if (!attr_set) {
    TORCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, budget) == cudaSuccess,
                "w4a16_mma: cannot allow ", budget, " bytes of shared memory");
    attr_set = true;
  }
  const bool vec = kx % 8 == 0 && x.stride(0) % 8 == 0 && (reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) == 0;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(tiles, split);
  cfg.blockDim = dim3(kWarps * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(
      &cfg, kernel, reinterpret_cast<const half*>(x.data_ptr()), reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
      reinterpret_cast<const half*>(scales.data_ptr()), reinterpret_cast<const half*>(zeros.data_ptr()),
      reinterpret_cast<half*>(out.data_ptr()), split > 1 ? partials.data_ptr<float>() : nullptr, locks.data_ptr<int>(),
      m, n, kx, static_cast<int>(x.stride(0)), n_blocks, bps, split, chunk,
      w4a16_groups::make_groups(group_planes, static_cast<int>(scales.size(0))), vec);
  TORCH_CHECK(err == cudaSuccess, "w4a16_mma: launch failed: ", cudaGetErrorString(err));
}

template <int kWarps>
void launch_rows(int mt, int depth, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                 const torch::Tensor& zeros, torch::Tensor& out, torch::Tensor& partials, torch::Tensor& locks, int kx,
                 int group_planes, int split, bool pdl) {
  // the built (16-row tiles, blocks in flight) pairs: 4 blocks in flight with 48-64 rows would spill
#define LOWBIT_MMA_CASE(MT, D)                                                                              \
  if (mt == MT && depth == D) {                                                                             \
    launch<kWarps, MT, D>(x, qweight, scales, zeros, out, partials, locks, kx, group_planes, split, pdl); \
    return;                                                                                                 \
  }
  LOWBIT_MMA_CASE(1, 2) LOWBIT_MMA_CASE(1, 3) LOWBIT_MMA_CASE(1, 4) LOWBIT_MMA_CASE(2, 2) LOWBIT_MMA_CASE(2, 3)
  LOWBIT_MMA_CASE(2, 4) LOWBIT_MMA_CASE(3, 2) LOWBIT_MMA_CASE(4, 2)
#undef LOWBIT_MMA_CASE
  TORCH_CHECK(false, "w4a16_mma: ", mt * 16, " rows with ", depth, " blocks in flight are not built");
}

}  // namespace w4a16_mma_impl

// out[M, N] = x[M, kx] @ dequant(W).T for 2 <= M <= 64 (any M >= 1 runs), `warps` warps of 32 output
// columns a program, each warp with `depth` blocks of codes in flight, K split over `split` programs
// (fp32 partials [split, M, N] and int32 zero locks, one per program column; unused when split == 1)
void w4a16_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, torch::Tensor out,
               torch::Tensor partials, torch::Tensor locks, int64_t kx, int64_t group_planes, int64_t split,
               int64_t warps, int64_t depth, bool pdl) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kHalf && x.dim() == 2 && x.stride(1) == 1,
              "w4a16_mma: x must be fp16 [M, K] on the GPU with contiguous rows");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 64, "w4a16_mma: M = ", x.size(0), " must lie in [1, 64]");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.size(0) % 16 == 0,
              "w4a16_mma: qweight must be contiguous int32 [K_pad / 8, N] with K_pad a multiple of 128");
  const int64_t n = qweight.size(1);
  TORCH_CHECK(n % 4 == 0 && n >= 4, "w4a16_mma: N = ", n, " must be a positive multiple of 4");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  zeros.is_contiguous() && scales.size(1) == n && zeros.sizes() == scales.sizes(),
              "w4a16_mma: scales and zeros must be contiguous fp16 [G, N]");
  TORCH_CHECK(group_planes % 4 == 0 && group_planes > 0, "w4a16_mma: groups must span whole 64-column halves");
  TORCH_CHECK(out.scalar_type() == at::kHalf && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == n,
              "w4a16_mma: out must be contiguous fp16 [M, N]");
  TORCH_CHECK(x.size(1) >= kx && kx <= qweight.size(0) * 8, "w4a16_mma: x is narrower than kx");
  TORCH_CHECK(split >= 1, "w4a16_mma: split must be >= 1");
  const int mt = static_cast<int>((x.size(0) + 15) / 16);
  const int k = static_cast<int>(kx), gp = static_cast<int>(group_planes), sp = static_cast<int>(split);
  const int d = static_cast<int>(depth);
  switch (warps) {
    case 4: w4a16_mma_impl::launch_rows<4>(mt, d, x, qweight, scales, zeros, out, partials, locks, k, gp, sp, pdl); break;
    case 8: w4a16_mma_impl::launch_rows<8>(mt, d, x, qweight, scales, zeros, out, partials, locks, k, gp, sp, pdl); break;
    default: TORCH_CHECK(false, "w4a16_mma: warps must be 4 or 8, got ", warps);
  }
}
