// HSTU's causal pointwise-SiLU attention on CPU, forward and backward, and at inference the middle of a layer
// around it and its input layer norm (genrec/models/kernels/__init__.py loads them).
//
//   out[b, i, h, :] = sum_{j <= i} SiLU(q[b, i, h, :] . k[b, j, h, :] + bias[b or 0, i, j]) v[b, j, h, :]
//
// for i < lengths[b]; rows at i >= lengths[b] (padding) are zero. One (batch row, head) pair per task,
// longest rows first. The scores of 6 queries x 16 keys stay in registers from the dot products through
// SiLU and the causal mask; the 6 x 16 weights then go through L1 into the weighted sum of values, whose
// accumulators are register-blocked too (3 rows x 32 columns). Nothing of size L x L is ever written to
// memory: the stock path runs a matmul, a SiLU pass and a second matmul over every tile. Keys are packed
// transposed (dqk x L) and values in whole vectors (the last dv % 8 columns transposed) once per task,
// both in L1/L2. The backward (attention_backward_task) recomputes the scores the same way, keys outer.
// Rows are either the (B, L) grid or packed tokens with each row's first token given (struct Rows).
// Written with GCC/Clang vector extensions (8 floats): AVX/AVX2 on x86, two NEON registers on ARM.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

constexpr int QB = 6;   // queries per register block (6 x 2 score vectors + 2 key vectors: 14 of 16 AVX registers)
constexpr int KB = 16;  // keys per register block (two vectors)

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 load(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(v8 v) {  // pairwise: three dependent additions instead of eight
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

// max and min with x86's maxps/minps semantics (the second operand when either is NaN); GCC and Clang
// compile these patterns to the single instructions.
inline v8 vmax(v8 a, v8 b) { return a > b ? a : b; }
inline v8 vmin(v8 a, v8 b) { return a < b ? a : b; }

inline v8 vfloor(v8 x) {
#if defined(__AVX__)
  return (v8)_mm256_floor_ps((__m256)x);
#else
  const v8 t = __builtin_convertvector(__builtin_convertvector(x, v8i), v8);  // truncated toward zero
  return t > x ? t - splat(1.0f) : t;
#endif
}

// exp(x) to about 2 ulp for x in [-87, 88] (the caller clamps): Cody-Waite range reduction and a degree-6
// polynomial (the Cephes coefficients).
inline v8 exp8(v8 x) {
  const v8 fn = vfloor(x * splat(1.44269504088896341f) + splat(0.5f));
  x = x - fn * splat(0.693359375f) + fn * splat(2.12194440e-4f);
  const v8 z = x * x;
  v8 y = splat(1.9875691500e-4f);
  y = y * x + splat(1.3981999507e-3f);
  y = y * x + splat(8.3334519073e-3f);
  y = y * x + splat(4.1665795894e-2f);
  y = y * x + splat(1.6666665459e-1f);
  y = y * x + splat(5.0000001201e-1f);
  y = y * z + x + splat(1.0f);
  const v8i bits = (__builtin_convertvector(fn, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// SiLU(x) = x / (1 + exp(-x)). exp's argument is clamped to [-87, 88] (a NaN becomes -87, so nothing
// undefined reaches the float-to-int conversion); x itself is floored at -88, so below that the result
// is -88 / 1.6e38 (about -5e-37) instead of x / 1.6e38; a NaN x stays NaN.
inline v8 silu8(v8 x) {
  const v8 e = exp8(vmin(vmax(-x, splat(-87.0f)), splat(88.0f)));
  return vmax(splat(-88.0f), x) / (splat(1.0f) + e);
}

// sigmoid(x) = 1 / (1 + exp(-x)), exp's argument clamped as in silu8 (SiLU' in the backward passes)
inline v8 sigmoid8(v8 x) { return splat(1.0f) / (splat(1.0f) + exp8(vmin(vmax(-x, splat(-87.0f)), splat(88.0f)))); }

// acc (QB rows, stride dvp) += w (QB, KB)[:, :jn] @ vrows (jn rows, stride vstride), NV vectors of columns:
// three rows at a time, so 3 x NV accumulators and the NV value vectors of one key stay in registers.
template <int NV>
inline void weighted_values(const float* w, const float* vrows, float* acc, int64_t jn, int64_t vstride,
                            int64_t dvp) {
  static_assert(QB % 3 == 0, "rows go three at a time");
  for (int r0 = 0; r0 < QB; r0 += 3) {
    v8 o[3][NV];
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < NV; ++c) o[r][c] = load(acc + (r0 + r) * dvp + c * 8);
    for (int64_t jj = 0; jj < jn; ++jj) {
      v8 vj[NV];
      for (int c = 0; c < NV; ++c) vj[c] = load(vrows + jj * vstride + c * 8);
      for (int r = 0; r < 3; ++r) {
        const v8 wr = splat(w[(r0 + r) * KB + jj]);
        for (int c = 0; c < NV; ++c) o[r][c] += wr * vj[c];
      }
    }
    for (int r = 0; r < 3; ++r)
      for (int c = 0; c < NV; ++c) store(acc + (r0 + r) * dvp + c * 8, o[r][c]);
  }
}

// f(std::integral_constant<int, nv>{}) for a runtime nv in [1, MAX]: the one place where a count of vectors
// becomes the template argument of a register-blocked loop.
template <int MAX, int NV = 1, typename F>
inline auto with_vectors(int64_t nv, F&& f) {
  if constexpr (NV < MAX) {
    if (nv > NV) return with_vectors<MAX, NV + 1>(nv, std::forward<F>(f));
  }
  return f(std::integral_constant<int, NV>{});
}

// weighted_values over nv whole vectors of columns, 32 at a time (the forward's output, the backward's dq)
inline void weighted_columns(const float* w, const float* rows, float* acc, int64_t jn, int64_t nv,
                             int64_t row_stride, int64_t acc_stride) {
  for (int64_t c0 = 0; c0 < nv; c0 += 4)
    with_vectors<4>(std::min<int64_t>(4, nv - c0), [&](auto n) {
      weighted_values<decltype(n)::value>(w, rows + c0 * 8, acc + c0 * 8, jn, row_stride, acc_stride);
    });
}

// The first n (0 <= n <= 8) floats at p as a vector, zero beyond, and back: masked loads and stores
// (nothing past n is touched), else through a small buffer.
inline v8 load_first(const float* p, int64_t n) {
#if defined(__AVX512VL__)  // AVX-512's masked moves (AVX2's vmaskmovps store is microcoded on AMD: slow)
  return (v8)_mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), p);
#elif defined(__AVX2__)
  const v8i lane = v8i{0, 1, 2, 3, 4, 5, 6, 7};
  return (v8)_mm256_maskload_ps(p, (__m256i)(lane < static_cast<int>(n)));
#else
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, p, n * sizeof(float));
  return load(t);
#endif
}

inline void store_first(float* p, int64_t n, v8 x) {
#if defined(__AVX512VL__)
  _mm256_mask_storeu_ps(p, static_cast<__mmask8>((1u << n) - 1), (__m256)x);
#elif defined(__AVX2__)
  const v8i lane = v8i{0, 1, 2, 3, 4, 5, 6, 7};
  _mm256_maskstore_ps(p, (__m256i)(lane < static_cast<int>(n)), (__m256)x);
#else
  float t[8];
  store(t, x);
  std::memcpy(p, t, n * sizeof(float));
#endif
}

// dst[0, n) = src[0, n) for short rows (a few vectors): whole vectors and a masked tail, no library call.
inline void copy_row(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, load(src + i));
  if (i < n) store_first(dst + i, n - i, load_first(src + i, n - i));
}

// p[0, count) <- SiLU(p[0, count)), whole vectors and one partial vector (masked)
void silu_inplace(float* p, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store(p + i, silu8(load(p + i)));
  if (i < count) store_first(p + i, count - i, silu8(load_first(p + i, count - i)));
}

