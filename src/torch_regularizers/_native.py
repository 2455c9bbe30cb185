"""Optional fused CPU kernels (C++), built on request with ``torch.utils.cpp_extension``.

One pass over the data per penalty: ``g ← g + a·sign(θ)`` reads θ and g and writes g,
exactly like the floor ``torch._foreach_add_(grads, params, alpha=0)``, where the stock
ATen sequence needs a ``sign`` pass and an ``add`` pass. All tensors of a call are
processed in *one* ``at::parallel_for`` over their concatenated index range, so thousands
of tiny tensors cost one dispatch instead of one per tensor per op.

Every kernel reproduces, element by element, the rounding of the ATen op sequence it
replaces (the ``_foreach_*`` reference in :mod:`torch_regularizers.kernels`):

* ``sign(x)`` is ``(0 < x) − (x < 0)`` in the tensor's dtype (0 for ±0 and NaN);
* ``add_(other, alpha=a)`` is ``fma(other, a, self)`` in the op-math type (fp32 for
  bf16/fp16), ``a`` rounded to the op-math type, then rounded to the tensor's dtype;
* ``mul_(c)``/``div_(d)`` by a Python scalar, ``clamp(x, −t, t)`` with ``t`` rounded to the
  tensor's dtype (NaN propagates).

The tests compare every kernel with that ATen sequence bit for bit. Building takes
about 30 s (a C++ compiler and ninja are needed); the shared library is cached under
``$TORCH_REGULARIZERS_CACHE`` (default ``~/.cache/torch_regularizers``), keyed by a hash
of the source, the compiler flags, the torch version and the CPU, so later processes
load it in milliseconds.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using TL = std::vector<at::Tensor>;
constexpr int64_t kGrain = 32768;

bool usable(const TL& ts, at::ScalarType dt) {
  for (const auto& t : ts) {
    if (!t.defined() || t.device().type() != at::kCPU || t.scalar_type() != dt ||
        !t.is_contiguous() || t.is_inference() || t.is_neg() || t.is_conj())
      return false;
  }
  return true;
}

bool same_numel(const TL& a, const TL& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].numel() != b[i].numel()) return false;
  return true;
}

std::vector<int64_t> offsets(const TL& ts) {
  std::vector<int64_t> offs(ts.size() + 1, 0);
  for (size_t i = 0; i < ts.size(); ++i) offs[i + 1] = offs[i] + ts[i].numel();
  return offs;
}

// f(k, lo, hi): process elements [lo, hi) of tensor k. One parallel region for the list.
template <typename F>
void for_all(const std::vector<int64_t>& offs, const F& f) {
  const int64_t total = offs.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t b, int64_t e) {
    int64_t k = std::upper_bound(offs.begin(), offs.end(), b) - offs.begin() - 1;
    while (b < e) {
      const int64_t stop = std::min(e, offs[k + 1]);
      if (stop > b) f(k, b - offs[k], stop - offs[k]);
      b = std::max(b, stop);
      ++k;
    }
  });
}

void bump(const TL& ts) {
  for (const auto& t : ts) torch::autograd::impl::bump_version(t);
}

template <typename T>
inline T sgn(T x) { return static_cast<T>((T(0) < x) - (x < T(0))); }

}  // namespace

// g <- g + a*sign(p)  (= g.add_(sign(p), alpha=a)); with gs = ps: p <- p + a*sign(p)
bool sign_add_(const TL& ps, const TL& gs, double a) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt) || !usable(gs, dt) || !same_numel(ps, gs)) return false;
  const auto offs = offsets(ps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "sign_add_", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t al = static_cast<op_t>(a);
    for_all(offs, [&](int64_t k, int64_t lo, int64_t hi) {
      const scalar_t* p = ps[k].data_ptr<scalar_t>();  // may alias g (decoupled L1)
      scalar_t* g = gs[k].data_ptr<scalar_t>();
      for (int64_t i = lo; i < hi; ++i) {
        const op_t s = static_cast<op_t>(sgn<scalar_t>(p[i]));
        g[i] = static_cast<scalar_t>(std::fma(s, al, static_cast<op_t>(g[i])));
      }
    });
  });
  bump(gs);
  return true;
}

// g <- (g + a*sign(p)) + b*p   (= g.add_(sign(p), alpha=a); g.add_(p, alpha=b))
bool sign_axpy_add_(const TL& ps, const TL& gs, double a, double b) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt) || !usable(gs, dt) || !same_numel(ps, gs)) return false;
  const auto offs = offsets(ps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "sign_axpy_add_", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const op_t al = static_cast<op_t>(a), be = static_cast<op_t>(b);
    for_all(offs, [&](int64_t k, int64_t lo, int64_t hi) {
      const scalar_t* p = ps[k].data_ptr<scalar_t>();
      scalar_t* g = gs[k].data_ptr<scalar_t>();
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t x = p[i];
        const op_t s = static_cast<op_t>(sgn<scalar_t>(x));
        const scalar_t g1 = static_cast<scalar_t>(std::fma(s, al, static_cast<op_t>(g[i])));
        g[i] = static_cast<scalar_t>(std::fma(static_cast<op_t>(x), be, static_cast<op_t>(g1)));
      }
    });
  });
  bump(gs);
  return true;
}

// p <- p*c + a*sign(p_old)   (= s = sign(p); p.mul_(c); p.add_(s, alpha=a))
bool scale_sign_add_(const TL& ps, double c, double a) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt)) return false;
  const auto offs = offsets(ps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "scale_sign_add_", [&] {
    using op_t = at::opmath_type<scalar_t>;
    // mul_ by a Python scalar multiplies by the scalar rounded to the tensor's dtype
    const op_t cm = static_cast<op_t>(static_cast<scalar_t>(c));
    const op_t al = static_cast<op_t>(a);
    for_all(offs, [&](int64_t k, int64_t lo, int64_t hi) {
      scalar_t* p = ps[k].data_ptr<scalar_t>();
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t x = p[i];
        const op_t s = static_cast<op_t>(sgn<scalar_t>(x));
        const scalar_t q = static_cast<scalar_t>(static_cast<op_t>(x) * cm);
        p[i] = static_cast<scalar_t>(std::fma(s, al, static_cast<op_t>(q)));
      }
    });
  });
  bump(ps);
  return true;
}

// p <- p - clamp(p, -t, t), then p <- p / d when d != 1  (soft-threshold, then shrink)
bool soft_threshold_(const TL& ps, double t, double d) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt) || !(t >= 0)) return false;
  const auto offs = offsets(ps);
  const bool divide = d != 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "soft_threshold_", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t hi_t = static_cast<scalar_t>(t);
    const scalar_t lo_t = static_cast<scalar_t>(-t);
    const op_t dv = static_cast<op_t>(d);
    for_all(offs, [&](int64_t k, int64_t lo, int64_t hi) {
      scalar_t* p = ps[k].data_ptr<scalar_t>();
      if (divide) {
        for (int64_t i = lo; i < hi; ++i) {
          const scalar_t x = p[i];
          const scalar_t c = x < lo_t ? lo_t : (x > hi_t ? hi_t : x);
          const scalar_t r = static_cast<scalar_t>(static_cast<op_t>(x) - static_cast<op_t>(c));
          p[i] = static_cast<scalar_t>(static_cast<op_t>(r) / dv);
        }
      } else {
        for (int64_t i = lo; i < hi; ++i) {
          const scalar_t x = p[i];
          const scalar_t c = x < lo_t ? lo_t : (x > hi_t ? hi_t : x);
          p[i] = static_cast<scalar_t>(static_cast<op_t>(x) - static_cast<op_t>(c));
        }
      }
    });
  });
  bump(ps);
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_add_", &sign_add_);
  m.def("sign_axpy_add_", &sign_axpy_add_);
  m.def("scale_sign_add_", &scale_sign_add_);
  m.def("soft_threshold_", &soft_threshold_);
}
"""

