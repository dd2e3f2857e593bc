"""The liquid scan on the CPU as C++ kernels: the element-wise recurrence (key_dim 1) as one fused loop per
direction, and the chunked scan (key_dim > 1) as one pass per direction over chunks, its matmuls done by the
sgemm torch links.

Element-wise: S_t = a_t S_{t-1} + k_t v_t per channel, y_t = q_t S_t (see pretrain/model/scan.py,
`_ElementwiseScan`, the PyTorch form of the same recurrence, which stays the fallback and the form on other
devices). The PyTorch form is a few dozen whole-tensor element-wise ops, each reading and writing
[B, T, H, P] from memory, about 30 passes per forward + backward at P = 1; this loop reads each input once
and writes each output once (forward: q, k, a, v in, y and the states out; backward: those, the states and
dy in, the four gradients out), with the running state of a block of channels in cache.

Chunked (`ChunkedScanCPU`): the algorithm of scan.py's `_chunk_group` (intra-chunk masked scores, the carried
state's term, the state update), per (batch, head) chunk by chunk, with a custom backward. The PyTorch form
runs each step as a batched op over [B, H, chunks, C, C] temporaries that leave the cache between ops; here
a chunk's tiles (q, k, v, the C x C scores and the N x P state) stay in L1/L2 from one matmul to the next, the
decay masks and the log-decay gradient are fused around them, and only the inputs, the outputs and the state
entering each chunk cross memory. The matmuls call the `sgemm_` that torch's x86 wheels export (MKL,
single-threaded inside the kernel's own threads); where none is found (`chunked_available()` says why)
liquid_scan keeps the PyTorch form.

Work split: contiguous ranges of (batch, head) pairs over torch.get_num_threads() threads of the OpenMP team
(torch's own libgomp, already loaded), each channel (each pair's chunks) computed by one thread in time order,
so the result does not depend on the thread count.
Plain C++ with no torch headers, compiled once per machine with the system's C++ compiler (a few seconds)
into LIQUID_CACHE/kernels (default ~/.cache/liquid-pretrain/kernels) and loaded with ctypes; where that
fails (no compiler), `available()` says why and liquid_scan keeps the PyTorch forms.
LIQUID_SCAN_CPU_KERNEL=0 turns both off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

EXP_SOURCE = r"""
#include <cstdint>

// exp(x) for -87.3 <= x <= 88, a Cephes-style polynomial (about 1 ulp) that vectorises.
static inline float exp_core(float x) {
  const float kf = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - kf * 0.693359375f + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * __builtin_bit_cast(float, ((int32_t)kf + 127) << 23);  // times 2^kf (a union would not vectorise)
}