// One (batch row, head): n real positions. q, k, v, out point at position 0 of this head; strides are per
// position. bias at (b or 0, 0, 0) or null. With ``silu_inputs`` q, k and v are the raw projection and
// SiLU is applied here, to the packed copies (each element once); q is then multiplied by q_scale.
// Only queries [first, n) are computed; query i is written to output row i - first. Output rows
// [n, zero_rows) are zero-filled (the padding of a (B, L) layout).
void attention_task(const float* q, const float* k, const float* v, const float* bias, float* out,
                    int64_t n, int64_t zero_rows, int64_t dqk, int64_t dv, int64_t q_stride, int64_t k_stride,
                    int64_t v_stride, int64_t bias_stride, int64_t out_stride, bool silu_inputs, float q_scale,
                    int64_t first, float out_scale, std::vector<float>& buf) {
  // Value columns: the first dvf (whole vectors) go through weighted_values with keys along the rows; the
  // last dt = dv - dvf (fewer than 8, e.g. 1 of dv = 25) are kept transposed, keys along the lanes, and
  // accumulated from the weights while they are still in registers (padding them to a vector would cost
  // a quarter more work for dv = 25).
  const int64_t Lp = (n + KB - 1) / KB * KB;
  const int64_t dvf = dv / 8 * 8, dt = dv - dvf, dvp = dvf + 8;
  const int64_t nv = dvf / 8;
  buf.assign(n * dqk + dqk * Lp + Lp * dvf + dt * Lp + QB * Lp + QB * KB + QB * dvp + QB * dt * 8, 0.0f);
  float* qp = buf.data();          // (n, dqk): queries
  float* kt = qp + n * dqk;        // (dqk, Lp): keys transposed
  float* vp = kt + dqk * Lp;       // (Lp, dvf): values, whole vectors
  float* vt = vp + Lp * dvf;       // (dt, Lp): the last values, transposed
  float* brow = vt + dt * Lp;      // (QB, Lp): this block's bias rows
  float* w = brow + QB * Lp;       // (QB, KB): SiLU weights of one register block
  float* acc_o = w + QB * KB;      // (QB, dvp): output rows
  float* acc_t = acc_o + QB * dvp; // (QB, dt, 8): lane-wise sums for the last value columns
  for (int64_t j = 0; j < n; ++j) {
    copy_row(qp + j * dqk, q + j * q_stride, dqk);
    for (int64_t d = 0; d < dqk; ++d) kt[d * Lp + j] = k[j * k_stride + d];
    copy_row(vp + j * dvf, v + j * v_stride, dvf);
    for (int64_t c = 0; c < dt; ++c) vt[c * Lp + j] = v[j * v_stride + dvf + c];
  }
  if (silu_inputs) {  // the padding of kt, vp and vt is zero and SiLU(0) = 0
    silu_inplace(qp, n * dqk);
    silu_inplace(kt, dqk * Lp);
    silu_inplace(vp, Lp * dvf + dt * Lp);
  }
  if (q_scale != 1.0f)
    for (int64_t i = 0; i < n * dqk; ++i) qp[i] *= q_scale;
  const v8 lane_lo = v8{0, 1, 2, 3, 4, 5, 6, 7};
  const v8 lane_hi = lane_lo + splat(8.0f);
  for (int64_t i0 = first; i0 < n; i0 += QB) {
    const int64_t keys = std::min(i0 + QB, n);  // keys [0, keys) are visible to some query of the block
    const float* qr[QB];
    for (int r = 0; r < QB; ++r) {
      const int64_t i = std::min(i0 + r, n - 1);  // rows past the end repeat the last one (discarded)
      qr[r] = qp + i * dqk;
      if (bias) {
        std::memcpy(brow + r * Lp, bias + i * bias_stride, keys * sizeof(float));
        std::fill(brow + r * Lp + keys, brow + r * Lp + Lp, 0.0f);
      }
    }
    std::fill(acc_o, acc_o + QB * dvp + QB * dt * 8, 0.0f);  // and acc_t
    for (int64_t j0 = 0; j0 < keys; j0 += KB) {
      v8 s[QB][2];
      for (int r = 0; r < QB; ++r) {
        s[r][0] = bias ? load(brow + r * Lp + j0) : splat(0.0f);
        s[r][1] = bias ? load(brow + r * Lp + j0 + 8) : splat(0.0f);
      }
      for (int64_t d = 0; d < dqk; ++d) {
        const v8 k0 = load(kt + d * Lp + j0), k1 = load(kt + d * Lp + j0 + 8);
        for (int r = 0; r < QB; ++r) {
          const v8 qd = splat(qr[r][d]);
          s[r][0] += qd * k0;
          s[r][1] += qd * k1;
        }
      }
      const bool diagonal = j0 + KB > i0;  // some key of the block lies after some query
      for (int r = 0; r < QB; ++r) {
        v8 w0 = silu8(s[r][0]), w1 = silu8(s[r][1]);
        if (diagonal) {  // keep key j only if j <= i: exact zeros, as the stock path's mask multiply
          const v8 last = splat(static_cast<float>(i0 + r - j0));
          w0 = lane_lo <= last ? w0 : splat(0.0f);
          w1 = lane_hi <= last ? w1 : splat(0.0f);
        }
        store(w + r * KB, w0);
        store(w + r * KB + 8, w1);
        for (int64_t c = 0; c < dt; ++c) {
          float* a = acc_t + (r * dt + c) * 8;
          store(a, load(a) + w0 * load(vt + c * Lp + j0) + w1 * load(vt + c * Lp + j0 + 8));
        }
      }
      weighted_columns(w, vp + j0 * dvf, acc_o, std::min<int64_t>(KB, keys - j0), nv, dvf, dvp);
    }
    for (int r = 0; r < QB; ++r)
      for (int64_t c = 0; c < dt; ++c) acc_o[r * dvp + dvf + c] = hsum(load(acc_t + (r * dt + c) * 8));
    if (out_scale != 1.0f)
      for (int64_t c = 0; c < QB * dvp; c += 8) store(acc_o + c, load(acc_o + c) * splat(out_scale));
    for (int r = 0; r < QB && i0 + r < n; ++r)
      copy_row(out + (i0 + r - first) * out_stride, acc_o + r * dvp, dv);
  }
  for (int64_t i = n; i < zero_rows; ++i) std::memset(out + i * out_stride, 0, dv * sizeof(float));
}

// a[r] += rows[r, :d] @ colsT[:d, 16 columns] for the QB rows of a block (rows packed d apart; colsT
// transposed, Lp apart, at the block's first column): the backward's scores and g . v products.
inline void block_products(const float* rows, const float* colsT, int64_t d, int64_t Lp, v8 (&out)[QB][2]) {
  v8 a[QB][2];  // local: provably not aliased by the loads, so it stays in registers
  for (int r = 0; r < QB; ++r) a[r][0] = out[r][0], a[r][1] = out[r][1];
  for (int64_t c = 0; c < d; ++c) {
    const v8 x0 = load(colsT + c * Lp), x1 = load(colsT + c * Lp + 8);
    for (int r = 0; r < QB; ++r) {
      const v8 rc = splat(rows[r * d + c]);
      a[r][0] += rc * x0;
      a[r][1] += rc * x1;
    }
  }
  for (int r = 0; r < QB; ++r) out[r][0] = a[r][0], out[r][1] = a[r][1];
}

// accT (d x KB, a key block's gradient transposed) += rows[:QB, :d]^T @ w (QB x 16, in registers)
inline void block_outer(float* accT, const float* rows, int64_t d, const v8 (&weights)[QB][2]) {
  v8 w[QB][2];  // local: the stores to accT cannot alias it, so it stays in registers
  for (int r = 0; r < QB; ++r) w[r][0] = weights[r][0], w[r][1] = weights[r][1];
  for (int64_t c = 0; c < d; ++c) {
    v8 acc0 = load(accT + c * KB), acc1 = load(accT + c * KB + 8);
    for (int r = 0; r < QB; ++r) {
      const v8 rc = splat(rows[r * d + c]);
      acc0 += rc * w[r][0];
      acc1 += rc * w[r][1];
    }
    store(accT + c * KB, acc0);
    store(accT + c * KB + 8, acc1);
  }
}