FUNCTIONS = ("sign_add_", "sign_axpy_add_", "scale_sign_add_", "soft_threshold_")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("TORCH_REGULARIZERS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_regularizers"
    )
    return Path(root)


def _cpu_id() -> str:
    info = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.startswith("flags"):
                    break
    except OSError:
        info += platform.processor()
    return info


def module_name() -> str:
    key = "\0".join([SOURCE, " ".join(CFLAGS), torch.__version__, sys.version, _cpu_id()])
    return "trk_native_" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _built_path(name: str) -> Path | None:
    d = cache_dir() / name
    for suffix in [*importlib.machinery.EXTENSION_SUFFIXES, ".so"]:
        p = d / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, str(path))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(build: bool = False, verbose: bool = False) -> ModuleType | None:
    """The compiled module: already loaded, else loaded from the cache, else (with
    ``build=True``) compiled now. ``None`` when unavailable (a failed build is
    remembered for the process; ``build=True`` raises its error)."""
    global _module, _failed
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        name = module_name()
        path = _built_path(name)
        if path is not None:
            try:
                _module = _import(path, name)
                return _module
            except Exception as e:  # a stale or foreign library: rebuild when asked
                _failed = f"{type(e).__name__}: {e}"
        if not build:
            return None
        from torch.utils.cpp_extension import load_inline

        d = cache_dir() / name
        d.mkdir(parents=True, exist_ok=True)
        try:
            _module = load_inline(
                name,
                cpp_sources=SOURCE,
                functions=None,
                extra_cflags=CFLAGS,
                build_directory=str(d),
                verbose=verbose,
            )
        except Exception as e:
            _failed = f"{type(e).__name__}: {e}"
            raise RuntimeError(
                "torch_regularizers: building the native kernels failed (a C++ compiler and "
                f"ninja are needed): {_failed}"
            ) from e
        _failed = None
        return _module


def is_built() -> bool:
    """Whether the compiled module is loaded or can be loaded from the cache without building."""
    return _module is not None or _built_path(module_name()) is not None