// exp(x) for x <= 0 (0 below -87.3).
static inline float exp_nonpos(float x) {
  const float e = exp_core(x < -87.3f ? -87.3f : x);
  return x < -87.3f ? 0.0f : e;
}
"""

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif
""" + EXP_SOURCE + r"""
namespace {

// Calls f(b, h_lo, h_hi) over [0, B*H) (batch, head) pairs cut into `tasks` contiguous ranges, run on the
// OpenMP team. Loaded into a process that has torch, libgomp.so.1 resolves to torch's own: the same
// threads as torch's operators (a second pool would compete with them while they spin after an op).
template <class F>
void over_heads(int64_t B, int64_t H, int64_t tasks, F f) {
  const int64_t total = B * H;
  tasks = std::max<int64_t>(1, std::min<int64_t>(tasks, total));
#pragma omp parallel for schedule(static) num_threads(tasks)
  for (int64_t i = 0; i < tasks; ++i) {
    const int64_t lo = total * i / tasks, hi = total * (i + 1) / tasks;
    for (int64_t b = lo / H; b * H < hi; ++b) {
      const int64_t h_lo = std::max(lo, b * H) - b * H, h_hi = std::min(hi, (b + 1) * H) - b * H;
      if (h_lo < h_hi) f(b, h_lo, h_hi);
    }
  }
}

}  // namespace

extern "C" {

// q, k, a [B, T, H]; v, y, states [B, T, H, P]; h0, final [B, H, P]. h0 and states may be null.
void liquid_elementwise_forward(const float* q, const float* k, const float* a, const float* v,
                                const float* h0, float* y, float* states, float* final_state,
                                int64_t B, int64_t T, int64_t H, int64_t P, int64_t threads) {
  const int64_t C = H * P;
  over_heads(B, H, threads, [&](int64_t b, int64_t h_lo, int64_t h_hi) {
    const int64_t c0 = h_lo * P, n = (h_hi - h_lo) * P;
    std::vector<float> s(n, 0.0f);
    if (h0) std::copy(h0 + b * C + c0, h0 + b * C + c0 + n, s.begin());
    float* st = s.data();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      const float* qt = q + row * H + h_lo;
      const float* kt = k + row * H + h_lo;
      const float* at = a + row * H + h_lo;
      const float* vt = v + row * C + c0;
      float* yt = y + row * C + c0;
      float* ht = states ? states + row * C + c0 : nullptr;
      if (P == 1) {
        for (int64_t j = 0; j < n; ++j) {
          const float x = at[j] * st[j] + kt[j] * vt[j];
          st[j] = x;
          yt[j] = qt[j] * x;
        }
      } else {
        for (int64_t i = 0; i < h_hi - h_lo; ++i) {
          const float ai = at[i], ki = kt[i], qi = qt[i];
          float* si = st + i * P;
          const float* vi = vt + i * P;
          float* yi = yt + i * P;
          for (int64_t p = 0; p < P; ++p) {
            const float x = ai * si[p] + ki * vi[p];
            si[p] = x;
            yi[p] = qi * x;
          }
        }
      }
      if (ht) std::copy(st, st + n, ht);
    }
    std::copy(st, st + n, final_state + b * C + c0);
  });
}

// Gradients: gy [B, T, H, P]; g_final, h0, grad_h0 [B, H, P] (each may be null); out: grad_q, grad_k and
// grad_ld (of log_decay: a_t sum_p dL/dS_t S_{t-1}) [B, T, H], grad_v [B, T, H, P].
void liquid_elementwise_backward(const float* q, const float* k, const float* a, const float* v,
                                 const float* h0, const float* states, const float* gy, const float* g_final,
                                 float* grad_q, float* grad_k, float* grad_a, float* grad_v, float* grad_h0,
                                 int64_t B, int64_t T, int64_t H, int64_t P, int64_t threads) {
  const int64_t C = H * P;
  over_heads(B, H, threads, [&](int64_t b, int64_t h_lo, int64_t h_hi) {
    const int64_t c0 = h_lo * P, n = (h_hi - h_lo) * P;
    std::vector<float> carry(n, 0.0f), zero(n, 0.0f);  // carry: a_{t+1} dL/dS_{t+1} (dL/dS_T: g_final)
    if (g_final) std::copy(g_final + b * C + c0, g_final + b * C + c0 + n, carry.begin());
    float* ct = carry.data();
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t row = b * T + t;
      const float* qt = q + row * H + h_lo;
      const float* kt = k + row * H + h_lo;
      const float* at = a + row * H + h_lo;
      const float* vt = v + row * C + c0;
      const float* ht = states + row * C + c0;
      const float* hp = t > 0 ? states + (row - 1) * C + c0 : (h0 ? h0 + b * C + c0 : zero.data());
      const float* gyt = gy + row * C + c0;
      float* gvt = grad_v + row * C + c0;
      float* gqt = grad_q + row * H + h_lo;
      float* gkt = grad_k + row * H + h_lo;
      float* gat = grad_a + row * H + h_lo;
      if (P == 1) {
        for (int64_t j = 0; j < n; ++j) {
          const float g = qt[j] * gyt[j] + ct[j];  // dL/dS_t
          gvt[j] = g * kt[j];
          gkt[j] = g * vt[j];
          gqt[j] = gyt[j] * ht[j];
          gat[j] = g * hp[j] * at[j];
          ct[j] = at[j] * g;
        }
      } else {
        for (int64_t i = 0; i < h_hi - h_lo; ++i) {
          const float ai = at[i], ki = kt[i], qi = qt[i];
          const int64_t o = i * P;
          float sk = 0.0f, sq = 0.0f, sa = 0.0f;
          for (int64_t p = 0; p < P; ++p) {
            const float g = qi * gyt[o + p] + ct[o + p];
            gvt[o + p] = g * ki;
            sk += g * vt[o + p];
            sq += gyt[o + p] * ht[o + p];
            sa += g * hp[o + p];
            ct[o + p] = ai * g;
          }
          gkt[i] = sk;
          gqt[i] = sq;
          gat[i] = sa * ai;
        }
      }
    }
    if (grad_h0) std::copy(ct, ct + n, grad_h0 + b * C + c0);
  });
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// The chunked scan (key_dim N > 1): per (batch, head), chunks of C tokens in time order, each chunk's four
// matmuls done by the BLAS sgemm that torch itself links (its address is passed in), on cache-resident tiles,
// with the decay masks, state passing and the log-decay gradient fused around them.
// ---------------------------------------------------------------------------------------------------------

typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);
typedef int (*threads_local_t)(int);  // MKL_Set_Num_Threads_Local: this thread's BLAS threads (0: the global)

namespace {

// The causal structure of a chunk's product, which the register tiles skip (torch's sgemm computes it all:
// the zeros it multiplies are real zeros, and what it computes above the diagonal the decay mask zeroes).
// LOWER_C: only C[i, j] for j <= i is wanted (q k^T, dy v^T: the mask zeroes the rest); LOWER_A: A is lower
// triangular (A[t, s] = 0 for s > t: the masked scores and their gradient), so op(A)'s row i needs k steps
// p <= i (A) or p >= i (A^T).
enum class Tri { FULL, LOWER_C, LOWER_A };

#if defined(__AVX512F__)
// The chunk's products on AVX-512 in register tiles: C[MR rows x 16 NV columns] stays in MR * NV zmm
// registers while k steps each load NV vectors of a row of B and broadcast MR elements of op(A) into FMAs.
// At the chunk's sizes (64 x 64 x 64 to 64 x 128 x 128, everything in L1/L2) MKL's sgemm spends a part of
// each call outside its kernel; these tiles run the same FMAs without it (measured on one core of the
// development machine: 64 x 64 x 64 in 2.43 us against MKL's 2.77; the scan's forward + backward 4% faster),
// and skip what the chunk's causal structure leaves zero (Tri).
// Row-major C[m x n] = op(A) B + beta C: op(A) = A [m x k] at row stride lda, or (TA) A^T for A [k x m];
// B [k x n] at row stride ldb; k steps p in [p0, p1). beta 0 never reads C.
template <int MR, int NV, bool TA>
static inline void register_tile(int64_t p0, int64_t p1, const float* A, int64_t lda, const float* B, int64_t ldb,
                                 float beta, float* C, int64_t ldc) {
  __m512 c[MR][NV];
  const __m512 scale = _mm512_set1_ps(beta);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      c[r][v] = beta == 0.0f ? _mm512_setzero_ps() : _mm512_mul_ps(scale, _mm512_loadu_ps(C + r * ldc + 16 * v));
  for (int64_t p = p0; p < p1; ++p) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + p * ldb + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(TA ? A[p * lda + r] : A[r * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

// One tile of `rows` (1..8) rows from row i of op(A) and C, on the panel of 16 NV columns from column j:
// its k range (LOWER_A), or zeros where the whole tile lies above the diagonal (LOWER_C, beta 0).
template <int NV, bool TA>
static void register_tile_at(int64_t rows, int64_t i, int64_t j, Tri tri, int64_t k, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const float* Ai = A + i * (TA ? 1 : lda);  // op(A)'s row i
  float* Ci = C + i * ldc;
  if (tri == Tri::LOWER_C && j > i + rows - 1) {
    for (int64_t r = 0; r < rows; ++r) std::fill(Ci + r * ldc, Ci + r * ldc + 16 * NV, 0.0f);
    return;
  }
  int64_t p0 = 0, p1 = k;
  if (tri == Tri::LOWER_A) {
    if (TA) p0 = std::min(i, k);  // A^T's row i: A[t, i] for t >= i
    else p1 = std::min(i + rows, k);  // A's rows i..i+rows-1: A[t, s] for s <= t
  }
  switch (rows) {
    case 8: register_tile<8, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 7: register_tile<7, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 6: register_tile<6, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 5: register_tile<5, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 4: register_tile<4, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 3: register_tile<3, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 2: register_tile<2, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    case 1: register_tile<1, NV, TA>(p0, p1, Ai, lda, B, ldb, beta, Ci, ldc); break;
    default: break;
  }
}

// The panel of 16 NV columns from column j, in tiles of 8 rows, then the m % 8 left.
template <int NV, bool TA>
static void register_panel(int64_t m, int64_t j, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                           float beta, float* C, int64_t ldc, Tri tri) {
  for (int64_t i = 0; i < m; i += 8)
    register_tile_at<NV, TA>(std::min<int64_t>(8, m - i), i, j, tri, k, A, lda, B + j, ldb, beta, C + j, ldc);
}

// n a multiple of 16: panels of 32 columns, then one of 16.
template <bool TA>
static void register_gemm(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb,
                          float beta, float* C, int64_t ldc, Tri tri) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) register_panel<2, TA>(m, j, k, A, lda, B, ldb, beta, C, ldc, tri);
  if (j < n) register_panel<1, TA>(m, j, k, A, lda, B, ldb, beta, C, ldc, tri);
}
#endif

// Row-major C[m x n] = alpha op(A) op(B) + beta C; ta / tb 'N' or 'T' as for row-major operands; lda, ldb,
// ldc are row strides. beta 0 never reads C. With AVX-512, op(B) = B, alpha 1 and n a multiple of 16 (every
// product of a full chunk where N and P are multiples of 16) in register tiles, skipping what `tri` says is
// zero; otherwise through the column-major sgemm torch links (C^T = op(B)^T op(A)^T), all of it.
struct Gemm {
  sgemm_t f;
  void operator()(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc, Tri tri = Tri::FULL) const {
#if defined(__AVX512F__)
    if (tb == 'N' && alpha == 1.0f && n % 16 == 0) {
      if (ta == 'N') register_gemm<false>(m, n, k, A, lda, B, ldb, beta, C, ldc, tri);
      else register_gemm<true>(m, n, k, A, lda, B, ldb, beta, C, ldc, tri);
      return;
    }
#endif
    const int mm = (int)m, nn = (int)n, kk = (int)k, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    f(&tb, &ta, &nn, &mm, &kk, &alpha, B, &lb, A, &la, &beta, C, &lc);
  }
};

// One chunk's decay structure, from log_decay (-inf = reset) at stride `ls`: cum (inclusive log-decay sum
// from the chunk's start, resets counted as 0), seg (resets up to and including t), e_t = exp(cum_t) where
// no reset precedes t in the chunk (the carried state's decay to t; else 0), f_s = exp(cum_last - cum_s)
// where no reset follows s (s's decay to the chunk's end; else 0); returns gamma = e_last (the carried
// state's decay through the chunk).
static float chunk_decays(const float* ld, int64_t ls, int64_t len, float* cum, float* seg, float* e, float* f,
                          bool* reset) {
  float c = 0.0f, s = 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    const float x = ld[t * ls];
    reset[t] = x == -__builtin_inff();
    s += reset[t] ? 1.0f : 0.0f;
    c += reset[t] ? 0.0f : x;
    cum[t] = c;
    seg[t] = s;
  }
  const float last = cum[len - 1], last_seg = seg[len - 1];
  for (int64_t t = 0; t < len; ++t) {
    e[t] = seg[t] == 0.0f ? exp_nonpos(cum[t]) : 0.0f;
    f[t] = seg[t] == last_seg ? exp_nonpos(last - cum[t]) : 0.0f;
  }
  return e[len - 1];
}

// Chunks whose log-decay falls by at most this much take D[t, s] = exp(cum_t) exp(-cum_s): 2 C exps instead
// of C^2 / 2, with neither factor leaving fp32's normal range (e^80 < 2^116).
constexpr float FACTORED_DECAY = 80.0f;

// D[t, s] = exp(cum_t - cum_s) for s <= t in one segment, else 0 (rows of stride C, columns up to len); with
// M != null also M *= D in place (M = q k^T becomes the masked, decayed scores). `work`: 2 C floats.
void decay_mask(const float* cum, const float* seg, int64_t len, int64_t C, float* D, float* M, float* work) {
  const bool factored = cum[len - 1] >= -FACTORED_DECAY;  // cum falls from cum[0] <= 0 to cum[len - 1]
  float *up = work, *down = work + C;
  if (factored) {
#pragma omp simd
    for (int64_t s = 0; s < len; ++s) {
      up[s] = exp_core(cum[s]);
      down[s] = exp_core(-cum[s]);
    }
  }
  for (int64_t t = 0; t < len; ++t) {
    const float ct = cum[t], st = seg[t], ut = up[t];
    float* Dt = D + t * C;
    if (factored) {
#pragma omp simd
      for (int64_t s = 0; s <= t; ++s) Dt[s] = seg[s] == st ? ut * down[s] : 0.0f;
    } else {
#pragma omp simd
      for (int64_t s = 0; s <= t; ++s) Dt[s] = seg[s] == st ? exp_nonpos(ct - cum[s]) : 0.0f;
    }
    for (int64_t s = t + 1; s < len; ++s) Dt[s] = 0.0f;
    if (M) {
      float* Mt = M + t * C;
#pragma omp simd
      for (int64_t s = 0; s < len; ++s) Mt[s] *= Dt[s];
    }
  }
}

// Backward through the mask: dcum_t += sum_s dA[t,s] A[t,s], dcum_s -= the same; then dA *= D (dL/d(q k^T)).
void mask_backward(const float* A, const float* D, int64_t len, int64_t C, float* dA, float* dcum) {
  for (int64_t s = 0; s < len; ++s) dcum[s] = 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    const float* At = A + t * C;
    const float* Dt = D + t * C;
    float* dAt = dA + t * C;
    float row = 0.0f;
#pragma omp simd reduction(+ : row)
    for (int64_t s = 0; s < len; ++s) {
      const float z = dAt[s] * At[s];
      row += z;
      dcum[s] -= z;
      dAt[s] *= Dt[s];
    }
    dcum[t] += row;
  }
}

// X[t, :] = scale_t * Y[t, :] for len rows of width n (Y's rows at stride ly).
static void scale_rows(const float* Y, int64_t ly, const float* scale, int64_t len, int64_t n, float* X) {
  for (int64_t t = 0; t < len; ++t) {
    const float a = scale[t];
    for (int64_t j = 0; j < n; ++j) X[t * n + j] = a * Y[t * ly + j];
  }
}

// XT[j, i] = X[i, j] for rows x cols (X's rows at stride lx; XT's at stride lt). MKL's small-size sgemm runs
// A B^T (both operands' rows contiguous along k) at a fraction of the rate of A B, so B is transposed first,
// 8 x 8 tiles at a time in AVX registers where the machine has them.
#if defined(__AVX__)
static inline void transpose8(const float* X, int64_t lx, float* XT, int64_t lt) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(X + i * lx);
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // rows 4i..4i+3 of each pair of lanes
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(XT + i * lt, _mm256_permute2f128_ps(r[i], r[4 + i], 0x20));
    _mm256_storeu_ps(XT + (4 + i) * lt, _mm256_permute2f128_ps(r[i], r[4 + i], 0x31));
  }
}
#endif

static void transpose(const float* X, int64_t lx, int64_t rows, int64_t cols, float* XT, int64_t lt) {
  int64_t r8 = 0, c8 = 0;
#if defined(__AVX__)
  r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t i = 0; i < r8; i += 8)
    for (int64_t j = 0; j < c8; j += 8) transpose8(X + i * lx + j, lx, XT + j * lt + i, lt);
#endif
  for (int64_t i = 0; i < rows; ++i)  // what the tiles left: columns c8.. of every row, rows r8.. of the rest
    for (int64_t j = i < r8 ? c8 : 0; j < cols; ++j) XT[j * lt + i] = X[i * lx + j];
}

struct Strides {  // of a [B, T, H, ...] tensor's batch, seq and head dimensions
  int64_t b, t, h;
  explicit Strides(const int64_t* s) : b(s[0]), t(s[1]), h(s[2]) {}
};

// over_heads with one BLAS thread per kernel thread while f runs: after torch.set_num_threads, MKL would
// otherwise start its own team inside each of ours (nested, twice the cores' worth: measured 1.2-2x slower).
template <class F>
void over_heads_blas1(int64_t B, int64_t H, int64_t threads, threads_local_t threads_local, F f) {
  over_heads(B, H, threads, [&](int64_t b, int64_t h_lo, int64_t h_hi) {
    const int before = threads_local ? threads_local(1) : 0;
    f(b, h_lo, h_hi);
    if (threads_local) threads_local(before);
  });
}

// Heads whose chunk tiles one thread packs at a time (their inputs, outputs and states stay in its L2).
constexpr int64_t HEAD_GROUP = 8;

// dst[0, n) = src[0, n) with non-temporal stores where dst is 64-byte aligned: results written once and not
// read again by this call (outputs, saved states) skip the read-for-ownership of each line. The caller ends
// its writes with fence_stores().
static void store_stream(const float* src, int64_t n, float* dst) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
    std::copy(src + j, src + n, dst + j);
    return;
  }
#endif
  std::copy(src, src + n, dst);
}
static void fence_stores() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// A chunk of a group of heads as contiguous tiles: row t of head j (at X + t lt + j lh, `cols` contiguous
// floats) <-> tiles[(j C + t) cols ...]. Row by row, so one sweep reads (writes) a row's heads, adjacent in
// the [B, T, H, N] layout; a head's own rows are H N floats apart, 4 KiB or more, each in another page, where
// the hardware prefetcher stops. The matmuls then run on the packed tiles.
static void pack_heads(const float* X, int64_t lt, int64_t lh, int64_t len, int64_t nh, int64_t cols, int64_t C,
                       float* tiles) {
  for (int64_t t = 0; t < len; ++t)
    for (int64_t j = 0; j < nh; ++j) {
      const float* row = X + t * lt + j * lh;
      std::copy(row, row + cols, tiles + (j * C + t) * cols);
    }
}
static void unpack_heads(const float* tiles, int64_t len, int64_t nh, int64_t cols, int64_t C, float* X, int64_t lt,
                         int64_t lh) {
  for (int64_t t = 0; t < len; ++t)
    for (int64_t j = 0; j < nh; ++j) store_stream(tiles + (j * C + t) * cols, cols, X + t * lt + j * lh);
}

// Per row t of X [len x n]: X[t] *= scale_t and dcum[t] += sign * <Y[t], X[t]>.
static void scale_rows_dot(float* X, const float* Y, const float* scale, int64_t len, int64_t n, float sign,
                           float* dcum, float* total) {
  float sum = 0.0f;
  for (int64_t t = 0; t < len; ++t) {
    const float a = scale[t];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) {
      X[t * n + j] *= a;
      dot += Y[t * n + j] * X[t * n + j];
    }
    dcum[t] += sign * dot;
    sum += dot;
  }
  if (total) *total += sum;
}

}  // namespace

extern "C" {

// Whether this build multiplies the chunks in register tiles (an AVX-512 machine) rather than through sgemm.
int liquid_register_tiles() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

// q, k [B, T, H, N], v [B, T, H, P], log_decay [B, T, H], each at the given (batch, seq, head) strides with
// its last dimension contiguous; h0 [B, H, N, P] contiguous or null. Out (contiguous): y [B, T, H, P], states
// [B, H, chunks, N, P] (the state entering each chunk, for backward), final_state [B, H, N, P].
void liquid_chunked_forward(sgemm_t sgemm, threads_local_t threads_local, const float* q, const float* k,
                            const float* v, const float* ld, const float* h0, float* y, float* states,
                            float* final_state, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P, int64_t C,
                            const int64_t* sq, const int64_t* sk, const int64_t* sv, const int64_t* sl,
                            int64_t threads) {
  const Gemm gemm{sgemm};
  const Strides Sq(sq), Sk(sk), Sv(sv), Sl(sl);
  const int64_t chunks = (T + C - 1) / C, NP = N * P;
  over_heads_blas1(B, H, threads, threads_local, [&](int64_t b, int64_t h_lo, int64_t h_hi) {
    const int64_t G = std::min<int64_t>(HEAD_GROUP, h_hi - h_lo);
    std::vector<float> A(C * C), D(C * C), Qa(G * C * N), Ka(G * C * N), Va(G * C * P), Ya(G * C * P), KT(N * C),
        Xs(C * N), S(G * NP), cum(C), seg(C), e(C), f(C), work(2 * C);
    std::unique_ptr<bool[]> reset(new bool[C]);
    // Chunk-major over a group of heads: one chunk of every head in the group, then the next chunk.
    for (int64_t g0 = h_lo; g0 < h_hi; g0 += G) {
      const int64_t nh = std::min(G, h_hi - g0);
      if (h0) std::copy(h0 + (b * H + g0) * NP, h0 + (b * H + g0 + nh) * NP, S.begin());
      else std::fill(S.begin(), S.end(), 0.0f);
      for (int64_t i = 0; i < chunks; ++i) {
        const int64_t t0 = i * C, len = std::min(C, T - t0);
        pack_heads(q + b * Sq.b + t0 * Sq.t + g0 * Sq.h, Sq.t, Sq.h, len, nh, N, C, Qa.data());
        pack_heads(k + b * Sk.b + t0 * Sk.t + g0 * Sk.h, Sk.t, Sk.h, len, nh, N, C, Ka.data());
        pack_heads(v + b * Sv.b + t0 * Sv.t + g0 * Sv.h, Sv.t, Sv.h, len, nh, P, C, Va.data());
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t h = g0 + j;
          const float *Qc = Qa.data() + j * C * N, *Kc = Ka.data() + j * C * N, *Vc = Va.data() + j * C * P;
          float* Yc = Ya.data() + j * C * P;
          float* Sh = S.data() + j * NP;
          const float gamma = chunk_decays(ld + b * Sl.b + t0 * Sl.t + h * Sl.h, Sl.t, len, cum.data(), seg.data(),
                                           e.data(), f.data(), reset.get());
          store_stream(Sh, NP, states + ((b * H + h) * chunks + i) * NP);
          transpose(Kc, N, len, N, KT.data(), C);
          gemm('N', 'N', len, len, N, 1.0f, Qc, N, KT.data(), C, 0.0f, A.data(), C, Tri::LOWER_C);  // q k^T
          decay_mask(cum.data(), seg.data(), len, C, D.data(), A.data(), work.data());
          gemm('N', 'N', len, P, len, 1.0f, A.data(), C, Vc, P, 0.0f, Yc, P, Tri::LOWER_A);  // intra-chunk
          if (e[0] != 0.0f) {  // the carried state, decayed to each t: (q * e) S
            scale_rows(Qc, N, e.data(), len, N, Xs.data());
            gemm('N', 'N', len, P, N, 1.0f, Xs.data(), N, Sh, P, 1.0f, Yc, P);
          }
          scale_rows(Kc, N, f.data(), len, N, Xs.data());  // S = gamma S + (k * f)^T v
          gemm('T', 'N', N, P, len, 1.0f, Xs.data(), N, Vc, P, gamma, Sh, P);
        }
        unpack_heads(Ya.data(), len, nh, P, C, y + ((b * T + t0) * H + g0) * P, H * P, P);
      }
      std::copy(S.begin(), S.begin() + nh * NP, final_state + (b * H + g0) * NP);
    }
    fence_stores();
  });
}

// Gradients, given gy [B, T, H, P] and g_final [B, H, N, P] (contiguous; g_final may be null) and the states
// saved by the forward. Out (contiguous): grad_q, grad_k [B, T, H, N], grad_v [B, T, H, P], grad_ld [B, T, H]
// (0 at resets) and grad_h0 [B, H, N, P] (may be null).
void liquid_chunked_backward(sgemm_t sgemm, threads_local_t threads_local, const float* q, const float* k,
                             const float* v, const float* ld, const float* states, const float* gy,
                             const float* g_final, float* grad_q, float* grad_k, float* grad_v, float* grad_ld,
                             float* grad_h0, int64_t B, int64_t T, int64_t H, int64_t N, int64_t P, int64_t C,
                             const int64_t* sq, const int64_t* sk, const int64_t* sv, const int64_t* sl,
                             int64_t threads) {
  const Gemm gemm{sgemm};
  const Strides Sq(sq), Sk(sk), Sv(sv), Sl(sl);
  const int64_t chunks = (T + C - 1) / C, NP = N * P;
  over_heads_blas1(B, H, threads, threads_local, [&](int64_t b, int64_t h_lo, int64_t h_hi) {
    const int64_t G = std::min<int64_t>(HEAD_GROUP, h_hi - h_lo);
    std::vector<float> A(C * C), D(C * C), dA(C * C), Qa(G * C * N), Ka(G * C * N), Va(G * C * P), dYa(G * C * P),
        dQa(G * C * N), dKa(G * C * N), dVa(G * C * P), KT(N * C), VT(P * C), Xs(C * N), ST(NP), dS_all(G * NP),
        cum(C), seg(C), e(C), f(C), dcum(C), work(2 * C);
    std::unique_ptr<bool[]> reset(new bool[C]);
    for (int64_t g0 = h_lo; g0 < h_hi; g0 += G) {
      const int64_t nh = std::min(G, h_hi - g0);
      if (g_final) std::copy(g_final + (b * H + g0) * NP, g_final + (b * H + g0 + nh) * NP, dS_all.begin());
      else std::fill(dS_all.begin(), dS_all.end(), 0.0f);
      for (int64_t i = chunks - 1; i >= 0; --i) {  // chunk-major over the group's heads, as in the forward
        const int64_t t0 = i * C, len = std::min(C, T - t0);
        const int64_t row0 = (b * T + t0) * H + g0;  // first (token, head) row of the contiguous gy and outputs
        pack_heads(q + b * Sq.b + t0 * Sq.t + g0 * Sq.h, Sq.t, Sq.h, len, nh, N, C, Qa.data());
        pack_heads(k + b * Sk.b + t0 * Sk.t + g0 * Sk.h, Sk.t, Sk.h, len, nh, N, C, Ka.data());
        pack_heads(v + b * Sv.b + t0 * Sv.t + g0 * Sv.h, Sv.t, Sv.h, len, nh, P, C, Va.data());
        pack_heads(gy + row0 * P, H * P, P, len, nh, P, C, dYa.data());
        for (int64_t j = 0; j < nh; ++j) {
          const int64_t h = g0 + j;
          const float *Qc = Qa.data() + j * C * N, *Kc = Ka.data() + j * C * N, *Vc = Va.data() + j * C * P;
          const float* dY = dYa.data() + j * C * P;
          float *dQ = dQa.data() + j * C * N, *dK = dKa.data() + j * C * N, *dV = dVa.data() + j * C * P;
          float* dS = dS_all.data() + j * NP;
          const float* S_in = states + ((b * H + h) * chunks + i) * NP;
          const float gamma = chunk_decays(ld + b * Sl.b + t0 * Sl.t + h * Sl.h, Sl.t, len, cum.data(), seg.data(),
                                           e.data(), f.data(), reset.get());
          transpose(Kc, N, len, N, KT.data(), C);
          gemm('N', 'N', len, len, N, 1.0f, Qc, N, KT.data(), C, 0.0f, A.data(), C, Tri::LOWER_C);  // A = (q k^T) * D
          decay_mask(cum.data(), seg.data(), len, C, D.data(), A.data(), work.data());
          transpose(Vc, P, len, P, VT.data(), C);
          gemm('N', 'N', len, len, P, 1.0f, dY, P, VT.data(), C, 0.0f, dA.data(), C, Tri::LOWER_C);  // dA = dy v^T
          gemm('T', 'N', len, P, len, 1.0f, A.data(), C, dY, P, 0.0f, dV, P, Tri::LOWER_A);  // dv = A^T dy
          scale_rows(Kc, N, f.data(), len, N, Xs.data());                      //    + (k * f) dS
          gemm('N', 'N', len, P, N, 1.0f, Xs.data(), N, dS, P, 1.0f, dV, P);
          mask_backward(A.data(), D.data(), len, C, dA.data(), dcum.data());  // dA becomes dL/d(q k^T)
          // dq = e * (dy S_in^T) + dM k; dcum_t += q_t . (e_t dy_t S_in^T)
          transpose(S_in, P, N, P, ST.data(), N);
          gemm('N', 'N', len, N, P, 1.0f, dY, P, ST.data(), N, 0.0f, dQ, N);
          scale_rows_dot(dQ, Qc, e.data(), len, N, 1.0f, dcum.data(), nullptr);
          gemm('N', 'N', len, N, len, 1.0f, dA.data(), C, Kc, N, 1.0f, dQ, N, Tri::LOWER_A);
          // dk = f * (v dS^T) + dM^T q; dcum_s -= k_s . (f_s v_s dS^T), dcum_last += the same
          transpose(dS, P, N, P, ST.data(), N);
          gemm('N', 'N', len, N, P, 1.0f, Vc, P, ST.data(), N, 0.0f, dK, N);
          float to_last = 0.0f;
          scale_rows_dot(dK, Kc, f.data(), len, N, -1.0f, dcum.data(), &to_last);
          gemm('T', 'N', len, N, len, 1.0f, dA.data(), C, Qc, N, 1.0f, dK, N, Tri::LOWER_A);
          if (gamma != 0.0f) {  // S_out = gamma S_in + ...: dcum_last += gamma <dS, S_in>
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t n = 0; n < NP; ++n) dot += dS[n] * S_in[n];
            to_last += gamma * dot;
          }
          dcum[len - 1] += to_last;
          // dS_in = gamma dS + (q * e)^T dy
          scale_rows(Qc, N, e.data(), len, N, Xs.data());
          gemm('T', 'N', N, P, len, 1.0f, Xs.data(), N, dY, P, gamma, dS, P);
          float run = 0.0f;  // cum_t = sum of log-decays up to t: d log_decay_u = sum_{t >= u} dcum_t
          for (int64_t t = len - 1; t >= 0; --t) {
            run += dcum[t];
            grad_ld[row0 + j + t * H] = reset[t] ? 0.0f : run;
          }
        }
        unpack_heads(dQa.data(), len, nh, N, C, grad_q + row0 * N, H * N, N);
        unpack_heads(dKa.data(), len, nh, N, C, grad_k + row0 * N, H * N, N);
        unpack_heads(dVa.data(), len, nh, P, C, grad_v + row0 * P, H * P, P);
      }
      if (grad_h0) std::copy(dS_all.begin(), dS_all.begin() + nh * NP, grad_h0 + (b * H + g0) * NP);
    }
    fence_stores();
  });
}

}  // extern "C"
"""

