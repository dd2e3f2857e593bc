"""The element-wise liquid recurrence (key_dim 1) on the CPU as one fused C++ loop per direction.

S_t = a_t S_{t-1} + k_t v_t per channel, y_t = q_t S_t (see pretrain/model/scan.py, `_ElementwiseScan`, the
PyTorch form of the same recurrence, which stays the fallback and the form on other devices).

Why a kernel: the PyTorch form is a few dozen whole-tensor element-wise ops, each reading and writing
[B, T, H, P] from memory, about 30 passes per forward + backward at P = 1; this loop reads each input once
and writes each output once (forward: q, k, a, v in, y and the states out; backward: those, the states and
dy in, the four gradients out), with the running state of a block of channels in cache.

Work split: contiguous ranges of (batch, head) pairs over torch.get_num_threads() threads of the OpenMP team
(torch's own libgomp, already loaded), each channel computed by one thread in time order, so the result does
not depend on the thread count.
Plain C++ with no torch headers, compiled once per machine with the system's C++ compiler (about a second)
into LIQUID_CACHE/kernels (default ~/.cache/liquid-pretrain/kernels) and loaded with ctypes; where that
fails (no compiler), `available()` says why and liquid_scan keeps the PyTorch form.
LIQUID_SCAN_CPU_KERNEL=0 turns it off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <vector>

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
"""

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp")
_ENV = "LIQUID_SCAN_CPU_KERNEL"


def _cache_dir() -> Path:
    return Path(os.environ.get("LIQUID_CACHE", Path.home() / ".cache" / "liquid-pretrain")) / "kernels"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel library, "") or (None, why not)."""
    if os.environ.get(_ENV, "1") == "0":
        return None, f"{_ENV}=0"
    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"liquid_elementwise_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, out = Path(tmp) / "kernel.cpp", Path(tmp) / "kernel.so"
                src.write_text(_SOURCE)
                subprocess.run([compiler, *_FLAGS, str(src), "-o", str(out)], check=True, capture_output=True,
                               text=True, timeout=300)
                os.replace(out, path)  # atomic: concurrent ranks each compile and one copy wins
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return None, f"could not build the CPU scan kernel with {compiler}: {detail.strip()[:300]}"
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.liquid_elementwise_forward.argtypes = [ptr] * 8 + [i64] * 5
    lib.liquid_elementwise_backward.argtypes = [ptr] * 13 + [i64] * 5
    return lib, ""


def available() -> bool:
    """Whether the kernel is built and loaded (once per process; a failure warns once and returns False)."""
    lib, why = _library()
    if lib is None and why != f"{_ENV}=0":
        _warn_once(why)
    return lib is not None


@functools.cache
def _warn_once(why: str) -> None:
    warnings.warn(f"the element-wise liquid scan takes its PyTorch form on the CPU: {why}", RuntimeWarning,
                  stacklevel=3)


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


class ElementwiseScanCPU(torch.autograd.Function):
    """Inputs: q, k [B, T, H], v [B, T, H, P], log_decay [B, T, H] (fp32, contiguous; -inf is a reset),
    h0 [B, H, P] or None, recompute (keep only the inputs for backward, run the forward again there).
    Returns y [B, T, H, P] and the final state [B, H, P]."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, h0, recompute: bool):
        a = log_decay.exp()
        y, states, final = _forward_kernel(q, k, a, v, h0, keep_states=not recompute)
        ctx.save_for_backward(q, k, v, a, h0, states)
        return y, final

    @staticmethod
    def backward(ctx, gy, g_final):
        q, k, v, a, h0, states = ctx.saved_tensors
        if states is None:
            states = _forward_kernel(q, k, a, v, h0, keep_states=True)[1]
        batch, seq, heads, p = v.shape
        gy = gy.contiguous() if gy is not None else torch.zeros_like(v)
        g_final = g_final.contiguous() if g_final is not None else None
        grad_q, grad_k, grad_a = (torch.empty_like(a) for _ in range(3))
        grad_v = torch.empty_like(v)
        want_h0 = h0 is not None and ctx.needs_input_grad[4]
        grad_h0 = torch.empty_like(h0) if want_h0 else None
        _library()[0].liquid_elementwise_backward(
            _ptr(q), _ptr(k), _ptr(a), _ptr(v), _ptr(h0), _ptr(states), _ptr(gy), _ptr(g_final), _ptr(grad_q),
            _ptr(grad_k), _ptr(grad_a), _ptr(grad_v), _ptr(grad_h0), batch, seq, heads, p, torch.get_num_threads())
        return grad_q, grad_k, grad_v, grad_a, grad_h0, None  # grad_a: of log_decay (the kernel applies a)


__all__ = ["ElementwiseScanCPU", "available"]