// The gradients of one (batch row, head) of causal_silu_attention, given g = dL/d out (same layout as out):
//   s_ij = q_i . k_j + bias_ij,  w_ij = SiLU(s_ij),  ds_ij = (g_i . v_j) SiLU'(s_ij)      for j <= i < n
//   dv_j = sum_i w_ij g_i,  dk_j = sum_i ds_ij q_i,  dq_i = sum_j ds_ij k_j,  dbias_ij += ds_ij
// Keys go 16 at a time (outer loop) and queries 6 at a time from the key block's diagonal on (inner loop),
// as in the forward: the 6 x 16 scores and g . v products are recomputed in registers, and w (kept in
// registers) and ds (through L1) are multiplied at once into the key block's dv and dk, held transposed
// (d x 16) in L1, while dq accumulates per query row across key blocks (whole vectors as the forward's
// weighted sum, the last dqk % 8 columns lane-wise). Nothing of size n x n is stored. dbias (row stride
// bias_stride) is accumulated into, not overwritten: the caller gives each thread its own or sums heads.
// Output rows [n, ...) are not touched (the caller zero-fills them).
void attention_backward_task(const float* q, const float* k, const float* v, const float* g, const float* bias,
                             float* dq, float* dk, float* dvo, float* dbias, int64_t n, int64_t Lb, int64_t dqk,
                             int64_t dv, int64_t q_stride, int64_t k_stride, int64_t v_stride, int64_t g_stride,
                             int64_t bias_stride, int64_t dq_stride, int64_t dk_stride, int64_t dv_stride,
                             float g_scale, std::vector<float>& buf) {
  if (n <= 0) return;
  const int64_t Lp = (n + KB - 1) / KB * KB, Np = (n + QB - 1) / QB * QB;
  const int64_t dqf = dqk / 8 * 8, dqt = dqk - dqf, dqp = dqf + 8, nq = dqf / 8;
  buf.assign(Np * dqk + Np * dv + dqk * Lp + dv * Lp + Lp * dqf + Np * dqp + Np * dqt * 8 + 2 * QB * KB +
                 (dqk + dv) * KB + QB * KB, 0.0f);
  float* qp = buf.data();          // (Np, dqk): queries, rows past n zero
  float* gp = qp + Np * dqk;       // (Np, dv): output gradients, rows past n zero
  float* kt = gp + Np * dv;        // (dqk, Lp): keys transposed
  float* vt = kt + dqk * Lp;       // (dv, Lp): values transposed
  float* kr = vt + dv * Lp;        // (Lp, dqf): keys, whole vectors of columns (dq's weighted sum)
  float* dqa = kr + Lp * dqf;      // (Np, dqp): dq accumulators
  float* dqt_acc = dqa + Np * dqp; // (Np, dqt, 8): lane-wise dq accumulators of the last columns
  float* dwb = dqt_acc + Np * dqt * 8;  // (QB, KB): g . v of one block
  float* dsb = dwb + QB * KB;      // (QB, KB): ds of one block
  float* dkT = dsb + QB * KB;      // (dqk, KB): the key block's dk, transposed
  float* dvT = dkT + dqk * KB;     // (dv, KB): its dv, transposed
  float* bblk = dvT + dv * KB;     // (QB, KB): bias block cut at the bias's last column
  for (int64_t j = 0; j < n; ++j) {
    copy_row(qp + j * dqk, q + j * q_stride, dqk);
    copy_row(gp + j * dv, g + j * g_stride, dv);
    if (g_scale != 1.0f)
      for (int64_t c = 0; c < dv; ++c) gp[j * dv + c] *= g_scale;
    copy_row(kr + j * dqf, k + j * k_stride, dqf);
    for (int64_t d = 0; d < dqk; ++d) kt[d * Lp + j] = k[j * k_stride + d];
    for (int64_t c = 0; c < dv; ++c) vt[c * Lp + j] = v[j * v_stride + c];
  }
  const v8 lane_lo = v8{0, 1, 2, 3, 4, 5, 6, 7};
  const v8 lane_hi = lane_lo + splat(8.0f);
  for (int64_t j0 = 0; j0 < n; j0 += KB) {
    std::fill(dkT, dkT + (dqk + dv) * KB, 0.0f);  // and dvT
    const int64_t jn = std::min<int64_t>(KB, n - j0);
    const int64_t bcols = std::min<int64_t>(KB, Lb - j0);  // bias columns that exist in this block (Lb: its width)
    for (int64_t i0 = j0 / QB * QB; i0 < n; i0 += QB) {
      // g . v for the block
      v8 a[QB][2];
      for (int r = 0; r < QB; ++r) a[r][0] = a[r][1] = splat(0.0f);
      block_products(gp + i0 * dv, vt + j0, dv, Lp, a);
      for (int r = 0; r < QB; ++r) {
        store(dwb + r * KB, a[r][0]);
        store(dwb + r * KB + 8, a[r][1]);
      }
      // scores
      v8 s[QB][2];
      for (int r = 0; r < QB; ++r) {
        const int64_t i = i0 + r;
        if (!bias || i >= n) {
          s[r][0] = s[r][1] = splat(0.0f);
        } else if (bcols == KB) {
          s[r][0] = load(bias + i * bias_stride + j0);
          s[r][1] = load(bias + i * bias_stride + j0 + 8);
        } else {
          std::fill(bblk, bblk + KB, 0.0f);
          std::memcpy(bblk, bias + i * bias_stride + j0, bcols * sizeof(float));
          s[r][0] = load(bblk);
          s[r][1] = load(bblk + 8);
        }
      }
      block_products(qp + i0 * dqk, kt + j0, dqk, Lp, s);
      // w = SiLU(s) (kept in s), ds = (g . v) SiLU'(s) = (g . v) (sig + w (1 - sig)); zero past the diagonal.
      // Rows past n give zero by themselves: their q, g and bias are zero, so s = 0, w = 0 and g . v = 0.
      const bool masked = j0 + KB > i0 + 1;
      for (int r = 0; r < QB; ++r) {
        const v8 last = splat(static_cast<float>(i0 + r - j0));
        for (int half = 0; half < 2; ++half) {
          const v8 x = s[r][half];
          const v8 sig = sigmoid8(x);
          v8 w = vmax(splat(-88.0f), x) * sig;
          v8 ds = load(dwb + r * KB + 8 * half) * (sig + w * (splat(1.0f) - sig));
          if (masked) {
            const v8 lane = half ? lane_hi : lane_lo;
            w = lane <= last ? w : splat(0.0f);
            ds = lane <= last ? ds : splat(0.0f);
          }
          s[r][half] = w;
          store(dsb + r * KB + 8 * half, ds);
        }
        for (int64_t c = 0; c < dqt; ++c) {  // the last dq columns, keys along the lanes
          float* acc = dqt_acc + ((i0 + r) * dqt + c) * 8;
          store(acc, load(acc) + load(dsb + r * KB) * load(kt + (dqf + c) * Lp + j0) +
                         load(dsb + r * KB + 8) * load(kt + (dqf + c) * Lp + j0 + 8));
        }
      }
      block_outer(dvT, gp + i0 * dv, dv, s);  // dv (transposed) += g^T w, w in registers
      for (int r = 0; r < QB; ++r) {
        s[r][0] = load(dsb + r * KB);
        s[r][1] = load(dsb + r * KB + 8);
      }
      block_outer(dkT, qp + i0 * dqk, dqk, s);  // dk (transposed) += q^T ds
      if (dbias)
        for (int r = 0; r < QB && i0 + r < n; ++r) {
          float* row = dbias + (i0 + r) * bias_stride + j0;
          if (bcols == KB) {  // whole vectors (ds is zero right of the diagonal: adding it changes nothing)
            store(row, load(row) + load(dsb + r * KB));
            store(row + 8, load(row + 8) + load(dsb + r * KB + 8));
            continue;
          }
          const int64_t cols = std::min<int64_t>(i0 + r - j0 + 1, bcols);
          for (int64_t jj = 0; jj < cols; ++jj) row[jj] += dsb[r * KB + jj];
        }
      weighted_columns(dsb, kr + j0 * dqf, dqa + i0 * dqp, jn, nq, dqf, dqp);  // dq += ds k, whole vectors
    }
    for (int64_t jj = 0; jj < jn; ++jj) {
      for (int64_t d = 0; d < dqk; ++d) dk[(j0 + jj) * dk_stride + d] = dkT[d * KB + jj];
      for (int64_t c = 0; c < dv; ++c) dvo[(j0 + jj) * dv_stride + c] = dvT[c * KB + jj];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(dq + i * dq_stride, dqa + i * dqp, dqf * sizeof(float));
    for (int64_t c = 0; c < dqt; ++c) dq[i * dq_stride + dqf + c] = hsum(load(dqt_acc + (i * dqt + c) * 8));
  }
}

// Runs task(b, h, buffer) for every (batch row, head), longest rows first, handed out one at a time: a
// static split of length-sorted rows (as evaluation batches come) would give one thread all the long ones.
template <typename Task>
void for_each_row_head(const int64_t* lengths, int64_t B, int64_t H, Task&& task) {
  std::vector<int64_t> rows(B);
  for (int64_t b = 0; b < B; ++b) rows[b] = b;
  std::stable_sort(rows.begin(), rows.end(), [&](int64_t x, int64_t y) { return lengths[x] > lengths[y]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), B * H);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf;
    for (int64_t t = next++; t < B * H; t = next++) task(rows[t / H], t % H, buf);
  });
}


// C <= 8 NV values of a row into registers (zero beyond C), and back.
template <int NV>
inline void load_row(const float* p, int64_t C, v8 (&x)[NV]) {
  for (int c = 0; c < NV; ++c) {
    const int64_t left = C - 8 * c;
    x[c] = left >= 8 ? load(p + 8 * c) : load_first(p + 8 * c, left);
  }
}

template <int NV>
inline void store_row(float* p, int64_t C, const v8 (&x)[NV]) {
  for (int c = 0; c < NV; ++c) {
    const int64_t left = C - 8 * c;
    if (left >= 8)
      store(p + 8 * c, x[c]);
    else
      store_first(p + 8 * c, left, x[c]);
  }
}

// y <- LayerNorm(x * scale), no affine, biased variance (two passes, as torch's), then times SiLU(u) when u
// is given; C <= 8 NV values held in registers (y may be x).
template <int NV>
void norm_row(const float* x, const float* u, float* y, int64_t C, float scale, float eps) {
  v8 r[NV];
  load_row(x, C, r);
  v8 acc = splat(0.0f);
  for (int c = 0; c < NV; ++c) {
    r[c] = r[c] * splat(scale);
    acc += r[c];
  }
  const float mean = hsum(acc) / C;
  const v8 lane = v8{0, 1, 2, 3, 4, 5, 6, 7};
  acc = splat(0.0f);
  for (int c = 0; c < NV; ++c) {
    v8 d = r[c] - splat(mean);
    if (8 * c + 8 > C) d = lane < splat(static_cast<float>(C - 8 * c)) ? d : splat(0.0f);
    r[c] = d;
    acc += d * d;
  }
  const v8 rstd = splat(1.0f / std::sqrt(hsum(acc) / C + eps));
  if (u) {
    v8 g[NV];
    load_row(u, C, g);
    for (int c = 0; c < NV; ++c) r[c] = silu8(g[c]) * (r[c] * rstd);
  } else {
    for (int c = 0; c < NV; ++c) r[c] = r[c] * rstd;
  }
  store_row(y, C, r);
}

// The same for any C: values through tmp (2 * Cp floats, Cp = C rounded up to whole vectors).
void norm_row_any(const float* x, const float* u, float* y, int64_t C, float scale, float eps, float* tmp) {
  const int64_t Cp = (C + 7) / 8 * 8;
  float* r = tmp;
  float* g = tmp + Cp;
  std::memcpy(r, x, C * sizeof(float));
  std::fill(r + C, r + Cp, 0.0f);
  v8 acc = splat(0.0f);
  for (int64_t c = 0; c < Cp; c += 8) {
    const v8 xc = load(r + c) * splat(scale);
    store(r + c, xc);
    acc += xc;
  }
  const float mean = hsum(acc) / C;
  std::fill(r + C, r + Cp, mean);  // padding lanes add nothing to the variance
  acc = splat(0.0f);
  for (int64_t c = 0; c < Cp; c += 8) {
    const v8 d = load(r + c) - splat(mean);
    acc += d * d;
  }
  const v8 rstd = splat(1.0f / std::sqrt(hsum(acc) / C + eps));
  if (u) {
    std::memcpy(g, u, C * sizeof(float));
    std::fill(g + C, g + Cp, 0.0f);
    for (int64_t c = 0; c < Cp; c += 8) store(r + c, silu8(load(g + c)) * ((load(r + c) - splat(mean)) * rstd));
  } else {
    for (int64_t c = 0; c < Cp; c += 8) store(r + c, (load(r + c) - splat(mean)) * rstd);
  }
  std::memcpy(y, r, C * sizeof(float));
}