# -fno-trapping-math (as torch builds) lets the exp polynomial's float-to-int conversion vectorise.
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
# On x86 the kernels are built for this machine's vector units (AVX-512 / AVX2: the decay masks' exp, the
# transposes and row sums around the matmuls); the cache key then includes the CPU's flags, so a cache shared
# between machines of different kinds holds one build per kind.
_NATIVE = ("-march=native",) if platform.machine() in ("x86_64", "AMD64") else ()


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()
_ENV = "LIQUID_SCAN_CPU_KERNEL"


def _cache_dir() -> Path:
    return Path(os.environ.get("LIQUID_CACHE", Path.home() / ".cache" / "liquid-pretrain")) / "kernels"


def build_library(name: str, source: str, *, env: str) -> tuple[ctypes.CDLL | None, str]:
    """Compile `source` (plain C++, no torch headers) once per machine into LIQUID_CACHE/kernels and load it:
    (the library, "") or (None, why not); (None, "<env>=0") where the environment switch `env` is 0. The
    file name carries a hash of the source, the compiler, its flags and (for -march=native builds) the CPU's
    flags."""
    if os.environ.get(env, "1") == "0":
        return None, f"{env}=0"
    compiler = os.environ.get("CXX", "c++")
    flags = _FLAGS + _NATIVE
    key = hashlib.sha256("\0".join([source, compiler, *flags, platform.machine(), _cpu_id() if _NATIVE else ""])
                         .encode()).hexdigest()[:16]
    path = _cache_dir() / f"liquid_{name}_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "kernel.cpp", Path(tmp) / "kernel.so"
                src.write_text(source)
                subprocess.run([compiler, *flags, str(src), "-o", str(out)], check=True, capture_output=True,
                               text=True, timeout=300)
                os.replace(out, path)  # atomic: concurrent ranks each compile and one copy wins
        return ctypes.CDLL(str(path)), ""
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return None, f"could not build the CPU {name} kernel with {compiler}: {detail.strip()[:300]}"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why not)."""
    lib, why = build_library("scan", _SOURCE, env=_ENV)
    if lib is None:
        return None, why
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.liquid_elementwise_forward.argtypes = [ptr] * 8 + [i64] * 5
    lib.liquid_elementwise_backward.argtypes = [ptr] * 13 + [i64] * 5
    lib.liquid_chunked_forward.argtypes = [ptr] * 10 + [i64] * 6 + [ptr] * 4 + [i64]
    lib.liquid_chunked_backward.argtypes = [ptr] * 14 + [i64] * 6 + [ptr] * 4 + [i64]
    lib.liquid_register_tiles.argtypes, lib.liquid_register_tiles.restype = [], ctypes.c_int
    return lib, ""


def library_available(library, env: str, fallback: str) -> bool:
    """Whether library() (a `build_library` result, or (None, "<env>=0") when switched off) is loaded; any
    other failure warns once per process, "<fallback>: <why>"."""
    lib, why = library()
    if lib is None and why != f"{env}=0":
        _warn_once(f"{fallback}: {why}")
    return lib is not None


def available() -> bool:
    """Whether the kernel is built and loaded (once per process; a failure warns once and returns False)."""
    return library_available(_library, _ENV, _FALLBACK)


_FALLBACK = "the liquid scan takes its PyTorch form on the CPU"


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _ptr(x: torch.Tensor | None):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def _forward_kernel(q, k, a, v, h0, *, keep_states: bool):
    batch, seq, heads, p = v.shape
    y = torch.empty_like(v)
    states = torch.empty_like(v) if keep_states else None
    final = v.new_empty(batch, heads, p)
    _library()[0].liquid_elementwise_forward(_ptr(q), _ptr(k), _ptr(a), _ptr(v), _ptr(h0), _ptr(y), _ptr(states),
                                             _ptr(final), batch, seq, heads, p, torch.get_num_threads())
    return y, states, final


@torch.library.custom_op("liquid::elementwise_scan", mutates_args=())
def elementwise_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                     h0: torch.Tensor | None, keep_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The element-wise recurrence on the CPU (see ElementwiseScanCPU): (y, final state, the states [B, T, H, P]
    for the backward, or an empty tensor without keep_states)."""
    q, k, v, log_decay = (x.float().contiguous() for x in (q, k, v, log_decay))
    h0 = h0.float().contiguous() if h0 is not None else None
    y, states, final = _forward_kernel(q, k, log_decay.exp(), v, h0, keep_states=keep_states)
    return y, final, states if states is not None else v.new_empty(0)


