// AVX-512 helpers of the bfloat16 kernels (amx_gemm.cpp, avx512_bf16_gemm.cpp): lane masks, rounding to bfloat16,
// and the pairs of rows that tdpbf16ps and vdpbf16ps take as their second operand. Include it inside an anonymous
// namespace, in a region compiled for AVX-512 (avx512f, avx512bw, avx512vl), after <immintrin.h>.
#pragma once

constexpr int64_t kLanes = 16;  // float32 lanes of a 512-bit register, and bfloat16 pairs

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// The first `count` of 16 lanes (count clamped to [0, 16]).
inline __mmask16 first_lanes(int64_t count) {
  return count >= kLanes ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

// 16 float32 rounded to bfloat16 as c10::BFloat16 rounds: to nearest even, NaN to 0x7FC0.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i increment = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, increment), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}

// 16 bfloat16 of row a and 16 of row b, interleaved: (a[0], b[0], a[1], b[1], ...), one row of a second operand.
inline __m512i interleave(__m256i a, __m256i b) {
  alignas(64) static constexpr uint16_t kOrder[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kOrder), both);
}

// q (depth x rp, contiguous, rp % 16 == 0) interleaved by pairs of rows into packed (depth_pad / 2 rows of rp pairs),
// zero below depth.
inline void interleave_panel(const uint16_t* q, int64_t depth, int64_t rp, int64_t depth_pad, uint16_t* packed) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t k = 0; k < depth_pad; k += 2) {
    for (int64_t j = 0; j < rp; j += kLanes) {
      const __m256i a = k < depth ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k * rp + j)) : zero;
      const __m256i b = k + 1 < depth ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (k + 1) * rp + j))
                                      : zero;
      _mm512_storeu_si512(packed + k * rp + 2 * j, interleave(a, b));
    }
  }
}

// Byte offsets of 16 rows `stride_bytes` apart, for a 32-bit gather of one word per row.
inline __m512i row_offsets(int64_t stride_bytes) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int32_t>(stride_bytes)));
}

// The second operand of expand: q (width x r, rows ldq apart, r even) as tdpbf16ps and vdpbf16ps take it, depth / 2
// rows of width_pad pairs (q[j][2i], q[j][2i + 1]), zero beyond r and width. One 32-bit gather per 16 columns and
// pair.
inline void interleave_rows(const uint16_t* q, int64_t ldq, int64_t width, int64_t r, int64_t depth,
                            int64_t width_pad, uint32_t* packed) {
  const __m512i lanes = row_offsets(ldq * 2);
  for (int64_t pair = 0; pair < depth / 2; ++pair) {
    const int64_t k = 2 * pair;
    for (int64_t j = 0; j < width_pad; j += kLanes) {
      const int64_t cols = std::clamp<int64_t>(width - j, 0, kLanes);
      const __mmask16 valid = first_lanes(cols);
      __m512i words = _mm512_setzero_si512();
      if (k < r && cols > 0) {
        words = _mm512_mask_i32gather_epi32(words, valid, lanes, q + j * ldq + k, 1);
      }
      _mm512_storeu_si512(packed + pair * width_pad + j, words);
    }
  }
}
