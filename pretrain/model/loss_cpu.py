"""The head's cross-entropy on the CPU as one C++ pass per row: the loss and its gradient, in place.

For each row of fp32 logits (one token's vocab scores) with a label: m = max, s = sum exp(x - m),
loss = m + log s - x[label], and, for the gradient, the row is overwritten by softmax(x) - onehot(label)
(e_j / s, then 1 taken from the label's entry). A row whose label is ignore_index adds 0 and becomes zeros.

Why: pretrain/model/loss.py forms this with torch ops (log_softmax, nll_loss, exp_, scatter_add_, mul_),
five passes over the [tokens, vocab] chunk with a fresh log-softmax tensor between them; at vocab 8192 these
were the largest single non-matmul item of the CPU training step after attention (log_softmax alone 4% of
it). Here each row (32 KiB at vocab 8192) is read into L1/L2 once and written once: two reads of the row
from cache (max, then the exps, stored), one scaling pass. Rows are split over torch's OpenMP threads in
contiguous ranges; each row is one thread's, so the result does not depend on the thread count.

Numerics: the same formula as log_softmax + nll_loss (x - m - log s), the exp a polynomial of about 1 ulp
(scan_cpu.EXP_SOURCE) and the row sum in 16 fp32 lanes: within a few ulp of torch's (tested to 1e-6).
Built once per machine like the scan's kernels; LIQUID_LOSS_CPU_KERNEL=0 (or no compiler: one warning)
keeps the torch ops.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools

import torch

from pretrain.model.scan_cpu import EXP_SOURCE, build_library, library_available

_ENV = "LIQUID_LOSS_CPU_KERNEL"
_OFF = [False]  # torch_ops() sets it

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
""" + EXP_SOURCE + r"""
namespace {

constexpr int64_t LANES = 16;

// One row: returns its loss and, when grad, leaves softmax - onehot in x.
float row_loss(float* __restrict x, int64_t V, int64_t label, bool grad) {
  float mx[LANES];
  for (int64_t l = 0; l < LANES; ++l) mx[l] = -INFINITY;
  int64_t j = 0;
  for (; j + LANES <= V; j += LANES)
    for (int64_t l = 0; l < LANES; ++l) mx[l] = std::max(mx[l], x[j + l]);
  float m = -INFINITY;
  for (int64_t l = 0; l < LANES; ++l) m = std::max(m, mx[l]);
  for (; j < V; ++j) m = std::max(m, x[j]);
  const float target = x[label];
  if (!(m > -INFINITY && m < INFINITY)) {  // inf or nan among the logits: torch's formula gives nan here
    if (grad) for (j = 0; j < V; ++j) x[j] = NAN;
    return NAN;
  }
  float acc[LANES] = {0.0f};
  j = 0;
  if (grad) {
    for (; j + LANES <= V; j += LANES)
      for (int64_t l = 0; l < LANES; ++l) {
        const float e = exp_nonpos(x[j + l] - m);
        x[j + l] = e;
        acc[l] += e;
      }
  } else {
    for (; j + LANES <= V; j += LANES)
      for (int64_t l = 0; l < LANES; ++l) acc[l] += exp_nonpos(x[j + l] - m);
  }
  float s = 0.0f;
  for (int64_t l = 0; l < LANES; ++l) s += acc[l];
  for (; j < V; ++j) {
    const float e = exp_nonpos(x[j] - m);
    if (grad) x[j] = e;
    s += e;
  }
  const float loss = (m + std::log(s)) - target;
  if (grad) {
    const float inv = 1.0f / s;
    for (j = 0; j < V; ++j) x[j] *= inv;
    x[label] -= 1.0f;
  }
  return loss;
}

}  // namespace

extern "C" {

// logits [R, V] fp32 row-major (rows `ld` apart), labels [R] int64; losses [R] out. Rows whose label is
// ignore_index get loss 0 (and zeros when grad). Returns the first row whose label is out of range, or -1
// (then nothing was written).
int64_t liquid_cross_entropy_rows(float* logits, const int64_t* labels, float* losses, int64_t R, int64_t V,
                                  int64_t ld, int64_t ignore_index, int64_t grad, int64_t threads) {
  for (int64_t r = 0; r < R; ++r)
    if (labels[r] != ignore_index && (labels[r] < 0 || labels[r] >= V)) return r;
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, R));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t r = R * t / threads; r < R * (t + 1) / threads; ++r) {
      float* x = logits + r * ld;
      if (labels[r] == ignore_index) {
        losses[r] = 0.0f;
        if (grad) std::fill(x, x + V, 0.0f);
      } else {
        losses[r] = row_loss(x, V, labels[r], grad != 0);
      }
    }
  }
  return -1;
}

}  // extern "C"
"""


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    lib, why = build_library("loss", _SOURCE, env=_ENV)
    if lib is not None:
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.liquid_cross_entropy_rows.argtypes = [ptr] * 3 + [i64] * 6
        lib.liquid_cross_entropy_rows.restype = i64
    return lib, why


def available() -> bool:
    """Whether the kernel is built and loaded (decided once per process; a build failure warns once)."""
    return library_available(_library, _ENV, "the head's cross-entropy takes torch's ops on the CPU")


@contextlib.contextmanager
def torch_ops():
    """Inside, the head's cross-entropy takes torch's ops on the CPU too (for tests and measurements of that
    form). Not thread-safe."""
    saved, _OFF[0] = _OFF[0], True
    try:
        yield
    finally:
        _OFF[0] = saved


def applies(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether cross_entropy_rows_ can take these: fp32 CPU logits [R, V] with unit column stride, int64
    labels [R], and the kernel built. Fake tensors too (`liquid dryrun` of a CPU run: see
    cross_entropy_rows_)."""
    return (not _OFF[0] and logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(1) == 1 and labels.dtype == torch.int64 and labels.dim() == 1
            and labels.shape[0] == logits.shape[0] and available())


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, *, grad: bool) -> torch.Tensor:
    """Per-row losses [R] fp32 of cross_entropy(logits, labels) (0 for ignored rows); with grad, logits is
    overwritten by d(sum of losses)/d logits = softmax - onehot (zeros on ignored rows). Check `applies`
    first. An out-of-range label raises IndexError (as nll_loss does) before anything is written.
    On fake tensors (`liquid dryrun`) nothing is computed: the losses' tensor is made and the logits stand
    for their gradient, which is the kernel's memory."""
    from torch._subclasses.fake_tensor import is_fake

    losses = logits.new_empty(logits.shape[0], dtype=torch.float32)
    if is_fake(logits) or is_fake(labels):
        return losses
    labels = labels.contiguous()
    bad = _library()[0].liquid_cross_entropy_rows(
        ctypes.c_void_p(logits.data_ptr()), ctypes.c_void_p(labels.data_ptr()), ctypes.c_void_p(losses.data_ptr()),
        logits.shape[0], logits.shape[1], logits.stride(0), ignore_index, int(grad), torch.get_num_threads())
    if bad >= 0:
        raise IndexError(f"label {int(labels[bad])} of token {bad} is out of bounds for vocab {logits.shape[1]}")
    return losses
