"""The ``"native"`` backend: fused C++ kernels for float32/float64 contiguous CPU tensors.

Built on request with ``torch.utils.cpp_extension`` (``build_native()``, ~30 s once; a C++
compiler and ninja are needed), cached on disk under ``$TORCH_REGULARIZERS_CACHE`` (default
``~/.cache/torch_regularizers``), keyed by a hash of the source, the compiler flags, the
torch version and the CPU, so later processes load it in milliseconds.

One pass over the data per penalty: ``g ← g + a·sign(θ)`` reads θ and g and writes g,
exactly like the floor ``torch._foreach_add_(grads, params, alpha=0)``, where the stock
ATen sequence needs a ``sign`` pass and an ``add`` pass. Each call builds a flat **work
list** — every tensor's data pointers and its element range in the concatenation of the
list — and runs *one* OpenMP parallel region (``at::parallel_for``, torch's thread pool and
``torch.get_num_threads()``), one task per thread: thread t takes the t-th slice of every
big tensor (the split ATen's own kernels use, and so the parallel copy or init that first
touched the pages: each thread streams memory it touched) and the t-th slice of the
concatenation of the small ones. So 2000 tiny tensors cost one region, not one per tensor
per op, and big tensors use every thread.

The library is compiled with ``-fopenmp``: without it ``at::parallel_for`` (a header
template) silently runs serially (an earlier build did, which is why the kernels did not
scale with threads; docs/design.md §8). It links against the ``libgomp.so.1`` torch has
already loaded, so it shares torch's thread pool.

Every kernel reproduces, element by element, the rounding of the ATen op sequence it
replaces (the per-tensor reference in :mod:`torch_regularizers.kernels.aten`):

* ``sign(x)`` is ``(0 < x) − (x < 0)`` (0 for ±0 and NaN);
* ``add_(other, alpha=a)`` is ``fma(other, a, self)``;
* ``mul_(c)``/``div_(d)`` by a scalar of the tensor's dtype, ``clamp(x, −t, t)`` with ``t``
  rounded to the tensor's dtype (NaN propagates).

The tests compare every kernel with that ATen sequence bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

#ifndef _OPENMP
#error "build with -fopenmp: without it at::parallel_for runs serially"
#endif

namespace {

using TL = std::vector<at::Tensor>;
// elements per task at least: below 2 * kGrain elements a call stays on one thread
constexpr int64_t kGrain = 32768;

bool usable(const TL& ts, at::ScalarType dt) {
  if (dt != at::kFloat && dt != at::kDouble) return false;
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

// The flat work list of a call: tensor k covers [offs[k], offs[k+1]) of the concatenated
// range; p[k] / g[k] are its data pointers (g may alias p).
template <typename T>
struct Work {
  std::vector<int64_t> offs;
  std::vector<T*> p, g;
  Work(const TL& ps, const TL* gs) : offs(ps.size() + 1, 0), p(ps.size()), g(ps.size()) {
    for (size_t k = 0; k < ps.size(); ++k) {
      offs[k + 1] = offs[k] + ps[k].numel();
      p[k] = ps[k].data_ptr<T>();
      g[k] = gs ? (*gs)[k].data_ptr<T>() : p[k];
    }
  }
  // f(p, g, n): n elements of one tensor. One parallel region for the whole list, one task
  // per thread t of nt: the t-th of nt equal slices of every tensor of at least nt·kGrain
  // elements — the split ATen's own kernels use, and the parallel copy or init that
  // usually first touched that memory, so each thread streams the pages it touched (a
  // split by whole tensors ran 1.3-1.5x slower than the floor on 2-core VMs at times,
  // docs/design.md §8) — and the t-th slice of the concatenation of the smaller tensors
  // (many tiny tensors per task, whatever their number).
  template <typename F>
  void run(const F& f) const {
    const int64_t total = offs.back();
    if (total == 0) return;
    const int64_t nt = std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), (total + kGrain - 1) / kGrain));
    const int64_t n_t = static_cast<int64_t>(p.size());
    std::vector<int64_t> big, small_idx, small_offs{0};
    for (int64_t k = 0; k < n_t; ++k) {
      const int64_t n = offs[k + 1] - offs[k];
      if (nt > 1 && n >= nt * kGrain) {
        big.push_back(k);
      } else {
        small_idx.push_back(k);
        small_offs.push_back(small_offs.back() + n);
      }
    }
    const int64_t small_total = small_offs.back();
    const auto task = [&](int64_t t) {
      for (const int64_t k : big) {
        const int64_t n = offs[k + 1] - offs[k];
        const int64_t b = n * t / nt, e = n * (t + 1) / nt;
        if (e > b) f(p[k] + b, g[k] + b, e - b);
      }
      int64_t b = small_total * t / nt;
      const int64_t e = small_total * (t + 1) / nt;
      if (e <= b) return;
      size_t j = std::upper_bound(small_offs.begin(), small_offs.end(), b) - small_offs.begin() - 1;
      while (b < e) {
        const int64_t k = small_idx[j];
        const int64_t stop = std::min(e, small_offs[j + 1]);
        if (stop > b) f(p[k] + (b - small_offs[j]), g[k] + (b - small_offs[j]), stop - b);
        b = std::max(b, stop);
        ++j;
      }
    };
    if (nt == 1) {
      task(0);
      return;
    }
    at::parallel_for(0, nt, 1, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) task(t);
    });
  }
};

void bump(const TL& ts) {
  for (const auto& t : ts) torch::autograd::impl::bump_version(t);
}

template <typename T>
inline T sgn(T x) { return static_cast<T>((T(0) < x) - (x < T(0))); }

#define DISPATCH(dt, name, ...) AT_DISPATCH_FLOATING_TYPES(dt, name, __VA_ARGS__)

}  // namespace

// g <- g + a*sign(p)  (= g.add_(sign(p), alpha=a)); with gs = ps: p <- p + a*sign(p)
bool sign_add_(const TL& ps, const TL& gs, double a) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt) || !usable(gs, dt) || !same_numel(ps, gs)) return false;
  DISPATCH(dt, "sign_add_", [&] {
    const scalar_t al = static_cast<scalar_t>(a);
    Work<scalar_t>(ps, &gs).run([&](const scalar_t* p, scalar_t* g, int64_t n) {
      for (int64_t i = 0; i < n; ++i) g[i] = std::fma(sgn<scalar_t>(p[i]), al, g[i]);
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
  DISPATCH(dt, "sign_axpy_add_", [&] {
    const scalar_t al = static_cast<scalar_t>(a), be = static_cast<scalar_t>(b);
    Work<scalar_t>(ps, &gs).run([&](const scalar_t* p, scalar_t* g, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t x = p[i];
        g[i] = std::fma(x, be, std::fma(sgn<scalar_t>(x), al, g[i]));
      }
    });
  });
  bump(gs);
  return true;
}

// g <- g + c*p   (= g.add_(p, alpha=c), torch._foreach_add_(grads, params, alpha=c))
bool axpy_add_(const TL& ps, const TL& gs, double c) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt) || !usable(gs, dt) || !same_numel(ps, gs)) return false;
  DISPATCH(dt, "axpy_add_", [&] {
    const scalar_t cc = static_cast<scalar_t>(c);
    Work<scalar_t>(ps, &gs).run([&](const scalar_t* p, scalar_t* g, int64_t n) {
      for (int64_t i = 0; i < n; ++i) g[i] = std::fma(p[i], cc, g[i]);
    });
  });
  bump(gs);
  return true;
}

// p <- p * c  (= p.mul_(c) with c rounded to p's dtype); p <- p / c when divide
bool scale_(const TL& ps, double c, bool divide) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt)) return false;
  DISPATCH(dt, "scale_", [&] {
    const scalar_t cc = static_cast<scalar_t>(c);
    Work<scalar_t>(ps, nullptr).run([&](scalar_t* p, scalar_t*, int64_t n) {
      if (divide) {
        for (int64_t i = 0; i < n; ++i) p[i] = p[i] / cc;
      } else {
        for (int64_t i = 0; i < n; ++i) p[i] = p[i] * cc;
      }
    });
  });
  bump(ps);
  return true;
}

// p <- p*c + a*sign(p_old)   (= s = sign(p); p.mul_(c); p.add_(s, alpha=a))
bool scale_sign_add_(const TL& ps, double c, double a) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt)) return false;
  DISPATCH(dt, "scale_sign_add_", [&] {
    const scalar_t cm = static_cast<scalar_t>(c);
    const scalar_t al = static_cast<scalar_t>(a);
    Work<scalar_t>(ps, nullptr).run([&](scalar_t* p, scalar_t*, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        const scalar_t x = p[i];
        p[i] = std::fma(sgn<scalar_t>(x), al, x * cm);
      }
    });
  });
  bump(ps);
  return true;
}

// p <- p - clamp(p, -t, t), then p <- p / d when d != 1  (soft-threshold, then shrink)
// (the loops are separate functions taking their bounds by value: inlined into the lambdas
// with the bounds captured by reference, GCC 12 did not vectorize them)
template <typename T>
void soft_loop(T* p, int64_t n, T lo, T hi) {
  for (int64_t i = 0; i < n; ++i) {
    const T x = p[i];
    const T c = x < lo ? lo : (x > hi ? hi : x);
    p[i] = x - c;
  }
}

template <typename T>
void soft_div_loop(T* p, int64_t n, T lo, T hi, T d) {
  for (int64_t i = 0; i < n; ++i) {
    const T x = p[i];
    const T c = x < lo ? lo : (x > hi ? hi : x);
    p[i] = (x - c) / d;
  }
}

bool soft_threshold_(const TL& ps, double t, double d) {
  if (ps.empty()) return true;
  const auto dt = ps[0].scalar_type();
  if (!usable(ps, dt) || !(t >= 0)) return false;
  const bool divide = d != 1.0;
  DISPATCH(dt, "soft_threshold_", [&] {
    const scalar_t hi = static_cast<scalar_t>(t), lo = static_cast<scalar_t>(-t);
    const scalar_t dv = static_cast<scalar_t>(d);
    const Work<scalar_t> w(ps, nullptr);
    if (divide) {
      w.run([=](scalar_t* p, scalar_t*, int64_t n) { soft_div_loop<scalar_t>(p, n, lo, hi, dv); });
    } else {
      w.run([=](scalar_t* p, scalar_t*, int64_t n) { soft_loop<scalar_t>(p, n, lo, hi); });
    }
  });
  bump(ps);
  return true;
}

// Per-step bookkeeping of the Regularizer (Bucket.live/trainable, the retry record of a
// step) in one C loop over a Python list, for plain tensors and nn.Parameter only
// (THPVariable_CheckExact): a subclass's attribute reads may go through
// __torch_function__, so any other item answers None ("ask Python").

// [t.grad for t in ts] if every one is trainable and has a gradient; False if one is
// not; None if an item is not an exact Tensor/Parameter.
py::object live_grads(py::list ts) {
  py::list out(PyList_GET_SIZE(ts.ptr()));
  for (Py_ssize_t k = 0; k < PyList_GET_SIZE(ts.ptr()) && k < PyList_GET_SIZE(out.ptr()); ++k) {
    PyObject* obj = PyList_GET_ITEM(ts.ptr(), k);
    if (!THPVariable_CheckExact(obj)) return py::none();
    const at::Tensor& t = THPVariable_Unpack(obj);
    const at::Tensor& g = t.grad();
    if (!g.defined() || !t.requires_grad()) return py::bool_(false);
    PyObject* w = THPVariable_Wrap(g);
    if (w == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), k, w);
  }
  if (PyList_GET_SIZE(ts.ptr()) != PyList_GET_SIZE(out.ptr())) return py::none();  // resized meanwhile
  return std::move(out);
}

// Whether every item requires grad; None if an item is not an exact Tensor/Parameter.
py::object all_trainable(py::list ts) {
  bool all = true;
  for (Py_ssize_t k = 0; k < PyList_GET_SIZE(ts.ptr()); ++k) {
    PyObject* obj = PyList_GET_ITEM(ts.ptr(), k);
    if (!THPVariable_CheckExact(obj)) return py::none();
    all = all && THPVariable_Unpack(obj).requires_grad();
  }
  return py::bool_(all);
}

// The version counters as native int64 bytes; None if an item is not an exact Tensor/Parameter.
py::object versions(py::list ts) {
  const Py_ssize_t n = PyList_GET_SIZE(ts.ptr());
  std::string buf(static_cast<size_t>(n) * sizeof(int64_t), '\0');
  int64_t* v = reinterpret_cast<int64_t*>(&buf[0]);
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* obj = PyList_GET_ITEM(ts.ptr(), k);
    if (!THPVariable_CheckExact(obj)) return py::none();
    v[k] = THPVariable_Unpack(obj)._version();
  }
  return py::bytes(buf);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("live_grads", &live_grads);
  m.def("all_trainable", &all_trainable);
  m.def("versions", &versions);
  m.def("sign_add_", &sign_add_);
  m.def("sign_axpy_add_", &sign_axpy_add_);
  m.def("axpy_add_", &axpy_add_);
  m.def("scale_", &scale_);
  m.def("scale_sign_add_", &scale_sign_add_);
  m.def("soft_threshold_", &soft_threshold_);
}
"""