@elementwise_scan.register_fake
def _(q, k, v, log_decay, h0, keep_states):
    batch, seq, heads, p = v.shape
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(batch, seq, heads, p, **f32), v.new_empty(batch, heads, p, **f32),
            v.new_empty(batch, seq, heads, p, **f32) if keep_states else v.new_empty(0, **f32))


@torch.library.custom_op("liquid::elementwise_scan_backward", mutates_args=())
def elementwise_scan_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                              h0: torch.Tensor | None, states: torch.Tensor, gy: torch.Tensor, g_final: torch.Tensor,
                              want_h0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """elementwise_scan's gradients (q, k, v, log_decay, h0: the last [0] unless want_h0) given those of y and of
    the final state; `states` empty: the forward runs again first (recompute)."""
    q, k, v, log_decay = (x.float().contiguous() for x in (q, k, v, log_decay))
    h0 = h0.float().contiguous() if h0 is not None else None
    a = log_decay.exp()
    if states.numel() == 0 and v.numel():
        states = _forward_kernel(q, k, a, v, h0, keep_states=True)[1]
    batch, seq, heads, p = v.shape
    gy, g_final = gy.float().contiguous(), g_final.float().contiguous()
    grad_q, grad_k, grad_a = (torch.empty_like(a) for _ in range(3))
    grad_v = torch.empty_like(v)
    grad_h0 = torch.empty_like(h0) if want_h0 and h0 is not None else v.new_empty(0)
    _library()[0].liquid_elementwise_backward(
        _ptr(q), _ptr(k), _ptr(a), _ptr(v), _ptr(h0), _ptr(states), _ptr(gy), _ptr(g_final), _ptr(grad_q),
        _ptr(grad_k), _ptr(grad_a), _ptr(grad_v), _ptr(grad_h0) if grad_h0.numel() else None, batch, seq, heads, p,
        torch.get_num_threads())
    return grad_q, grad_k, grad_v, grad_a, grad_h0  # grad_a: of log_decay (the kernel applies a)


