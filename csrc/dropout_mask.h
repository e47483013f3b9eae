// Counter-based dropout mask shared by the CPU and CUDA kernels.
//
// Element (row, col) of a (rows x cols) input is kept iff its 16-bit draw is >= `threshold`. The draw comes from
// ATen's Philox4x32-10 engine keyed by the seed, with the row as subsequence and col / 8 as offset: one engine call
// yields 128 bits, i.e. the 16-bit draws of 8 consecutive columns. The mask therefore depends only on
// (seed, row, col), never on how the work is split across threads, chunks or CUDA blocks.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace d9d {

// Columns covered by one Philox call.
constexpr int64_t kMaskGroup = 8;

// Resolution of the keep probability: p is rounded to a multiple of 1 / 65536.
constexpr double kMaskLevels = 65536.0;

// The 128 random bits that decide columns [8 * group, 8 * group + 8) of `row`.
struct MaskBits {
  uint32_t words[4];

  // Whether column `8 * group + lane` is kept.
  C10_HOST_DEVICE inline bool keep(int lane, uint32_t threshold) const {
    const uint32_t draw = (words[lane >> 1] >> ((lane & 1) * 16)) & 0xFFFFu;
    return draw >= threshold;
  }
};

C10_HOST_DEVICE inline MaskBits mask_bits(uint64_t seed, int64_t row, int64_t group) {
  at::philox_engine engine(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(group));
  MaskBits bits;
  bits.words[0] = engine();
  bits.words[1] = engine();
  bits.words[2] = engine();
  bits.words[3] = engine();
  return bits;
}

}  // namespace d9d
