// HSTU's training attention on bf16 dot products (AVX512-BF16), for bf16 autocast. Included by
// silu_attention.cpp inside its anonymous namespace, after the float32 kernels whose structure it follows
// (attention_task, attention_backward_task): blocks of 12 queries x 16 keys whose scores, SiLU, mask and bias
// stay in float32 registers; nothing of size n x n in memory. What differs:
//   - the input is the layer's raw bf16 projection (N, W), columns U | V | Q | K: SiLU is applied to V, Q, K
//     as each row is packed (in float32, then rounded to bf16), and the backward multiplies its dV, dQ, dK by
//     SiLU' of the same raw values and writes them as bf16 into the projection's (N, W) gradient;
//   - every product of two n x d or n x n operands takes bf16 operands (rounded to nearest even) and
//     accumulates in float32, as a bf16 matmul does: the scores, the weighted sum of values, g . v, and the
//     backward's dV, dK, dQ. vdpbf16ps sums two bf16 products per float32 lane, so operands are packed as
//     32-bit words, each a pair of bf16 along the reduction (low half first);
//   - vectors are 16 lanes: one register holds a block's 16 keys, and value-side rows are padded to whole
//     16-column vectors. (On the AMD Zen 4 this was measured on, a 16-lane vdpbf16ps issues as often as an
//     8-lane one: 2x the float32 FMA rate, where the 8-lane form gains nothing.)

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define GENREC_BF16_DOT 1

constexpr int QH = 12;  // queries per block: 12 x 16 scores in 12 of AVX-512's 32 registers

typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

// e^x for x <= 88 (larger x gives e^88), to about 3e-6 relative: 2^(x log2 e) as 2^n times a degree-5
// polynomial in the fraction f, |f| <= 1/2 (scalef puts n in the exponent; e^-inf = 0). The float32 kernels'
// exp8 is good to 2 ulp; here every weight and gradient it feeds is rounded to bf16 (2^-9) anyway, and this
// takes half the instructions: SiLU over the n x n scores costs as much as the dot products otherwise.
inline v16 exp16(v16 x) {
  const v16 t = x * 1.44269504088896341f;
  const v16 t_max = t > 127.0f ? v16{} + 127.0f : t;  // a NaN stays NaN
  const v16 n = (v16)_mm512_roundscale_ps((__m512)t_max, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const v16 f = (t_max - n) * 0.693147180559945f;  // e^f = 2^(t - n)
  v16 p = f * (1.0f / 120) + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return (v16)_mm512_scalef_ps((__m512)p, (__m512)n);
}

// 1 / x to 2^-14 relative (the estimate alone: see exp16)
inline v16 recip16(v16 x) { return (v16)_mm512_rcp14_ps((__m512)x); }
inline v16 sigmoid16(v16 x) { return recip16(1.0f + exp16(-x)); }
inline v16 silu16(v16 x) { return x * sigmoid16(x); }

inline v16 load16(const float* p) { v16 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
inline v16i load_words(const int32_t* p) { v16i r; std::memcpy(&r, p, sizeof r); return r; }
inline void store_words(int32_t* p, v16i v) { std::memcpy(p, &v, sizeof v); }
inline v16i splat_word(const int32_t* p) { return (v16i)_mm512_set1_epi32(*p); }
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }  // n <= 16

// acc + a . b pairwise: lane l gets a.lo * b.lo + a.hi * b.hi of word l
inline v16 dot2(v16 acc, v16i a, v16i b) { return (v16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)b, (__m512bh)a); }

// 16 floats as 16 bf16 in order (8 words: word l = (x[2l], x[2l + 1]))
inline __m256i bf16_row16(v16 x) { return (__m256i)_mm512_cvtneps_pbh((__m512)x); }

// word l = (a[l], b[l]): two rows' values of a column paired, for a sum over the rows
inline v16i pair_words(v16 a, v16 b) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return (v16i)_mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh((__m512)b, (__m512)a));
}