@elementwise_scan_backward.register_fake
def _(q, k, v, log_decay, h0, states, gy, g_final, want_h0):
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(q.shape, **f32), k.new_empty(k.shape, **f32), v.new_empty(v.shape, **f32),
            log_decay.new_empty(log_decay.shape, **f32),
            h0.new_empty(h0.shape, **f32) if want_h0 and h0 is not None else v.new_empty(0, **f32))


def _elementwise_setup(ctx, inputs, output):
    q, k, v, log_decay, h0, _ = inputs
    ctx.with_h0 = h0 is not None
    ctx.save_for_backward(q, k, v, log_decay, h0, output[2])
    ctx.set_materialize_grads(False)  # see _chunked_scan_setup


def _elementwise_grad(ctx, gy, g_final, _g_states):
    q, k, v, log_decay, h0, states = ctx.saved_tensors
    gy = gy if gy is not None else torch.zeros_like(v, dtype=torch.float32)
    g_final = g_final if g_final is not None else v.new_zeros(v.shape[0], v.shape[2], v.shape[3], dtype=torch.float32)
    want_h0 = ctx.with_h0 and ctx.needs_input_grad[4]
    grads = elementwise_scan_backward(q, k, v, log_decay, h0, states, gy, g_final, want_h0)
    return *grads[:4], grads[4] if want_h0 else None, None