void norm_row_dispatch(const float* x, const float* u, float* y, int64_t C, float scale, float eps, float* tmp) {
  if (C > 64)
    norm_row_any(x, u, y, C, scale, eps, tmp);
  else
    with_vectors<8>((C + 7) / 8, [&](auto nv) { norm_row<decltype(nv)::value>(x, u, y, C, scale, eps); });
}

void check_cpu(std::initializer_list<const torch::Tensor*> tensors) {
  for (const auto* t : tensors) TORCH_CHECK(t->device().is_cpu(), "the CPU kernel takes CPU tensors");
}

void check_bias(const torch::Tensor& bias, int64_t B, int64_t L) {
  TORCH_CHECK(bias.dim() == 3 && (bias.size(0) == B || bias.size(0) == 1) && bias.size(1) >= L &&
              bias.size(2) == bias.size(1) && bias.is_contiguous() && bias.scalar_type() == torch::kFloat32,
              "bias must be a contiguous float32 (B or 1, L, L) tensor");
}

// Where each batch row's positions are in q, k, v, grad and the outputs. Either the (B, L, H, d) grid (row b
// at b * stride(0), positions stride(1) apart, heads stride(2)) or, for 3-dimensional q, packed tokens
// (N, H, d) with ``starts`` (row b's positions are tokens starts[b] ..., stride(0) apart, heads stride(1)).
// Checks shapes, dtypes and that packed rows do not overlap.
struct Rows {
  bool packed = false;
  int64_t B = 0, L = 0, H = 0, N = 0;  // L: positions per grid row, or the longest packed row
  int64_t dqk = 0, dv = 0;
  std::vector<int64_t> n, start;       // real positions of each row; its first token (packed)
  bool covered = false;                // packed: every token belongs to a row

  int64_t base(const torch::Tensor& t, int64_t b, int64_t h) const {
    return packed ? start[b] * t.stride(0) + h * t.stride(1) : b * t.stride(0) + h * t.stride(2);
  }
  int64_t step(const torch::Tensor& t) const { return packed ? t.stride(0) : t.stride(1); }
  torch::Tensor zeros_or_empty(int64_t d, const torch::Tensor& like, bool need_zero_padding) const {
    auto opts = like.options();
    if (packed) return covered || !need_zero_padding ? torch::empty({N, H, d}, opts) : torch::zeros({N, H, d}, opts);
    return need_zero_padding ? torch::zeros({B, L, H, d}, opts) : torch::empty({B, L, H, d}, opts);
  }
};

Rows rows_of(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor* grad,
             const torch::Tensor& lengths, const torch::Tensor& starts,
             torch::ScalarType qkv_type = torch::kFloat32) {
  Rows r;
  r.packed = q.dim() == 3;
  const int64_t dims = r.packed ? 3 : 4;
  const char* shape = r.packed ? "(N, H, d) with starts" : "(B, L, H, d)";
  for (const auto* t : {&q, &k, &v, grad}) {
    if (!t) continue;
    TORCH_CHECK(t->dim() == dims, "q, k, v", grad ? ", grad" : "", " must be ", shape);
    TORCH_CHECK(t->scalar_type() == (t == grad ? torch::kFloat32 : qkv_type), "the CPU kernel takes ",
                t == grad || qkv_type == torch::kFloat32 ? "float32" : "bfloat16 q, k, v");
    TORCH_CHECK(t->device().is_cpu(), "the CPU kernel takes CPU tensors");
    TORCH_CHECK(t->numel() == 0 || t->size(dims - 1) <= 1 || t->stride(dims - 1) == 1, "the last dimension of q, k, v",
                grad ? ", grad" : "", " must be contiguous");
  }
  TORCH_CHECK(lengths.device().is_cpu() && starts.device().is_cpu(), "lengths and starts must be CPU tensors");
  auto len = lengths.to(torch::kInt64).contiguous();
  r.B = r.packed ? len.numel() : q.size(0);
  TORCH_CHECK(len.numel() == r.B, "lengths must have one entry per batch row");
  r.H = q.size(dims - 2);
  r.dqk = q.size(dims - 1);
  r.dv = v.size(dims - 1);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes().slice(0, dims - 1) == q.sizes().slice(0, dims - 1) &&
              (!grad || grad->sizes() == v.sizes()), "shape mismatch between q, k, v", grad ? " and grad" : "");
  const int64_t* lp = len.data_ptr<int64_t>();
  r.n.resize(r.B);
  if (r.packed) {
    auto st = starts.to(torch::kInt64).contiguous();
    TORCH_CHECK(st.numel() == r.B, "starts and lengths must have one entry per batch row");
    const int64_t* sp = st.data_ptr<int64_t>();
    r.N = q.size(0);
    r.start.assign(sp, sp + r.B);
    int64_t total = 0;
    for (int64_t b = 0; b < r.B; ++b) {
      TORCH_CHECK(lp[b] >= 0 && sp[b] >= 0 && sp[b] + lp[b] <= r.N, "batch row ", b, " runs past the tokens");
      r.n[b] = lp[b];
      r.L = std::max(r.L, lp[b]);
      total += lp[b];
    }
    std::vector<int64_t> by_start(r.B);
    for (int64_t b = 0; b < r.B; ++b) by_start[b] = b;
    std::sort(by_start.begin(), by_start.end(), [&](int64_t x, int64_t y) { return sp[x] < sp[y]; });
    for (int64_t i = 1; i < r.B; ++i)
      TORCH_CHECK(sp[by_start[i]] >= sp[by_start[i - 1]] + lp[by_start[i - 1]], "batch rows ", by_start[i - 1],
                  " and ", by_start[i], " share tokens");
    r.covered = total == r.N;
  } else {
    r.L = q.size(1);
    for (int64_t b = 0; b < r.B; ++b) r.n[b] = std::max<int64_t>(0, std::min(lp[b], r.L));
  }
  return r;
}

// The bias of row b (its rows bias.size(1) apart), or null.
const float* bias_of(const torch::Tensor& bias, int64_t b) {
  if (bias.numel() == 0) return nullptr;
  const int64_t Lb = bias.size(1);
  return bias.data_ptr<float>() + (bias.size(0) > 1 ? b : 0) * Lb * Lb;
}

// Runs task(b, dbias_b, buffer) for every batch row b (the backward of its heads), longest rows first as
// threads free up, and returns the bias gradient (shaped as the bias; empty without want_dbias). dbias_b is
// where row b's gradient goes (null without want_dbias): its own slice of a per-row bias, so one writer; a
// bias shared by the batch gets one gradient buffer per worker slot, summed at the end, and then rows go to
// slots round-robin (a fixed summation order: the same gradient in every run with the same thread count).
template <typename Task>
torch::Tensor backward_rows(const Rows& rows, const torch::Tensor& bias, bool want_dbias, Task&& task) {
  const int64_t B = rows.B, Lb = bias.numel() > 0 ? bias.size(1) : 0;
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  const bool shared = want_dbias && bias.size(0) == 1 && B > 1;
  auto dbias = want_dbias ? torch::zeros_like(bias) : torch::empty({0}, options);
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return rows.n[x] > rows.n[y]; });
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  // a shared bias: one Lb x Lb gradient per worker slot (slot 0 is dbias itself)
  std::vector<torch::Tensor> partial;
  for (int64_t w = 1; shared && w < workers; ++w) partial.push_back(torch::zeros({Lb, Lb}, options));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t slot, int64_t slot_end) {
    std::vector<float> buf;
    float* db_shared = shared ? (slot == 0 ? dbias.data_ptr<float>() : partial[slot - 1].data_ptr<float>()) : nullptr;
    // shared: slots [slot, slot_end) of this thread (all of them when parallel_for runs inline) in turn
    auto first = [&]() { return shared ? slot : next++; };
    auto after = [&](int64_t t) {
      if (!shared) return next++;
      if (t + workers < B) return t + workers;
      if (++slot >= slot_end) return B;
      db_shared = partial[slot - 1].data_ptr<float>();
      return slot;
    };
    for (int64_t t = first(); t < B; t = after(t)) {
      const int64_t b = order[t];
      task(b, !want_dbias ? nullptr : shared ? db_shared : const_cast<float*>(bias_of(dbias, b)), buf);
    }
  });
  for (auto& p : partial) dbias[0].add_(p);
  return dbias;
}

#include "attention_bf16.h"

}  // namespace

// q, k: (B, L, H, dqk), v: (B, L, H, dv), float32, last dimension contiguous (views of one projection are
// fine); bias: (B or 1, Lb, Lb), Lb >= L, contiguous, or an empty tensor; lengths: (B,) integers. Returns
// (B, L, H, dv), zero at padding positions; ``starts`` is then ignored (pass an empty tensor). With q, k
// (N, H, dqk), v (N, H, dv): packed tokens instead, row b's positions at tokens starts[b] .. starts[b] +
// lengths[b] - 1 (rows may not share tokens); returns (N, H, dv) (zero at tokens of no row). The output is
// multiplied by ``scale`` (HSTU's normaliser 1 / n, folded in: no separate pass over it).
torch::Tensor causal_silu_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor bias,
                                    torch::Tensor lengths, torch::Tensor starts, double scale) {
  const Rows rows = rows_of(q, k, v, nullptr, lengths, starts);
  check_cpu({&bias});
  if (bias.numel() > 0) check_bias(bias, rows.B, rows.L);
  auto out = rows.zeros_or_empty(rows.dv, q, rows.packed);  // the grid's padding rows are zeroed by the tasks
  const int64_t Lb = bias.numel() > 0 ? bias.size(1) : 0;
  for_each_row_head(rows.n.data(), rows.B, rows.H, [&](int64_t b, int64_t h, std::vector<float>& buf) {
    attention_task(q.data_ptr<float>() + rows.base(q, b, h), k.data_ptr<float>() + rows.base(k, b, h),
                   v.data_ptr<float>() + rows.base(v, b, h), bias_of(bias, b),
                   out.data_ptr<float>() + rows.base(out, b, h), rows.n[b], rows.packed ? rows.n[b] : rows.L,
                   rows.dqk, rows.dv, rows.step(q), rows.step(k), rows.step(v), Lb, rows.step(out), false, 1.0f,
                   0, static_cast<float>(scale), buf);
  });
  return out;
}