// the first n (<= 16) bf16 at p as floats, zero beyond; n floats rounded to bf16 into p
inline v16 bf16_load_first(const uint16_t* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(first_lanes(n), p);
  return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
inline void bf16_store_first(uint16_t* p, int64_t n, v16 x) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), bf16_row16(x));
}

// dst[0, Cp) <- SiLU(src[0, C)) as floats (src bf16), zero from C to Cp (a multiple of 16)
inline void silu_row(const uint16_t* src, int64_t C, int64_t Cp, float* dst) {
  for (int64_t c = 0; c < Cp; c += 16)
    store16(dst + c, c < C ? silu16(bf16_load_first(src + c, std::min<int64_t>(16, C - c))) : v16{});
}

// words[0, Cp / 2) <- the bf16 row of x[0, Cp) (Cp a multiple of 16)
inline void row_words(const float* x, int64_t Cp, int32_t* words) {
  for (int64_t c = 0; c < Cp; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + c / 2), bf16_row16(load16(x + c)));
}

// words[0, Cp) <- pair_words of rows a and b (floats; Cp a multiple of 16)
inline void pair_rows(const float* a, const float* b, int64_t Cp, int32_t* words) {
  for (int64_t c = 0; c < Cp; c += 16) store_words(words + c, pair_words(load16(a + c), load16(b + c)));
}

// Pairs of consecutive rows: row j (of n) has just been written into half j % 2 of two_rows (2 x Cp floats);
// after an odd j, or after the last row (its partner then zero), the pair's words go to pairs + j / 2 * Cp.
inline void pair_up(int64_t j, int64_t n, float* two_rows, int64_t Cp, int32_t* pairs) {
  if (j % 2 == 0 && j == n - 1) std::fill(two_rows + Cp, two_rows + 2 * Cp, 0.0f);
  if (j % 2 == 1 || j == n - 1) pair_rows(two_rows, two_rows + Cp, Cp, pairs + j / 2 * Cp);
}

// dst[0, C) <- bf16(grad[0, C) * SiLU'(raw[0, C)))
inline void store_silu_grad(uint16_t* dst, const float* grad, const uint16_t* raw, int64_t C) {
  for (int64_t c = 0; c < C; c += 16) {
    const int64_t m = std::min<int64_t>(16, C - c);
    const v16 x = bf16_load_first(raw + c, m), sig = sigmoid16(x);
    const v16 g = (v16)_mm512_maskz_loadu_ps(first_lanes(m), grad + c);
    bf16_store_first(dst + c, m, g * sig * (1.0f + x * (1.0f - sig)));
  }
}

