"""A CPU kernel for the paged layout's decode attention: each row's query reads its keys and values where they
lie in the blocks, with no gather into a contiguous buffer (which adds a copy of everything a layer reads).

Built on first use with torch's C++ extension loader (a C++ compiler is needed; the build is cached by torch).
Where it cannot be built, or for other dtypes and devices, `load()` returns None and the paged cache gathers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("prefixserve.engine")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

// q [n, H, G, D]; k, v [num_blocks, B, H, D]; tables [n, nb]; num_prefix, shift, positions [n].
// Row i sees logical keys [0, P) and [P + shift, position + shift]; logical key j lies in block
// tables[i, j / B] at offset j % B. Softmax, then the weighted sum of values, as SDPA computes them.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tables,
                           torch::Tensor num_prefix, torch::Tensor shift, torch::Tensor positions,
                           double scale) {
  const int64_t n = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t B = k.size(1), width = tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* pp = num_prefix.data_ptr<int64_t>();
  const int64_t* sp = shift.data_ptr<int64_t>();
  const int64_t* xp = positions.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, n * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w;
    std::vector<int64_t> rows;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t i = job / H, h = job % H;
      const int64_t P = pp[i], own = P + sp[i], last = xp[i] + sp[i];
      const int64_t nk = P + (last - own + 1);
      rows.resize(nk);
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t key = j < P ? j : own + (j - P);
        rows[j] = (tp[i * width + key / B] * B + key % B) * H + h;  // entry row in [*, D]
      }
      w.resize(G * nk);
      for (int64_t g = 0; g < G; ++g) {
        const float* qr = qp + ((i * H + h) * G + g) * D;
        float* wg = w.data() + g * nk;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < nk; ++j) {
          const float* kr = kp + rows[j] * D;
          float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};  // 8 lanes: the compiler vectorises
          int64_t d = 0;
          for (; d + 8 <= D; d += 8)
            for (int u = 0; u < 8; ++u) part[u] += qr[d + u] * kr[d + u];
          float dot = 0.f;
          for (int u = 0; u < 8; ++u) dot += part[u];
          for (; d < D; ++d) dot += qr[d] * kr[d];
          wg[j] = dot * s;
          top = wg[j] > top ? wg[j] : top;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < nk; ++j) {
          wg[j] = std::exp(wg[j] - top);
          sum += wg[j];
        }
        for (int64_t j = 0; j < nk; ++j) wg[j] /= sum;
        float* o = op + ((i * H + h) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        for (int64_t j = 0; j < nk; ++j) {
          const float* vr = vp + rows[j] * D;
          const float a = wg[j];
          for (int64_t d = 0; d < D; ++d) o[d] += a * vr[d];
        }
      }
    }
  });
  return out;
}
"""

_lock = threading.Lock()
_module: Any = None
_tried = False


def load() -> Any:
    """The compiled module (its `paged_decode`), or None where it cannot be built."""
    global _module, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                from torch.utils.cpp_extension import load_inline

                _module = load_inline(
                    "prefixserve_paged_decode",
                    cpp_sources=_SOURCE,
                    functions=["paged_decode"],
                    extra_cflags=["-O3"],
                )
            except Exception as exc:  # no compiler, no headers: the gather path serves
                log.warning("paged decode kernel not built (%s); paged decode gathers its blocks", exc)
        return _module