// The gradients of causal_silu_attention: grad (the output's layout and shape) float32 with a contiguous last
// dimension; the other arguments as the forward's. Returns dq, dk, dv in the layout of q, k, v (contiguous;
// zero at padding positions) and, when bias_grad and a bias is given, dbias shaped as the bias (otherwise an
// empty tensor). One task per batch row, its heads in turn, scheduled by backward_rows (which also says how
// the bias gradient is summed). ``scale`` as the forward's (grad is
// multiplied by it as it is read). ``into``: empty, or three float32 tensors shaped as q, k, v (views with a
// contiguous last dimension, e.g. column slices of one (N, W) gradient) that receive dq, dk, dv instead of
// new tensors (then returned).
std::vector<torch::Tensor> causal_silu_attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                          torch::Tensor bias, torch::Tensor lengths,
                                                          torch::Tensor starts, torch::Tensor grad,
                                                          bool bias_grad, double scale,
                                                          std::vector<torch::Tensor> into) {
  const Rows rows = rows_of(q, k, v, &grad, lengths, starts);
  check_cpu({&bias});
  const bool has_bias = bias.numel() > 0;
  if (has_bias) check_bias(bias, rows.B, rows.L);
  const int64_t H = rows.H, Lb = has_bias ? bias.size(1) : 0;
  TORCH_CHECK(into.empty() || into.size() == 3, "into: no tensors or three (dq, dk, dv)");
  if (!into.empty()) {
    const torch::Tensor* like[3] = {&q, &k, &v};
    for (int i = 0; i < 3; ++i) {
      const auto& t = into[i];
      TORCH_CHECK(t.sizes() == like[i]->sizes() && t.scalar_type() == torch::kFloat32 && t.device().is_cpu() &&
                  t.stride(-1) == 1 && t.stride(-2) == t.size(-1), "into: float32 CPU tensors shaped as q, k, v "
                  "with each head's values contiguous");
      if (!(rows.packed && rows.covered)) into[i].zero_();  // positions of no row get zero, as allocated ones
    }
  }
  auto dq = into.empty() ? rows.zeros_or_empty(rows.dqk, q, true) : into[0];
  auto dk = into.empty() ? rows.zeros_or_empty(rows.dqk, q, true) : into[1];
  auto dv = into.empty() ? rows.zeros_or_empty(rows.dv, q, true) : into[2];
  auto dbias = backward_rows(rows, bias, has_bias && bias_grad, [&](int64_t b, float* db, std::vector<float>& buf) {
    for (int64_t h = 0; h < H; ++h)
      attention_backward_task(q.data_ptr<float>() + rows.base(q, b, h), k.data_ptr<float>() + rows.base(k, b, h),
                              v.data_ptr<float>() + rows.base(v, b, h), grad.data_ptr<float>() + rows.base(grad, b, h),
                              bias_of(bias, b), dq.data_ptr<float>() + rows.base(dq, b, h),
                              dk.data_ptr<float>() + rows.base(dk, b, h), dv.data_ptr<float>() + rows.base(dv, b, h),
                              db, rows.n[b], Lb, rows.dqk, rows.dv, rows.step(q), rows.step(k), rows.step(v),
                              rows.step(grad), Lb, rows.step(dq), rows.step(dk), rows.step(dv),
                              static_cast<float>(scale), buf);
  });
  return {dq, dk, dv, dbias};
}

namespace {

// The V, Q, K column views (N, H, d) of a raw (N, W) projection, columns U | V | Q | K, and their rows.
struct Projection {
  torch::Tensor v, q, k;
  Rows rows;
  Projection(const torch::Tensor& raw, const torch::Tensor& lengths, const torch::Tensor& starts,
             const torch::Tensor* grad, int64_t H, int64_t dqk, int64_t dv) {
    TORCH_CHECK(raw.dim() == 2 && raw.is_contiguous() && raw.scalar_type() == torch::kBFloat16 && raw.device().is_cpu(),
                "raw must be a contiguous bfloat16 (N, W) CPU tensor");
    TORCH_CHECK(H > 0 && dqk > 0 && dv > 0 && raw.size(1) == 2 * H * dv + 2 * H * dqk, "raw has ", raw.size(1),
                " columns; expected 2 H dv + 2 H dqk");
    const int64_t N = raw.size(0);
    v = raw.narrow(1, H * dv, H * dv).view({N, H, dv});
    q = raw.narrow(1, 2 * H * dv, H * dqk).view({N, H, dqk});
    k = raw.narrow(1, 2 * H * dv + H * dqk, H * dqk).view({N, H, dqk});
    rows = rows_of(q, k, v, grad, lengths, starts, torch::kBFloat16);
  }
};

inline const uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

}  // namespace

bool has_bf16_attention() {
#ifdef GENREC_BF16_DOT
  return true;
#else
  return false;
#endif
}

// The training middle of an HSTU layer (SiLU on U, V, Q, K; no query scale) under bf16 autocast, on bf16 dot
// products: raw (N, W) contiguous bfloat16, the layer's projection before SiLU, columns U | V | Q | K (heads
// adjacent within each), packed tokens (row b: tokens starts[b] .. starts[b] + lengths[b] - 1); returns
// [SiLU(U), causal_silu_attention(SiLU(Q), SiLU(K), SiLU(V), bias) * scale], both (N, H * dv) float32, the
// second zero at tokens of no row. bias as causal_silu_attention's. Only where has_bf16_attention()
// (AVX512-BF16).
std::vector<torch::Tensor> silu_attention_bf16(torch::Tensor raw, torch::Tensor bias, torch::Tensor lengths,
                                               torch::Tensor starts, int64_t H, int64_t dqk, int64_t dv,
                                               double scale) {
#ifdef GENREC_BF16_DOT
  const Projection p(raw, lengths, starts, nullptr, H, dqk, dv);
  const Rows& rows = p.rows;
  check_cpu({&bias});
  if (bias.numel() > 0) check_bias(bias, rows.B, rows.L);
  const int64_t Lb = bias.numel() > 0 ? bias.size(1) : 0, N = raw.size(0);
  auto out = rows.covered ? torch::empty({N, H * dv}, raw.options().dtype(torch::kFloat32))
                          : torch::zeros({N, H * dv}, raw.options().dtype(torch::kFloat32));
  auto u = torch::empty({N, H * dv}, out.options());
  silu_columns(bf16_ptr(raw), N, raw.size(1), H * dv, u.data_ptr<float>());
  for_each_row_head(rows.n.data(), rows.B, H, [&](int64_t b, int64_t h, std::vector<float>& buf) {
    if (rows.n[b] == 0) return;
    attention_task_bf16(bf16_ptr(p.q) + rows.base(p.q, b, h), bf16_ptr(p.k) + rows.base(p.k, b, h),
                        bf16_ptr(p.v) + rows.base(p.v, b, h), bias_of(bias, b),
                        out.data_ptr<float>() + rows.start[b] * H * dv + h * dv, rows.n[b], dqk, dv, raw.size(1),
                        Lb, H * dv, static_cast<float>(scale), buf);
  });
  return {u, out};
#else
  TORCH_CHECK(false, "silu_attention_bf16 needs a CPU with AVX512-BF16 (has_bf16_attention() is false)");
  return {};
#endif
}

// Its backward: du, grad = dL/d of the two outputs, (N, H * dv) float32 contiguous (du may be empty: no
// gradient through U); draw, the raw projection's gradient ((N, W) contiguous bfloat16), receives dU, dV, dQ
// and dK times SiLU'(raw) (dV, dQ, dK zero at tokens of no row). Returns the bias gradient when bias_grad and
// a bias is given, else an empty tensor. ``scale`` as the forward's.
torch::Tensor silu_attention_bf16_backward(torch::Tensor raw, torch::Tensor bias, torch::Tensor lengths,
                                           torch::Tensor starts, torch::Tensor du, torch::Tensor grad, bool bias_grad,
                                           double scale, torch::Tensor draw, int64_t H, int64_t dqk, int64_t dv) {
#ifdef GENREC_BF16_DOT
  TORCH_CHECK(du.numel() == 0 || (du.sizes() == grad.sizes() && du.scalar_type() == torch::kFloat32 &&
              du.is_contiguous() && du.device().is_cpu()), "du must be empty or a contiguous float32 CPU tensor "
              "shaped as grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == raw.size(0) && grad.size(1) == H * dv &&
              grad.scalar_type() == torch::kFloat32 && grad.stride(1) == 1 && grad.device().is_cpu(),
              "grad must be a float32 (N, H * dv) CPU tensor with a contiguous last dimension");
  TORCH_CHECK(draw.sizes() == raw.sizes() && draw.is_contiguous() && draw.scalar_type() == torch::kBFloat16 &&
              draw.device().is_cpu(), "draw must be a contiguous bfloat16 CPU tensor shaped as raw");
  const int64_t N = raw.size(0);
  const auto g3 = grad.view({N, H, dv});
  const Projection p(raw, lengths, starts, &g3, H, dqk, dv);
  const Rows& rows = p.rows;
  check_cpu({&bias});
  const bool has_bias = bias.numel() > 0;
  if (has_bias) check_bias(bias, rows.B, rows.L);
  const int64_t Lb = has_bias ? bias.size(1) : 0, W = raw.size(1);
  if (!rows.covered) draw.narrow(1, H * dv, W - H * dv).zero_();
  auto* out = reinterpret_cast<uint16_t*>(draw.data_ptr<at::BFloat16>());
  silu_grad_columns(bf16_ptr(raw), du.numel() ? du.data_ptr<float>() : nullptr, N, W, H * dv, out);
  return backward_rows(rows, bias, has_bias && bias_grad, [&](int64_t b, float* db, std::vector<float>& buf) {
    const int64_t t0 = rows.start[b] * W;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t v0 = H * dv + h * dv, q0 = 2 * H * dv + h * dqk, k0 = 2 * H * dv + H * dqk + h * dqk;
      const uint16_t* x = bf16_ptr(raw) + t0;
      const float* g = grad.data_ptr<float>() + rows.start[b] * grad.stride(0) + h * dv;
      attention_backward_task_bf16(x + q0, x + k0, x + v0, g, bias_of(bias, b), out + t0 + q0, out + t0 + k0,
                                   out + t0 + v0, db, rows.n[b], Lb, dqk, dv, W, grad.stride(0),
                                   static_cast<float>(scale), buf);
    }
  });