elementwise_scan.register_autograd(_elementwise_grad, setup_context=_elementwise_setup)


class ElementwiseScanCPU:
    """Inputs: q, k [B, T, H], v [B, T, H, P], log_decay [B, T, H] (cast to fp32 and made contiguous; -inf is
    a reset), h0 [B, H, P] or None, recompute (keep only the inputs for backward, run the forward again there).
    Returns y [B, T, H, P] and the final state [B, H, P]. Custom ops (liquid::elementwise_scan and its
    backward, with shape functions), so torch.compile keeps a block that calls it in one graph."""

    @staticmethod
    def apply(q, k, v, log_decay, h0, recompute: bool):
        y, final, _ = elementwise_scan(q, k, v, log_decay, h0, not recompute)
        return y, final


@functools.cache
def _torch_cpu_library() -> ctypes.CDLL | None:
    """torch's own CPU library (already loaded by `import torch`), or None where it is not found."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                continue
    return None


@functools.cache
def _sgemm() -> tuple[int | None, str]:
    """(address of the sgemm that torch links, "") or (None, why not). torch's x86 wheels link MKL statically
    and export its Fortran-style `sgemm_`; the address is checked once on a small product against torch."""
    lib = _torch_cpu_library()
    if lib is None or not hasattr(lib, "sgemm_"):
        return None, f"torch's CPU library in {Path(torch.__file__).parent / 'lib'} exports no sgemm_"
    addr = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    i32p, f32p = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float)
    call = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, i32p, i32p, i32p, f32p, f32p, i32p, f32p, i32p,
                            f32p, f32p, i32p)(addr)
    # A [2 x 3] times B [3 x 4], row-major, in plain ctypes arrays: no tensors, so the check also holds when
    # the first use comes under a fake-tensor mode (liquid dryrun), where tensors have no memory.
    a = [float(i) for i in range(6)]
    b = [float(i - 5) for i in range(12)]
    want = [sum(a[r * 3 + j] * b[j * 4 + c] for j in range(3)) for r in range(2) for c in range(4)]
    arr_a, arr_b, arr_c = (ctypes.c_float * 6)(*a), (ctypes.c_float * 12)(*b), (ctypes.c_float * 8)(*[math.nan] * 8)
    i = lambda x: ctypes.byref(ctypes.c_int(x))  # noqa: E731
    f = lambda x: ctypes.byref(ctypes.c_float(x))  # noqa: E731
    # row-major c = a b as column-major c^T = b^T a^T
    call(b"N", b"N", i(4), i(2), i(3), f(1.0), arr_b, i(4), arr_a, i(3), f(0.0), arr_c, i(4))
    if list(arr_c) != want:
        return None, "torch's sgemm_ did not compute a test product correctly (not a 32-bit-integer BLAS?)"
    return addr, ""


@functools.cache
def _blas() -> tuple[int, int | None]:
    """(sgemm_'s address, MKL_Set_Num_Threads_Local's or None where the BLAS is not MKL)."""
    lib = _torch_cpu_library()
    local = getattr(lib, "MKL_Set_Num_Threads_Local", None) if lib is not None else None
    return _sgemm()[0], ctypes.cast(local, ctypes.c_void_p).value if local is not None else None


def chunked_available() -> bool:
    """Whether the chunked kernel can run: the library built and torch's sgemm found (a failure warns once)."""
    if not available():
        return False
    addr, why = _sgemm()
    if addr is None:
        _warn_once(f"{_FALLBACK}: {why}")
    return addr is not None