// dst (16 x 16, rows dst_stride apart) <- the transpose of src (16 x 16, rows src_stride apart), through
// registers: 32-bit, 64-bit and 128-bit lanes interleaved in turn (bit patterns move unchanged: words too)
inline void transpose16(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = (__m512)_mm512_unpacklo_pd((__m512d)t[i], (__m512d)t[i + 2]);
    r[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[i], (__m512d)t[i + 2]);
    r[i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
    r[i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    _mm512_storeu_ps(dst + i * dst_stride, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    _mm512_storeu_ps(dst + (i + 8) * dst_stride, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
    _mm512_storeu_ps(dst + (i + 4) * dst_stride, _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88));
    _mm512_storeu_ps(dst + (i + 12) * dst_stride, _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd));
  }
}

// rows (16, Cp) <- the transpose of accT (Cp, 16) (Cp a multiple of 16): a key block's dk, dv, one row per key
inline void transpose_rows(const float* accT, int64_t Cp, float* rows) {
  for (int64_t c0 = 0; c0 < Cp; c0 += 16) transpose16(accT + c0 * KB, KB, rows + c0, Cp);
}

// A transposed layout of words, m[p * Lp + j] = word p of token j's row (Lp a multiple of 16; m has width
// rows, width a multiple of 16), built 16 tokens at a time: each token's row goes into a 16-row tile (zero
// past the words written), and a full tile, or the last one zero-padded, is transposed into place: no
// scattered stores. tile: 16 x width words, zero on construction.
struct WordTiles {
  int32_t* tile;
  int64_t width;
  int32_t* m;
  int64_t Lp;

  int32_t* row(int64_t j) const { return tile + (j % 16) * width; }  // where token j's words go
  void written(int64_t j, int64_t n) const {  // token j's row is in place
    if (j % 16 != 15 && j != n - 1) return;
    const int64_t j0 = j / 16 * 16;
    std::fill(tile + (j - j0 + 1) * width, tile + 16 * width, 0);  // keys past n: zero
    for (int64_t p0 = 0; p0 < width; p0 += 16)
      transpose16(reinterpret_cast<const float*>(tile + p0), width, reinterpret_cast<float*>(m + p0 * Lp + j0), Lp);
  }
};

// 16 bias values of row ``row`` from column j0 (a row Lb long), zero past its end
inline v16 bias16(const float* row, int64_t j0, int64_t Lb) {
  return j0 + KB <= Lb ? load16(row + j0) : (v16)_mm512_maskz_loadu_ps(first_lanes(Lb - j0), row + j0);
}

// The U columns of a raw projection (N, W) bf16, the first C of each row, outside attention: u (N, C) float32
// <- SiLU(raw) in the forward; in the backward draw's U columns <- bf16(du * SiLU'(raw)) (du null: zero).
void silu_columns(const uint16_t* raw, int64_t N, int64_t W, int64_t C, float* u) {
  at::parallel_for(0, N, 512, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < C; c += 16) {
        const int64_t m = std::min<int64_t>(16, C - c);
        _mm512_mask_storeu_ps(u + t * C + c, first_lanes(m), (__m512)silu16(bf16_load_first(raw + t * W + c, m)));
      }
  });
}

void silu_grad_columns(const uint16_t* raw, const float* du, int64_t N, int64_t W, int64_t C, uint16_t* draw) {
  at::parallel_for(0, N, 512, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (du) {
        store_silu_grad(draw + t * W, du + t * C, raw + t * W, C);
      } else {
        std::fill(draw + t * W, draw + t * W + C, uint16_t{0});
      }
    }
  });
}

// out[r] += rows[r] . colsT over npairs words, for the QH rows of a block (rows row_words apart; colsT: word
// p of key j at p * Lp + j, from the block's first key): scores and g . v
inline void block_products(const int32_t* rows, int64_t row_words, const int32_t* colsT, int64_t npairs,
                           int64_t Lp, v16 (&out)[QH]) {
  v16 a[QH];
  for (int r = 0; r < QH; ++r) a[r] = out[r];
  for (int64_t p = 0; p < npairs; ++p) {
    const v16i x = load_words(colsT + p * Lp);
    for (int r = 0; r < QH; ++r) a[r] = dot2(a[r], splat_word(rows + r * row_words + p), x);
  }
  for (int r = 0; r < QH; ++r) out[r] = a[r];
}

// acc (QH rows, stride acc_stride) += w (QH rows of KB / 2 words) @ vpairs (npairs rows, vstride apart: word c
// of pair p = the values of keys 2p and 2p + 1 in column c), NV vectors of columns
template <int NV>
inline void weighted_values(const int32_t* w, const int32_t* vpairs, float* acc, int64_t npairs, int64_t vstride,
                            int64_t acc_stride) {
  v16 o[QH][NV];
  for (int r = 0; r < QH; ++r)
    for (int c = 0; c < NV; ++c) o[r][c] = load16(acc + r * acc_stride + c * 16);
  for (int64_t p = 0; p < npairs; ++p) {
    v16i vp[NV];
    for (int c = 0; c < NV; ++c) vp[c] = load_words(vpairs + p * vstride + c * 16);
    for (int r = 0; r < QH; ++r) {
      const v16i wr = splat_word(w + r * (KB / 2) + p);
      for (int c = 0; c < NV; ++c) o[r][c] = dot2(o[r][c], wr, vp[c]);
    }
  }
  for (int r = 0; r < QH; ++r)
    for (int c = 0; c < NV; ++c) store16(acc + r * acc_stride + c * 16, o[r][c]);
}

