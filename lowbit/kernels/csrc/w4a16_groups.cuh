// The quantization group of a 64-column half of a block of codes, shared by csrc/w4a16_gemv.cu and
// csrc/w4a16_mma.cu (one translation unit: included once).
#pragma once

#include <cuda_runtime.h>

namespace w4a16_groups {

// Half h of block b (its columns b * 128 + 64 h ..) lies in group (2b + h) / halves, halves =
// group_planes / 4. Every natural group size makes `halves` a power of two (64 -> 1, 128 -> 2, a
// whole row of K = 4096 -> 64), so the index is a shift; the integer division it replaces cost ~25
// instructions twice a block on the load path (SASS of w4a16_mma_kernel), about a tenth of a block's
// work. Other sizes keep the division. Halves past the last group are padding planes whose x is
// zero: they take the last group's (finite) scale.
struct Groups {
  int shift;   // log2(halves), or -1 when halves is no power of two
  int halves;  // halves of a block a group spans
  int last;    // the last group's index
  __device__ __forceinline__ int of(int half_index) const {
    return min(shift >= 0 ? half_index >> shift : half_index / halves, last);
  }
};

inline Groups make_groups(int group_planes, int n_groups) {
  const int halves = group_planes / 4;
  int shift = -1;
  if ((halves & (halves - 1)) == 0) {
    shift = 0;
    while ((1 << shift) < halves) ++shift;
  }
  return Groups{shift, halves, n_groups - 1};
}

}  // namespace w4a16_groups