def register_tiles() -> bool:
    """Whether the chunked kernel multiplies full chunks (N and P multiples of 16) in its own AVX-512 register
    tiles; False where it takes torch's sgemm for every product (no AVX-512, or the kernel not built)."""
    return chunked_available() and bool(_library()[0].liquid_register_tiles())


def _strides(x: torch.Tensor):
    """(batch, seq, head) strides of a [B, T, H, ...] tensor, as the int64[3] the kernel reads."""
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as fp32 with its last dimension contiguous (the kernel reads the other strides as they are)."""
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _chunk_shapes(q, v, chunk):
    batch, seq, heads, n = q.shape
    return batch, seq, heads, n, v.shape[-1], -(-seq // chunk)


@torch.library.custom_op("liquid::chunked_scan", mutates_args=())
def chunked_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                 h0: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liquid_scan's chunked algorithm on the CPU (see ChunkedScanCPU): (y, final state, the state entering
    each chunk [B, H, chunks, N, P], kept for the backward)."""
    q, k, v, log_decay = (_rows(x) for x in (q, k, v, log_decay))
    h0 = h0.float().contiguous() if h0 is not None else None
    batch, seq, heads, n, p, chunks = _chunk_shapes(q, v, chunk)
    y = v.new_empty(batch, seq, heads, p)
    states = v.new_empty(batch, heads, chunks, n, p)
    final = v.new_empty(batch, heads, n, p)
    _library()[0].liquid_chunked_forward(*_blas(), _ptr(q), _ptr(k), _ptr(v), _ptr(log_decay), _ptr(h0), _ptr(y),
                                         _ptr(states), _ptr(final), batch, seq, heads, n, p, chunk, _strides(q),
                                         _strides(k), _strides(v), _strides(log_decay), torch.get_num_threads())
    return y, final, states