// weighted_values over the Cp (a multiple of 16) columns of vpairs and acc (both Cp wide), 32 at a time
// (12 rows x 2 vectors of accumulators, 2 of values and a broadcast: 27 of the 32 registers)
inline void weighted_columns16(const int32_t* w, const int32_t* vpairs, float* acc, int64_t npairs, int64_t Cp) {
  for (int64_t c0 = 0; c0 < Cp; c0 += 32)
    with_vectors<2>(std::min<int64_t>(2, (Cp - c0) / 16), [&](auto n) {
      weighted_values<decltype(n)::value>(w, vpairs + c0, acc + c0, npairs, Cp, Cp);
    });
}

// accT (d x KB, a key block's gradient transposed) += rows^T @ x for a block's QH rows, given as QH / 2 pair
// rows (pair row m: word c = rows 2m and 2m + 1 of column c; pair_stride apart) and x as QH / 2 vectors of
// pair words (the two rows' 16 keys)
inline void block_outer(float* accT, const int32_t* pairs, int64_t pair_stride, int64_t d, const v16i (&x)[QH / 2]) {
  for (int64_t c = 0; c < d; ++c) {
    v16 acc = load16(accT + c * KB);
    for (int m = 0; m < QH / 2; ++m) acc = dot2(acc, splat_word(pairs + m * pair_stride + c), x[m]);
    store16(accT + c * KB, acc);
  }
}

// keep lane l (key j0 + l) of row i0 + r only if it is not after the query: exact zeros, as the mask multiply
inline v16 causal(v16 x, int64_t i0, int r, int64_t j0) {
  const v16 lane = v16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane <= static_cast<float>(i0 + r - j0) ? x : v16{};
}

// The raw rows of token j + 8 on their way to the cache (the tokens are a projection's rows, 2 W bytes apart:
// without it the packing loops wait on memory)
inline void prefetch_rows(int64_t j, int64_t stride, const uint16_t* a, const uint16_t* b, const uint16_t* c) {
  __builtin_prefetch(a + (j + 8) * stride);
  __builtin_prefetch(b + (j + 8) * stride);
  __builtin_prefetch(c + (j + 8) * stride);
}