#else
  TORCH_CHECK(false, "silu_attention_bf16_backward needs a CPU with AVX512-BF16 (has_bf16_attention() is false)");
  return {};
#endif
}

// The middle of an HSTU layer at inference, from the raw projection to the gated, normalised attention:
//   U, V, Q, K = split(SiLU(uvqk));  O = causal_silu_attention(Q * q_scale, K, V, bias) * inv_norm
//   returns SiLU(U) * LayerNorm(O)   (no affine), (N, H * dv)
// uvqk: (N, 2 H dv + 2 H dqk) contiguous float32, columns U | V | Q | K, heads adjacent within each; the
// tokens of batch row b are rows starts[b] .. starts[b] + lengths[b] (packed tokens, or a (B * L) grid).
// Rows of no batch row's range come out zero. One pass over the projection instead of the stock path's
// SiLU, unpack, attention, pack, divide, layer norm and multiply. With ``last_only`` only each batch row's
// last token is a query (next-item prediction's final layer): the result is (B, H * dv), zero for empty rows.
// bias: (B or 1, Lb, Lb) with Lb >= the longest row, a (2 M - 1) relative-position table (bias(i, j) =
// table[M - 1 + j - i], M >= the longest row: no (L, L) tensor to build per call), or empty.
torch::Tensor hstu_attention_gate(torch::Tensor uvqk, torch::Tensor starts, torch::Tensor lengths,
                                  torch::Tensor bias, int64_t H, int64_t dqk, int64_t dv, double q_scale,
                                  double inv_norm, double eps, bool last_only) {
  TORCH_CHECK(uvqk.dim() == 2 && uvqk.is_contiguous() && uvqk.scalar_type() == torch::kFloat32,
              "uvqk must be a contiguous float32 (N, W) tensor");
  check_cpu({&uvqk, &starts, &lengths, &bias});
  const int64_t N = uvqk.size(0), W = uvqk.size(1), C = H * dv;
  TORCH_CHECK(W == 2 * H * dv + 2 * H * dqk, "uvqk has ", W, " columns; expected 2 H dv + 2 H dqk");
  auto len = lengths.to(torch::kInt64).contiguous();
  auto st = starts.to(torch::kInt64).contiguous();
  const int64_t B = len.numel();
  TORCH_CHECK(st.numel() == B, "starts and lengths must have one entry per batch row");
  const int64_t* lp = len.data_ptr<int64_t>();
  const int64_t* sp = st.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && sp[b] >= 0 && sp[b] + lp[b] <= N, "batch row ", b, " runs past the projection");
    longest = std::max(longest, lp[b]);
  }
  const bool has_bias = bias.numel() > 0, table = has_bias && bias.dim() == 1;
  if (table) {
    TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == torch::kFloat32 && bias.numel() % 2 == 1 &&
                    (bias.numel() + 1) / 2 >= longest,
                "a 1-dimensional bias must be a contiguous float32 relative-position table of 2 M - 1 entries, "
                "M >= the longest row");
  } else if (has_bias) {
    check_bias(bias, B, longest);
  }
  // a (2 M - 1) table: bias(i, j) = table[M - 1 + j - i], i.e. row i starts at table + M - 1 - i (stride -1)
  const int64_t bias_stride = table ? -1 : has_bias ? bias.size(1) : 0;
  const int64_t row_offset = table ? (bias.numel() - 1) / 2 : 0;
  const int64_t row_size = !has_bias || table || bias.size(0) == 1 ? 0 : bias.size(1) * bias.size(1);
  auto out = torch::zeros({last_only ? B : N, C}, uvqk.options());
  const float* x = uvqk.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  for_each_row_head(lp, B, H, [&](int64_t b, int64_t h, std::vector<float>& buf) {
    const float* row = x + sp[b] * W;
    attention_task(row + 2 * C + h * dqk, row + 2 * C + H * dqk + h * dqk, row + C + h * dv,
                   bp ? bp + row_offset + b * row_size : nullptr,
                   op + (last_only ? b : sp[b]) * C + h * dv, lp[b], 0, dqk, dv, W, W, W, bias_stride, C, true,
                   static_cast<float>(q_scale), last_only ? std::max<int64_t>(lp[b] - 1, 0) : 0, 1.0f, buf);
  });
  std::vector<int64_t> tokens, rows;  // the query tokens and their output rows, split evenly between threads
  for (int64_t b = 0; b < B; ++b) {
    if (last_only && lp[b] > 0) {
      tokens.push_back(sp[b] + lp[b] - 1);
      rows.push_back(b);
    }
    for (int64_t t = sp[b]; !last_only && t < sp[b] + lp[b]; ++t) {
      tokens.push_back(t);
      rows.push_back(t);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(tokens.size()), 256, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(2 * ((C + 7) / 8 * 8));
    for (int64_t i = begin; i < end; ++i)
      norm_row_dispatch(op + rows[i] * C, x + tokens[i] * W, op + rows[i] * C, C, static_cast<float>(inv_norm),
                        static_cast<float>(eps), tmp.data());
  });
  return out;
}

// LayerNorm over the last dimension without affine parameters (HSTU's input norm), (N, C) contiguous float32.
torch::Tensor layer_norm(torch::Tensor x, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "layer_norm takes a contiguous float32 (N, C) tensor");
  check_cpu({&x});
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(C > 0, "layer_norm needs at least one column");
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(2 * ((C + 7) / 8 * 8));
    for (int64_t i = begin; i < end; ++i)
      norm_row_dispatch(xp + i * C, nullptr, op + i * C, C, 1.0f, static_cast<float>(eps), tmp.data());
  });
  return out;
}

// LayerNorm without affine for training, x (N, C) contiguous float32: returns [xhat, mean, rstd] ((N, C), (N, 1),
// (N, 1): what aten::native_layer_norm_backward takes) and, when u (N, C, contiguous float32) is given, a
// fourth tensor u * xhat (HSTU's gate U * LN(O)). Two passes over each row as torch's (biased variance).
std::vector<torch::Tensor> layer_norm_train(torch::Tensor x, torch::Tensor u, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "layer_norm_train takes a contiguous float32 (N, C) CPU tensor");
  const bool gated = u.numel() > 0;
  TORCH_CHECK(!gated || (u.sizes() == x.sizes() && u.is_contiguous() && u.scalar_type() == torch::kFloat32 &&
                         u.device().is_cpu()), "u must be empty or a contiguous float32 CPU tensor shaped as x");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(C > 0, "layer_norm_train needs at least one column");
  auto xhat = torch::empty_like(x), mean = torch::empty({N, 1}, x.options()), rstd = torch::empty({N, 1}, x.options());
  auto y = gated ? torch::empty_like(x) : torch::empty({0}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* up = gated ? u.data_ptr<float>() : nullptr;
  float *hp = xhat.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float* yp = gated ? y.data_ptr<float>() : nullptr;
  // whole vectors, then the last C % 8 columns masked (AMD's masked stores are slow: only the tail takes them)
  const int64_t Cf = C / 8 * 8, tail = C - Cf;
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * C;
      const v8 last = tail ? load_first(row + Cf, tail) : splat(0.0f);
      v8 acc = last;
      for (int64_t c = 0; c < Cf; c += 8) acc += load(row + c);
      const float mu = hsum(acc) / C;
      const v8 m = splat(mu);
      const v8 d_last = tail ? (v8{0, 1, 2, 3, 4, 5, 6, 7} < splat(static_cast<float>(tail)) ? last - m : splat(0.0f))
                             : splat(0.0f);
      acc = d_last * d_last;
      for (int64_t c = 0; c < Cf; c += 8) {
        const v8 d = load(row + c) - m;
        acc += d * d;
      }
      const float r = 1.0f / std::sqrt(hsum(acc) / C + static_cast<float>(eps));
      mp[i] = mu;
      rp[i] = r;
      const v8 rv = splat(r);
      for (int64_t c = 0; c < Cf; c += 8) {
        const v8 h = (load(row + c) - m) * rv;
        store(hp + i * C + c, h);
        if (gated) store(yp + i * C + c, h * load(up + i * C + c));
      }
      if (tail) {
        const v8 h = d_last * rv;
        store_first(hp + i * C + Cf, tail, h);
        if (gated) store_first(yp + i * C + Cf, tail, h * load_first(up + i * C + Cf, tail));
      }
    }
  });
  return gated ? std::vector<torch::Tensor>{xhat, mean, rstd, y} : std::vector<torch::Tensor>{xhat, mean, rstd};
}