FUNCTIONS = ("sign_add_", "sign_axpy_add_", "axpy_add_", "scale_", "scale_sign_add_", "soft_threshold_")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

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


@functools.cache
def module_name() -> str:
    key = "\0".join(
        [SOURCE, " ".join(CFLAGS), " ".join(LDFLAGS), torch.__version__, sys.version, _cpu_id()]
    )
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
                extra_ldflags=LDFLAGS,
                build_directory=str(d),
                verbose=verbose,
            )
        except Exception as e:
            _failed = f"{type(e).__name__}: {e}"
            raise RuntimeError(
                "torch_regularizers: building the native kernels failed (a C++ compiler with "
                f"OpenMP and ninja are needed): {_failed}"
            ) from e
        _failed = None
        return _module


def is_built() -> bool:
    """Whether the compiled module is loaded or can be loaded from the cache without building."""
    return _module is not None or _built_path(module_name()) is not None


def usable(ps: list[Tensor]) -> bool:
    """Whether the list is for this backend at all (judged on the first tensor; the C++
    side checks every tensor and declines the call otherwise)."""
    p0 = ps[0]
    return p0.device.type == "cpu" and p0.dtype in DTYPES


def apply(mod: Any, op: str, ps: list[Tensor], gs: list[Tensor] | None, c: tuple) -> bool:
    """Run ``op`` (the ops of :mod:`torch_regularizers.kernels`) in one call; False when
    the kernel declines the tensors (non-contiguous, mixed dtypes, ...)."""
    if op == "l1_grad":
        return mod.sign_add_(ps, gs, c[0])
    if op == "en_grad":
        return mod.sign_axpy_add_(ps, gs, c[0], c[1])
    if op == "l2_grad":
        return mod.axpy_add_(ps, gs, c[0])
    if op == "l1_decay":
        return mod.sign_add_(ps, ps, c[0])
    if op == "en_decay":
        return mod.scale_sign_add_(ps, c[0], c[1])
    if op == "l2_decay":
        return mod.scale_(ps, c[0], False)
    if op == "l2_prox":
        return mod.scale_(ps, c[0], True)
    return mod.soft_threshold_(ps, c[0], c[1])