// Forward of one (batch row, head), n >= 1 tokens: q, k, v point at the head's raw (pre-SiLU) bf16 columns
// of the first token, tokens ``stride`` apart; out (float32) rows out_stride apart, times out_scale. bias:
// this row's (Lb x Lb) or null.
void attention_task_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias, float* out,
                         int64_t n, int64_t dqk, int64_t dv, int64_t stride, int64_t Lb, int64_t out_stride,
                         float out_scale, std::vector<float>& buf) {
  static_assert(KB == 16, "one 16-lane vector of keys per block");
  const int64_t Lp = (n + KB - 1) / KB * KB;
  const int64_t dq16 = (dqk + 15) / 16 * 16, dq2 = (dqk + 1) / 2, dv16 = (dv + 15) / 16 * 16;
  const int64_t kwide = (dq16 / 2 + 15) / 16 * 16;       // rows of kw (dq2 of them used)
  buf.resize(n * dq16 / 2 + kwide * Lp + Lp / 2 * dv16 + QH * KB / 2 + QH * dv16 + dq16 + 2 * dv16 + 16 * kwide);
  int32_t* qw = reinterpret_cast<int32_t*>(buf.data());  // (n, dq16 / 2) words: queries
  int32_t* kw = qw + n * dq16 / 2;                       // (kwide, Lp) words: keys, pairs of columns
  int32_t* vw = kw + kwide * Lp;                         // (Lp / 2, dv16) words: values, pairs of keys
  int32_t* ww = vw + Lp / 2 * dv16;                      // (QH, KB / 2) words: SiLU weights of a block
  float* acc = reinterpret_cast<float*>(ww + QH * KB / 2);  // (QH, dv16): output rows
  float* row = acc + QH * dv16;                          // (dq16): a q or k row after SiLU
  float* vrow = row + dq16;                              // (2, dv16): two value rows after SiLU
  int32_t* tile = reinterpret_cast<int32_t*>(vrow + 2 * dv16);  // (16, kwide) words: key rows on their way to kw
  std::fill(tile, tile + 16 * kwide, 0);
  const WordTiles keys_t{tile, kwide, kw, Lp};
  for (int64_t j = 0; j < n; ++j) {
    prefetch_rows(j, stride, q, k, v);
    silu_row(q + j * stride, dqk, dq16, row);
    row_words(row, dq16, qw + j * dq16 / 2);
    silu_row(k + j * stride, dqk, dq16, row);
    row_words(row, dq16, keys_t.row(j));
    keys_t.written(j, n);
    silu_row(v + j * stride, dv, dv16, vrow + (j & 1) * dv16);
    pair_up(j, n, vrow, dv16, vw);
  }
  for (int64_t i0 = 0; i0 < n; i0 += QH) {
    const int64_t keys = std::min(i0 + QH, n);  // keys [0, keys) are visible to some query of the block
    const int32_t* qr[QH];
    const float* br[QH];
    for (int r = 0; r < QH; ++r) {
      const int64_t i = std::min(i0 + r, n - 1);  // rows past the end repeat the last one (discarded)
      qr[r] = qw + i * dq16 / 2;
      br[r] = bias ? bias + i * Lb : nullptr;
    }
    std::fill(acc, acc + QH * dv16, 0.0f);
    for (int64_t j0 = 0; j0 < keys; j0 += KB) {
      v16 s[QH];
      for (int r = 0; r < QH; ++r) s[r] = bias ? bias16(br[r], j0, Lb) : v16{};
      for (int64_t p = 0; p < dq2; ++p) {
        const v16i kp = load_words(kw + p * Lp + j0);
        for (int r = 0; r < QH; ++r) s[r] = dot2(s[r], splat_word(qr[r] + p), kp);
      }
      const bool diagonal = j0 + KB > i0;  // some key of the block lies after some query
      for (int r = 0; r < QH; ++r) {
        const v16 w = silu16(s[r]);
        const v16 kept = diagonal ? causal(w, i0, r, j0) : w;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ww + r * (KB / 2)), bf16_row16(kept));
      }
      // an odd count of keys reads one more: its weight is zero (masked) and its values too (padding)
      weighted_columns16(ww, vw + j0 / 2 * dv16, acc, (std::min<int64_t>(KB, keys - j0) + 1) / 2, dv16);
    }
    for (int r = 0; r < QH && i0 + r < n; ++r)
      for (int64_t c = 0; c < dv; c += 16)
        _mm512_mask_storeu_ps(out + (i0 + r) * out_stride + c, first_lanes(std::min<int64_t>(16, dv - c)),
                              (__m512)(load16(acc + r * dv16 + c) * out_scale));
  }
}