// Next-item queries of a whole HSTU stack at inference (the reference layer's options): for each layer l,
//   x = Linear_l(SiLU(U) * LN(attention)) + x,   (U, V, Q, K) = LN(x) @ uvqk[l]   (hstu_attention_gate)
// and in the last layer only each row's last token is a query, so the result is (B, D). One call instead
// of a dozen Python-dispatched operations per layer: what a single request's latency is made of.
// x: (N, D) contiguous float32 tokens laid out as ``starts``/``lengths`` say (rows >= 1 token); per layer
// uvqk (D, W), out_weight (D, H * dv), out_bias (D), bias: a (2 M - 1) table or empty (as the gate takes).
torch::Tensor hstu_next_item_queries(torch::Tensor x, std::vector<torch::Tensor> uvqk,
                                     std::vector<torch::Tensor> out_weight, std::vector<torch::Tensor> out_bias,
                                     std::vector<torch::Tensor> bias, torch::Tensor starts, torch::Tensor lengths,
                                     int64_t H, int64_t dqk, int64_t dv, double q_scale, double inv_norm,
                                     double eps) {
  const size_t layers = uvqk.size();
  TORCH_CHECK(layers > 0 && out_weight.size() == layers && out_bias.size() == layers && bias.size() == layers,
              "one uvqk, output weight, output bias and bias per layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32,
              "x must be a contiguous float32 (N, D) tensor");
  auto len = lengths.to(torch::kInt64).contiguous();
  TORCH_CHECK(len.numel() == 0 || len.min().item<int64_t>() >= 1, "every row needs at least one token");
  const auto last = (starts.to(torch::kInt64) + len - 1).contiguous();
  for (size_t l = 0; l < layers; ++l) {
    const bool final_layer = l + 1 == layers;
    auto o = hstu_attention_gate(at::mm(layer_norm(x, eps), uvqk[l]), starts, len, bias[l], H, dqk, dv, q_scale,
                                 inv_norm, eps, final_layer);
    auto residual = final_layer ? x.index_select(0, last) : x;
    x = at::addmm(out_bias[l], o, out_weight[l].t()).add_(residual);
  }
  return x;
}

namespace {

// Counter-based random numbers: the value for counter c is a hash of c keyed by a seed (two lowbias32
// rounds), so any element can be drawn again, in any order and on any thread, without storing it.
// Counters are always multiples of 8 plus the lane, so the low 32 bits never wrap inside a vector.
typedef unsigned int v8u __attribute__((vector_size(32)));

inline v8u mix32(v8u x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Keys of a counter-based hash from a seed (splitmix64: nearby seeds give unrelated keys).
inline void hash_keys(int64_t seed, unsigned& k0, unsigned& k1) {
  uint64_t key = static_cast<uint64_t>(seed) + 0x9e3779b97f4a7c15ull;
  key = (key ^ (key >> 30)) * 0xbf58476d1ce4e5b9ull;
  key = (key ^ (key >> 27)) * 0x94d049bb133111ebull;
  key ^= key >> 31;
  k0 = static_cast<unsigned>(key);
  k1 = static_cast<unsigned>(key >> 32);
}

// 8 hashes of the counters c, c + 1, ..., c + 7 (64-bit c, a multiple of 8)
inline v8u hash8(uint64_t c, unsigned k0, unsigned k1) {
  const v8u lane = v8u{0, 1, 2, 3, 4, 5, 6, 7};
  const v8u x = v8u{0, 0, 0, 0, 0, 0, 0, 0} + static_cast<unsigned>(c) + lane;
  return mix32(mix32(x ^ k0) ^ (k1 + static_cast<unsigned>(c >> 32) * 0x9e3779b9u));
}

}  // namespace

// Dropout whose mask is a function of (seed, element index) instead of a stored mask or a sequential
// generator. 16-bit uniforms, two per 32-bit hash: an element is kept when its uniform is >= round(p 2^16),
// P(keep) = 1 - p to 2^-16. The backward is the same call on the gradient with the same seed. x contiguous
// float32; returns x * keep / (1 - p).
torch::Tensor hashed_dropout(torch::Tensor x, double p, int64_t seed) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kFloat32, "dropout takes a contiguous float32 tensor");
  check_cpu({&x});
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1)");
  auto out = torch::empty_like(x);
  const int64_t n = x.numel();
  const unsigned thr = static_cast<unsigned>(std::llround(p * 65536.0));
  const v8 scale = splat(static_cast<float>(1.0 / (1.0 - p)));
  unsigned k0, k1;
  hash_keys(seed, k0, k1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (n + 15) / 16, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {  // elements 16 blk .. 16 blk + 15: 8 hashes
      const v8u h = hash8(static_cast<uint64_t>(blk) * 8, k0, k1);
      // multiplied by 0 or 1 / (1 - p), not selected: a dropped NaN or inf stays NaN, as in F.dropout
      const v8 m_lo = (v8i)((h & 0xffffu) >= thr) ? scale : splat(0.0f);
      const v8 m_hi = (v8i)((h >> 16) >= thr) ? scale : splat(0.0f);
      const int64_t e = blk * 16;
      if (e + 16 <= n) {
        store(op + e, load(xp + e) * m_lo);
        store(op + e + 8, load(xp + e + 8) * m_hi);
      } else {
        float t[16] = {0};
        std::memcpy(t, xp + e, (n - e) * sizeof(float));
        store(t, load(t) * m_lo);
        store(t + 8, load(t + 8) * m_hi);
        std::memcpy(op + e, t, (n - e) * sizeof(float));
      }
    }
  });
  return out;
}

namespace {

// Negative r of position n: item 1 + floor(h * I / 2^32) for the hash h of counter n * Rp + r, Rp = R rounded
// up to a multiple of 8 (uniform on 1..I up to I / 2^32). R values into out.
inline void negatives_of(int64_t n, int64_t R, int64_t I, unsigned k0, unsigned k1, int32_t* out) {
  const uint64_t Rp = static_cast<uint64_t>((R + 7) / 8 * 8);
  for (int64_t r0 = 0; r0 < R; r0 += 8) {
    const v8u h = hash8(static_cast<uint64_t>(n) * Rp + r0, k0, k1);
    for (int64_t r = r0; r < std::min<int64_t>(R, r0 + 8); ++r)
      out[r] = 1 + static_cast<int32_t>((static_cast<uint64_t>(h[r - r0]) * static_cast<uint64_t>(I)) >> 32);
  }
}

}  // namespace

// The negatives sampled_softmax draws for a seed: (N, R) int64 in 1..num_items.
torch::Tensor hashed_negatives(int64_t N, int64_t R, int64_t num_items, int64_t seed) {
  TORCH_CHECK(N >= 0 && R > 0 && num_items > 0 && num_items < (int64_t{1} << 31), "bad negative sampling sizes");
  unsigned k0, k1;
  hash_keys(seed, k0, k1);
  auto out = torch::empty({N, R}, torch::kInt64);
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> neg(R);
    for (int64_t n = begin; n < end; ++n) {
      negatives_of(n, R, num_items, k0, k1, neg.data());
      for (int64_t r = 0; r < R; ++r) op[n * R + r] = neg[r];
    }
  });
  return out;
}