@chunked_scan.register_fake
def _(q, k, v, log_decay, h0, chunk):
    batch, seq, heads, n, p, chunks = _chunk_shapes(q, v, chunk)
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(batch, seq, heads, p, **f32), v.new_empty(batch, heads, n, p, **f32),
            v.new_empty(batch, heads, chunks, n, p, **f32))


@torch.library.custom_op("liquid::chunked_scan_backward", mutates_args=())
def chunked_scan_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                          states: torch.Tensor, gy: torch.Tensor, g_final: torch.Tensor, with_h0: bool,
                          chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunked_scan's gradients (q, k, v, log_decay, h0; the last [0] unless with_h0), given those of y and of
    the final state."""
    q, k, v, log_decay = (_rows(x) for x in (q, k, v, log_decay))
    gy, g_final, states = gy.float().contiguous(), g_final.float().contiguous(), states.contiguous()
    batch, seq, heads, n, p, _ = _chunk_shapes(q, v, chunk)
    grad_q, grad_k = q.new_empty(batch, seq, heads, n), q.new_empty(batch, seq, heads, n)
    grad_v, grad_ld = v.new_empty(batch, seq, heads, p), v.new_empty(batch, seq, heads)
    grad_h0 = v.new_empty(batch, heads, n, p) if with_h0 else v.new_empty(0)
    _library()[0].liquid_chunked_backward(
        *_blas(), _ptr(q), _ptr(k), _ptr(v), _ptr(log_decay), _ptr(states), _ptr(gy), _ptr(g_final),
        _ptr(grad_q), _ptr(grad_k), _ptr(grad_v), _ptr(grad_ld), _ptr(grad_h0) if with_h0 else None, batch, seq,
        heads, n, p, chunk, _strides(q), _strides(k), _strides(v), _strides(log_decay), torch.get_num_threads())
    return grad_q, grad_k, grad_v, grad_ld, grad_h0


@chunked_scan_backward.register_fake
def _(q, k, v, log_decay, states, gy, g_final, with_h0, chunk):
    batch, seq, heads, n, p, _ = _chunk_shapes(q, v, chunk)
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(batch, seq, heads, n, **f32), q.new_empty(batch, seq, heads, n, **f32),
            v.new_empty(batch, seq, heads, p, **f32), v.new_empty(batch, seq, heads, **f32),
            v.new_empty(batch, heads, n, p, **f32) if with_h0 else v.new_empty(0, **f32))


def _chunked_scan_setup(ctx, inputs, output):
    q, k, v, log_decay, h0, chunk = inputs
    ctx.chunk, ctx.with_h0 = chunk, h0 is not None
    ctx.save_for_backward(q, k, v, log_decay, output[2])
    # The saved states (an output only so that autograd keeps them) never get a gradient; without this
    # autograd would fill a zero tensor of their size for it on every backward ([B, H, chunks, N, P]: at
    # 16384 tokens, 16 heads, N 64, P 128, 128 MiB; 2.3% of the scan's forward + backward).
    ctx.set_materialize_grads(False)


def _chunked_scan_grad(ctx, gy, g_final, _g_states):
    q, k, v, log_decay, states = ctx.saved_tensors
    batch, seq, heads, n, p, _ = _chunk_shapes(q, v, ctx.chunk)
    gy = gy if gy is not None else v.new_zeros(batch, seq, heads, p, dtype=torch.float32)
    g_final = g_final if g_final is not None else v.new_zeros(batch, heads, n, p, dtype=torch.float32)
    grad_q, grad_k, grad_v, grad_ld, grad_h0 = chunked_scan_backward(q, k, v, log_decay, states, gy, g_final,
                                                                     ctx.with_h0, ctx.chunk)
    return grad_q, grad_k, grad_v, grad_ld, grad_h0 if ctx.with_h0 else None, None


chunked_scan.register_autograd(_chunked_scan_grad, setup_context=_chunked_scan_setup)


def _chunk_lengths(seq: int, chunk: int):
    return [min(chunk, seq - start) for start in range(0, seq, chunk)]


def _chunked_forward_flops(q_shape, v_shape, chunk: int) -> int:
    """The forward's matmul FLOPs, chunk by chunk (the last one as long as it is): q k^T and its product with
    v (L^2 N + L^2 P), the carried state's term and the state update (2 L N P), 2 FLOPs a multiply-add. The
    chunk's full products, as flops.py counts the model's FLOPs for MFU; `liquid bench scan` counts only the
    causal pairs (chunked_scan_flops), the work the kernel's AVX-512 tiles do."""
    batch, seq, heads, n = q_shape
    p = v_shape[-1]
    return 2 * batch * heads * sum(L * L * (n + p) + 2 * L * n * p for L in _chunk_lengths(seq, chunk))


@register_flop_formula(torch.ops.liquid.chunked_scan)
def _(q_shape, k_shape, v_shape, ld_shape, h0_shape, chunk, *args, out_shape=None, **kwargs) -> int:
    """For torch.utils.flop_counter (liquid dryrun counts the step's FLOPs with it): the matmuls run inside
    the kernel, where the counter does not see them."""
    return _chunked_forward_flops(q_shape, v_shape, chunk)


@register_flop_formula(torch.ops.liquid.chunked_scan_backward)
def _(q_shape, k_shape, v_shape, ld_shape, states_shape, gy_shape, g_final_shape, with_h0, chunk, *args,
      out_shape=None, **kwargs) -> int:
    """Twice the forward: each matmul's two input gradients. The scores q k^T the backward recomputes are
    not counted (recomputation, not model FLOPs, as neither flops.py nor the bench's chunked_scan_flops count
    it)."""
    return 2 * _chunked_forward_flops(q_shape, v_shape, chunk)


class ChunkedScanCPU:
    """liquid_scan's chunked algorithm as one C++ pass per direction over each (batch, head): per chunk of C
    tokens the four matmuls (q k^T, its masked product with v, the carried state's term and the state update)
    through torch's sgemm on cache-resident tiles, the decay masks and state passing fused around them.
    As custom ops (liquid::chunked_scan and its backward, each with a shape function), so torch.compile keeps
    a block that calls it in one graph.

    Inputs: q, k [B, T, H, N], v [B, T, H, P], log_decay [B, T, H] (cast to fp32; strides are read as they
    are where the last dimension is contiguous, so views of a projection's output need no copy; -inf is a
    reset), h0 [B, H, N, P] or None, chunk size C. Returns y [B, T, H, P] and the final state [B, H, N, P],
    fp32. Keeps for backward the inputs and the state entering each chunk ([B, H, chunks, N, P], N P / C
    floats per token and head), and recomputes each chunk's masked scores there (one extra C x C x N matmul
    per chunk)."""

    @staticmethod
    def apply(q, k, v, log_decay, h0, chunk: int):
        y, final, _ = chunked_scan(q, k, v, log_decay, h0, chunk)
        return y, final


__all__ = ["ChunkedScanCPU", "ElementwiseScanCPU", "available", "chunked_available", "chunked_scan",
           "elementwise_scan"]