// Gradients of one (batch row, head), as attention_backward_task computes them (keys outer, 16 at a time;
// queries 12 at a time from the key block's diagonal on), from the raw bf16 projection: g (float32, times
// g_scale as read; rows g_stride apart) is dL/d out; dq, dk, dv (bf16, the raw projection's gradient
// columns, tokens ``stride`` apart) receive the gradients times SiLU'(raw); dbias (float32, Lb x Lb) is
// accumulated into.
void attention_backward_task_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* g,
                                  const float* bias, uint16_t* dq, uint16_t* dk, uint16_t* dvo, float* dbias,
                                  int64_t n, int64_t Lb, int64_t dqk, int64_t dv, int64_t stride, int64_t g_stride,
                                  float g_scale, std::vector<float>& buf) {
  if (n <= 0) return;
  const int64_t Lp = (n + KB - 1) / KB * KB, Np = (n + QH - 1) / QH * QH;
  const int64_t dq16 = (dqk + 15) / 16 * 16, dq2 = (dqk + 1) / 2, dv16 = (dv + 15) / 16 * 16, dv2 = (dv + 1) / 2;
  const int64_t kwide = (dq16 / 2 + 15) / 16 * 16, vwide = (dv16 / 2 + 15) / 16 * 16;  // rows of kw, vw
  buf.resize(Np * dq16 / 2 + Np / 2 * dq16 + kwide * Lp + Lp / 2 * dq16 + Np * dv16 / 2 + Np / 2 * dv16 + vwide * Lp +
             Np * dq16 + QH * KB / 2 + 2 * (dq16 + dv16) * KB + 2 * dq16 + 2 * dv16 + 16 * (kwide + vwide));
  int32_t* qw = reinterpret_cast<int32_t*>(buf.data());  // (Np, dq16 / 2) words: queries (scores)
  int32_t* qpr = qw + Np * dq16 / 2;                     // (Np / 2, dq16) words: pairs of query rows (dk)
  int32_t* kw = qpr + Np / 2 * dq16;                     // (kwide, Lp) words: keys, pairs of columns (scores)
  int32_t* kpr = kw + kwide * Lp;                        // (Lp / 2, dq16) words: pairs of keys (dq)
  int32_t* gw = kpr + Lp / 2 * dq16;                     // (Np, dv16 / 2) words: output gradients (g . v)
  int32_t* gpr = gw + Np * dv16 / 2;                     // (Np / 2, dv16) words: pairs of gradient rows (dv)
  int32_t* vw = gpr + Np / 2 * dv16;                     // (vwide, Lp) words: values, pairs of columns (g . v)
  float* dqa = reinterpret_cast<float*>(vw + vwide * Lp);  // (Np, dq16): dq accumulators
  int32_t* dsw = reinterpret_cast<int32_t*>(dqa + Np * dq16);  // (QH, KB / 2) words: a block's ds rows (dq)
  float* dkT = reinterpret_cast<float*>(dsw + QH * KB / 2);    // (dq16, KB): the key block's dk, transposed
  float* dvT = dkT + dq16 * KB;                          // (dv16, KB): its dv, transposed
  float* trk = dvT + dv16 * KB;                          // (KB, dq16): dkT transposed
  float* trv = trk + KB * dq16;                          // (KB, dv16): dvT transposed
  float* rows = trv + KB * dv16;                         // (2, dq16): two q (then k) rows after SiLU
  float* grows = rows + 2 * dq16;                        // (2, dv16): two g (then v) rows
  int32_t* tiles = reinterpret_cast<int32_t*>(grows + 2 * dv16);  // (16, kwide) and (16, vwide) words
  std::fill(tiles, tiles + 16 * (kwide + vwide), 0);
  const WordTiles keys_t{tiles, kwide, kw, Lp}, values_t{tiles + 16 * kwide, vwide, vw, Lp};
  const int64_t paired = (n + 1) / 2;  // pair rows written below; the rest of each layout is zero
  std::fill(qw + n * dq16 / 2, qw + Np * dq16 / 2, 0);
  std::fill(qpr + paired * dq16, qpr + Np / 2 * dq16, 0);
  std::fill(gw + n * dv16 / 2, gw + Np * dv16 / 2, 0);
  std::fill(gpr + paired * dv16, gpr + Np / 2 * dv16, 0);
  std::fill(dqa, dqa + Np * dq16, 0.0f);
  for (int64_t j = 0; j < n; ++j) {  // queries and output gradients: rows, and pairs of rows
    prefetch_rows(j, stride, q, k, v);
    __builtin_prefetch(g + (j + 8) * g_stride);
    float* qj = rows + (j & 1) * dq16;
    silu_row(q + j * stride, dqk, dq16, qj);
    row_words(qj, dq16, qw + j * dq16 / 2);
    float* gj = grows + (j & 1) * dv16;
    for (int64_t c = 0; c < dv16; c += 16) {
      const __mmask16 cols = first_lanes(std::clamp<int64_t>(dv - c, 0, 16));
      store16(gj + c, (v16)_mm512_maskz_loadu_ps(cols, g + j * g_stride + c) * g_scale);
    }
    row_words(gj, dv16, gw + j * dv16 / 2);
    pair_up(j, n, rows, dq16, qpr);
    pair_up(j, n, grows, dv16, gpr);
  }
  for (int64_t j = 0; j < n; ++j) {  // keys: pairs of columns and pairs of keys; values: pairs of columns
    float* kj = rows + (j & 1) * dq16;
    silu_row(k + j * stride, dqk, dq16, kj);
    row_words(kj, dq16, keys_t.row(j));
    keys_t.written(j, n);
    pair_up(j, n, rows, dq16, kpr);
    silu_row(v + j * stride, dv, dv16, grows);
    row_words(grows, dv16, values_t.row(j));
    values_t.written(j, n);
  }
  for (int64_t j0 = 0; j0 < n; j0 += KB) {
    std::fill(dkT, dkT + (dq16 + dv16) * KB, 0.0f);  // and dvT
    const int64_t jn = std::min<int64_t>(KB, n - j0);
    for (int64_t i0 = j0 / QH * QH; i0 < n; i0 += QH) {
      v16 a[QH] = {}, s[QH];  // g . v; scores
      block_products(gw + i0 * dv16 / 2, dv16 / 2, vw + j0, dv2, Lp, a);
      for (int r = 0; r < QH; ++r) s[r] = bias && i0 + r < n ? bias16(bias + (i0 + r) * Lb, j0, Lb) : v16{};
      block_products(qw + i0 * dq16 / 2, dq16 / 2, kw + j0, dq2, Lp, s);
      // w = SiLU(s) (kept in s), ds = (g . v) SiLU'(s) = (g . v) (sig + w (1 - sig)); zero past the diagonal.
      // Rows past n give zero by themselves: their q, g and bias are zero, so s = 0, w = 0 and g . v = 0.
      const bool masked = j0 + KB > i0 + 1;
      v16 ds[QH];
      for (int r = 0; r < QH; ++r) {
        const v16 x = s[r], sig = sigmoid16(x);
        const v16 w = x * sig;  // silu16(x), as the forward computed it
        const v16 d = a[r] * (sig + w * (1.0f - sig));
        s[r] = masked ? causal(w, i0, r, j0) : w;
        ds[r] = masked ? causal(d, i0, r, j0) : d;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsw + r * (KB / 2)), bf16_row16(ds[r]));
      }
      v16i x[QH / 2];
      for (int m = 0; m < QH / 2; ++m) x[m] = pair_words(s[2 * m], s[2 * m + 1]);
      block_outer(dvT, gpr + i0 / 2 * dv16, dv16, dv, x);  // dv (transposed) += g^T w
      for (int m = 0; m < QH / 2; ++m) x[m] = pair_words(ds[2 * m], ds[2 * m + 1]);
      block_outer(dkT, qpr + i0 / 2 * dq16, dq16, dqk, x);  // dk (transposed) += q^T ds
      if (dbias)  // ds is zero right of the diagonal: adding it there changes nothing
        for (int r = 0; r < QH && i0 + r < n; ++r) {
          float* brow = dbias + (i0 + r) * Lb + j0;
          const __mmask16 cols = first_lanes(std::min<int64_t>(KB, Lb - j0));
          _mm512_mask_storeu_ps(brow, cols, _mm512_add_ps(_mm512_maskz_loadu_ps(cols, brow), (__m512)ds[r]));
        }
      // dq += ds k (an odd count of keys reads one more: its ds is zero, its key row too)
      weighted_columns16(dsw, kpr + j0 / 2 * dq16, dqa + i0 * dq16, (jn + 1) / 2, dq16);
    }
    transpose_rows(dkT, dq16, trk);  // the key block's dk and dv, one row per key, times SiLU'
    transpose_rows(dvT, dv16, trv);
    for (int64_t jj = 0; jj < jn; ++jj) {
      store_silu_grad(dk + (j0 + jj) * stride, trk + jj * dq16, k + (j0 + jj) * stride, dqk);
      store_silu_grad(dvo + (j0 + jj) * stride, trv + jj * dv16, v + (j0 + jj) * stride, dv);
    }
  }
  for (int64_t i = 0; i < n; ++i) store_silu_grad(dq + i * stride, dqa + i * dq16, q + i * stride, dqk);
}

#endif  // AVX512-BF16