namespace {

template <int NV>
inline float dot_row(const v8 (&a)[NV], const float* row) {
  v8 acc = a[0] * load(row);
  for (int c = 1; c < NV; ++c) acc += a[c] * load(row + 8 * c);
  return hsum(acc);
}

// Sampled-softmax cross-entropy, mean over N positions, and its gradients, in one pass:
//   logits_n = [q_n . items[t_n], q_n . items[j] for the R negatives j of n that are not t_n] / T
//   loss = mean_n (logsumexp(logits_n) - logits_n[0])
// with negatives drawn by hash (hashed_negatives with the same seed). Dp = D rounded up to whole vectors:
// q and items are copied into zero-padded rows once; each thread takes a contiguous share of positions and
// accumulates the item gradient in its own (I + 1, Dp) buffer, summed at the end. Returns loss (0-dim),
// dq (N, D), ditems (I + 1, D).
template <int NV>
std::vector<torch::Tensor> sampled_softmax_impl(const torch::Tensor& q, const torch::Tensor& items,
                                                const torch::Tensor& targets, int64_t R, double temperature,
                                                int64_t seed) {
  constexpr int64_t Dp = 8 * NV;
  const int64_t N = q.size(0), D = q.size(1), I1 = items.size(0);
  unsigned k0, k1;
  hash_keys(seed, k0, k1);
  std::vector<float> qp(N * Dp, 0.0f), ip(I1 * Dp, 0.0f);
  const float* qs = q.data_ptr<float>();
  const float* is = items.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) std::memcpy(qp.data() + n * Dp, qs + n * D, D * sizeof(float));
  for (int64_t i = 0; i < I1; ++i) std::memcpy(ip.data() + i * Dp, is + i * D, D * sizeof(float));
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(tp[n] >= 1 && tp[n] < I1, "target ", tp[n], " is not an item id in 1..", I1 - 1);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 255) / 256));
  std::vector<std::vector<float>> dit(workers);
  std::vector<double> losses(workers, 0.0);
  std::vector<float> dqp(N * Dp);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float scale = 1.0f / static_cast<float>(std::max<int64_t>(N, 1));  // mean over positions
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      auto& di = dit[w];
      di.assign(I1 * Dp, 0.0f);
      std::vector<int32_t> neg(R);
      std::vector<float> logit(R);
      double total = 0.0;
      for (int64_t n = N * w / workers; n < N * (w + 1) / workers; ++n) {
        const int64_t t = tp[n];
        v8 qv[NV];
        for (int c = 0; c < NV; ++c) qv[c] = load(qp.data() + n * Dp + 8 * c);
        negatives_of(n, R, I1 - 1, k0, k1, neg.data());
        const float pos = dot_row<NV>(qv, ip.data() + t * Dp) * inv_t;
        float top = pos;
        bool nan = std::isnan(pos);
        for (int64_t r = 0; r < R; ++r) {
          if (r + 8 < R) __builtin_prefetch(ip.data() + neg[r + 8] * Dp);
          logit[r] = neg[r] == t ? -INFINITY : dot_row<NV>(qv, ip.data() + neg[r] * Dp) * inv_t;
          top = std::max(top, logit[r]);
          nan |= std::isnan(logit[r]);
        }
        if (nan) {  // a NaN score: the loss and this position's gradient are NaN, as in the stock path
          total += NAN;
          for (int c = 0; c < NV; ++c) store(dqp.data() + n * Dp + 8 * c, splat(NAN));
          continue;
        }
        float z = std::exp(pos - top);
        int64_t r = 0;
        for (; r + 8 <= R; r += 8) {  // exp8 takes [-87, 88]: below, exp is 0 to float precision anyway
          const v8 x = load(logit.data() + r) - splat(top);
          const v8 e = exp8(vmax(x, splat(-87.0f)));
          store(logit.data() + r, x < splat(-87.0f) ? splat(0.0f) : e);  // 0 for hits (-inf)
        }
        for (; r < R; ++r) logit[r] = std::exp(logit[r] - top);
        for (r = 0; r < R; ++r) z += logit[r];
        total += std::log(z) + top - pos;
        // d loss_n / d logit: softmax - one-hot(0); times 1 / T for the dot products, 1 / N for the mean
        const float g0 = (std::exp(pos - top) / z - 1.0f) * inv_t * scale;
        const float gz = inv_t * scale / z;
        v8 dq[NV];
        const float* rowt = ip.data() + t * Dp;
        float* dt = di.data() + t * Dp;
        for (int c = 0; c < NV; ++c) {
          dq[c] = splat(g0) * load(rowt + 8 * c);
          store(dt + 8 * c, load(dt + 8 * c) + splat(g0) * qv[c]);
        }
        for (r = 0; r < R; ++r) {
          if (r + 8 < R) __builtin_prefetch(di.data() + neg[r + 8] * Dp);
          if (logit[r] == 0.0f) continue;  // accidental hit (or underflow: no gradient either way)
          const v8 g = splat(logit[r] * gz);
          const float* row = ip.data() + neg[r] * Dp;
          float* dr = di.data() + neg[r] * Dp;
          for (int c = 0; c < NV; ++c) {
            dq[c] += g * load(row + 8 * c);
            store(dr + 8 * c, load(dr + 8 * c) + g * qv[c]);
          }
        }
        for (int c = 0; c < NV; ++c) store(dqp.data() + n * Dp + 8 * c, dq[c]);
      }
      losses[w] = total;
    }
  });
  auto dq = torch::empty({N, D}, q.options());
  auto ditems = torch::empty({I1, D}, items.options());
  float* dqo = dq.data_ptr<float>();
  float* dio = ditems.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) std::memcpy(dqo + n * D, dqp.data() + n * Dp, D * sizeof(float));
  at::parallel_for(0, I1, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t d = 0; d < D; ++d) {
        float sum = 0.0f;
        for (int64_t w = 0; w < workers; ++w) sum += dit[w][i * Dp + d];
        dio[i * D + d] = sum;
      }
  });
  double total = 0.0;
  for (double l : losses) total += l;
  return {torch::full({}, static_cast<float>(total / std::max<int64_t>(N, 1)), q.options()), dq, ditems};
}

}  // namespace

std::vector<torch::Tensor> sampled_softmax(torch::Tensor q, torch::Tensor items, torch::Tensor targets,
                                           int64_t num_negatives, double temperature, int64_t seed) {
  TORCH_CHECK(q.dim() == 2 && items.dim() == 2 && q.size(1) == items.size(1) && q.is_contiguous() &&
              items.is_contiguous() && q.scalar_type() == torch::kFloat32 && items.scalar_type() == torch::kFloat32,
              "q (N, D) and items (I + 1, D) must be contiguous float32 tensors");
  check_cpu({&q, &items, &targets});
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == q.size(0) && targets.scalar_type() == torch::kInt64 &&
              targets.is_contiguous(), "targets must be a contiguous int64 (N,) tensor");
  TORCH_CHECK(num_negatives > 0 && items.size(0) >= 2 && items.size(0) <= (int64_t{1} << 31) && temperature > 0,
              "bad sampled softmax arguments");
  TORCH_CHECK(q.size(1) >= 1 && q.size(1) <= 128, "the compiled sampled softmax takes 1 <= D <= 128");
  return with_vectors<16>((q.size(1) + 7) / 8, [&](auto nv) {
    return sampled_softmax_impl<decltype(nv)::value>(q, items, targets, num_negatives, temperature, seed);
  });
}

namespace {

// a bfloat16 is the upper half of a float32: 8 of them widened into a vector
typedef unsigned short v8h __attribute__((vector_size(16)));
inline v8 bf16_load(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, sizeof h);
  return (v8)(__builtin_convertvector(h, v8u) << 16);
}

}  // namespace

// grad * SiLU'(x), SiLU'(x) = sig(x) (1 + x (1 - sig(x))), written over grad (float32, contiguous) and
// returned; x float32 or bfloat16 (a bf16 projection's pre-activation), contiguous, shaped as grad.
torch::Tensor silu_backward_(torch::Tensor grad, torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous float32 or bfloat16 CPU tensor");
  TORCH_CHECK(grad.device().is_cpu() && grad.scalar_type() == torch::kFloat32 && grad.is_contiguous() &&
              grad.sizes() == x.sizes(), "grad must be a contiguous float32 CPU tensor shaped as x");
  float* gp = grad.data_ptr<float>();
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  const auto* xh = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const int64_t count = x.numel();
  at::parallel_for(0, (count + 7) / 8, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i = blk * 8, n = std::min<int64_t>(8, count - i);
      v8 xv;
      if (bf16 && n == 8) {
        xv = bf16_load(xh + i);
      } else if (bf16) {
        uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(t, xh + i, n * sizeof(uint16_t));
        xv = bf16_load(t);
      } else {
        xv = n == 8 ? load(xf + i) : load_first(xf + i, n);
      }
      const v8 sig = sigmoid8(xv);
      const v8 g = n == 8 ? load(gp + i) : load_first(gp + i, n);
      const v8 d = g * sig * (splat(1.0f) + xv * (splat(1.0f) - sig));
      if (n == 8) store(gp + i, d);
      else store_first(gp + i, n, d);
    }
  });
  return grad;
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no Python object is touched while it runs: other threads (the HTTP server's event loop) keep going
  m.def("causal_silu_attention", &causal_silu_attention, "causal SiLU attention forward (CPU, float32)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("lengths"), py::arg("starts"),
        py::arg("scale") = 1.0, py::call_guard<py::gil_scoped_release>());
  m.def("causal_silu_attention_backward", &causal_silu_attention_backward,
        "gradients of the causal SiLU attention (CPU, float32)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("bias"), py::arg("lengths"), py::arg("starts"), py::arg("grad"), py::arg("bias_grad"),
        py::arg("scale") = 1.0, py::arg("into") = std::vector<torch::Tensor>{},
        py::call_guard<py::gil_scoped_release>());
  m.def("has_bf16_attention", &has_bf16_attention, "whether silu_attention_bf16 runs here (AVX512-BF16)");
  m.def("silu_attention_bf16", &silu_attention_bf16,
        "SiLU(U) and the causal SiLU attention of an HSTU layer's raw bf16 projection, on bf16 dot products",
        py::arg("raw"), py::arg("bias"), py::arg("lengths"), py::arg("starts"), py::arg("H"), py::arg("dqk"),
        py::arg("dv"), py::arg("scale") = 1.0, py::call_guard<py::gil_scoped_release>());
  m.def("silu_attention_bf16_backward", &silu_attention_bf16_backward,
        "the gradients of silu_attention_bf16, written into the raw projection's bf16 gradient", py::arg("raw"),
        py::arg("bias"), py::arg("lengths"), py::arg("starts"), py::arg("du"), py::arg("grad"), py::arg("bias_grad"),
        py::arg("scale"), py::arg("draw"), py::arg("H"), py::arg("dqk"), py::arg("dv"),
        py::call_guard<py::gil_scoped_release>());
  m.def("silu_backward_", &silu_backward_,
        "grad * SiLU'(x) written over grad (float32; x float32 or bfloat16)",
        py::call_guard<py::gil_scoped_release>());
  m.def("hstu_attention_gate", &hstu_attention_gate,
        "SiLU(U) * LayerNorm(attention(SiLU(Q, K, V)) * inv_norm) from an HSTU layer's raw projection",
        py::call_guard<py::gil_scoped_release>());
  m.def("hstu_next_item_queries", &hstu_next_item_queries,
        "an HSTU stack's outputs at each row's last token (inference, reference layer options)",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm_train", &layer_norm_train,
        "LayerNorm without affine for training: [xhat, mean, rstd] and, with u, u * xhat (CPU, float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm", &layer_norm, "LayerNorm without affine over the last dimension (CPU, float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("hashed_dropout", &hashed_dropout, "dropout with a mask hashed from (seed, index) (CPU, float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("hashed_negatives", &hashed_negatives, "the negatives sampled_softmax draws for a seed (N, R)",
        py::call_guard<py::gil_scoped_release>());
  m.def("sampled_softmax", &sampled_softmax,
        "sampled-softmax loss and its gradients with hashed uniform negatives (CPU, float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("built_with_openmp", &built_with_openmp, "whether at::parallel_for can use more than one thread");
}
