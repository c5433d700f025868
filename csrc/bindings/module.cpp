// The only file that knows pybind11. Each binding takes DLPack capsules (inputs and
// caller-allocated outputs) from reclip_ext/ops.py, checks dtype/device agreement, releases
// the GIL and calls the dispatcher. C++ exceptions become TypeError / ValueError /
// MemoryError / RuntimeError; nothing aborts the interpreter.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <memory>
#include <utility>
#include <string>
#include <vector>

#include "bindings/dlpack.h"
#include "core/graph_math.h"
#include "core/mma_layout.h"
#include "core/topk.h"
#include "cpu/workspace.h"
#include "dispatch/ops.h"

namespace py = pybind11;
using namespace rext;

namespace {

void require_float(const DlArray& a) {
  const DType t = a.dtype();
  REXT_CHECK_TYPE(t == DType::F32 || t == DType::F64, a.name(),
                  ": dtype must be float32 or float64, got ", dtype_name(t));
}

void require_dtype(const DlArray& a, DType want) {
  REXT_CHECK_TYPE(a.dtype() == want, a.name(), ": dtype must be ", dtype_name(want), ", got ",
                  dtype_name(a.dtype()));
}

void require_same_device(const DlArray& a, const DlArray& ref) {
  REXT_CHECK(a.device() == ref.device(), a.name(), " is on a different device than ", ref.name());
}

// Calls f(T{}) with T = float or double according to `dtype`.
template <class F>
auto with_float(DType dtype, F&& f) {
  if (dtype == DType::F64) return f(double{});
  return f(float{});
}

Weight parse_weight(const std::string& w) {
  if (w == "relu") return Weight::Relu;
  if (w == "shift") return Weight::Shift;
  throw std::invalid_argument("weight must be 'relu' or 'shift', got '" + w + "'");
}

Precision parse_precision(const std::string& p) {
  if (p == "exact") return Precision::Exact;
  if (p == "tf32") return Precision::Tf32;
  if (p == "bf16") return Precision::Bf16;
  throw std::invalid_argument("precision must be 'exact', 'tf32' or 'bf16', got '" + p + "'");
}

Spmm parse_spmm(const std::string& s) {
  if (s == "kernel") return Spmm::Kernel;
  if (s == "cusparse") return Spmm::Cusparse;
  throw std::invalid_argument("spmm must be 'kernel' or 'cusparse', got '" + s + "'");
}

bool parse_float_dtype(const std::string& dtype) {
  if (dtype == "float32") return false;
  if (dtype == "float64") return true;
  throw TypeError("dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

// The caller-allocated workspace of a CUDA op (None on the CPU, where it is ignored). The
// capsule's DlArray lives in `holder` until the kernel returns.
Workspace workspace_of(py::object ws, const Device& dev, std::unique_ptr<DlArray>& holder) {
  Workspace w;
  if (ws.is_none()) return w;
  holder = std::make_unique<DlArray>(ws.ptr(), "workspace");
  REXT_CHECK(holder->device() == dev, "workspace is on a different device than the inputs");
  w.ptr = holder->bytes(w.bytes);
  return w;
}

void knn_affinity_binding(std::vector<py::object> sources, py::object out_indices,
                          py::object out_weights, int64_t k, bool exclude_self, bool normalize,
                          const std::string& weight, double gamma, int64_t block_rows,
                          int threads, uintptr_t stream, const std::string& precision,
                          py::object workspace, int64_t query_start, int64_t query_stop,
                          py::object queries) {
  REXT_CHECK(sources.size() == 1 || sources.size() == 2, "x: expected 1 or 2 row blocks");
  std::vector<std::unique_ptr<DlArray>> xs;
  const char* names[] = {"x", "images"};
  for (size_t s = 0; s < sources.size(); ++s)
    xs.push_back(std::make_unique<DlArray>(sources[s].ptr(), sources.size() == 1 ? "x" : (s ? names[1] : "text")));
  DlArray idx(out_indices.ptr(), "indices"), w(out_weights.ptr(), "weights");
  for (auto& x : xs) {
    require_float(*x);
    require_dtype(*x, xs[0]->dtype());
    require_same_device(*x, *xs[0]);
  }
  std::unique_ptr<DlArray> q;
  if (!queries.is_none()) {
    q = std::make_unique<DlArray>(queries.ptr(), "queries");
    require_float(*q);
    require_dtype(*q, xs[0]->dtype());
    require_same_device(*q, *xs[0]);
  }
  require_dtype(idx, DType::I64);
  require_dtype(w, xs[0]->dtype());
  require_same_device(idx, *xs[0]);
  require_same_device(w, *xs[0]);

  AffinityParams p;
  p.k = k;
  p.exclude_self = exclude_self;
  p.normalize = normalize;
  p.weight = parse_weight(weight);
  p.gamma = gamma;
  p.block_rows = block_rows;
  p.threads = threads;
  p.stream = reinterpret_cast<void*>(stream);
  p.precision = parse_precision(precision);
  p.query_start = query_start;
  p.query_stop = query_stop;
  const Device dev = xs[0]->device();
  REXT_CHECK(p.precision == Precision::Exact ||
                 (dev.kind == DeviceKind::CUDA && xs[0]->dtype() == DType::F32),
             "precision: '", precision, "' needs float32 input on a CUDA device; use 'exact'");
  std::unique_ptr<DlArray> ws_holder;
  p.workspace = workspace_of(workspace, dev, ws_holder);
  with_float(xs[0]->dtype(), [&](auto tag) {
    using T = decltype(tag);
    StackedRows<T> rows;
    rows.top = xs[0]->matrix<const T>(false);
    if (xs.size() == 2) {
      rows.bottom = xs[1]->matrix<const T>(false);
      REXT_CHECK(rows.bottom.cols == rows.top.cols, "images: has ", rows.bottom.cols,
                 " columns but text has ", rows.top.cols);
    } else {
      rows.bottom = MatrixView<const T>{rows.top.ptr, 0, rows.top.cols, rows.top.cols};
    }
    StackedRows<T> qrows;
    if (q) {
      qrows.top = q->matrix<const T>(false);
      qrows.bottom = MatrixView<const T>{qrows.top.ptr, 0, qrows.top.cols, qrows.top.cols};
    }
    auto iv = idx.matrix<int64_t>(true);
    auto wv = w.matrix<T>(true);
    py::gil_scoped_release nogil;
    knn_affinity<T>(dev, rows, q ? &qrows : nullptr, iv, wv, p);
  });
}

int64_t sym_normalize_binding(py::object indices, py::object weights, py::object out_indptr,
                              py::object out_indices, py::object out_data, int threads,
                              uintptr_t stream, py::object workspace) {
  DlArray idx(indices.ptr(), "indices"), w(weights.ptr(), "weights");
  DlArray o_ptr(out_indptr.ptr(), "indptr"), o_idx(out_indices.ptr(), "out indices"),
      o_data(out_data.ptr(), "data");
  require_dtype(idx, DType::I64);
  require_float(w);
  require_dtype(o_ptr, DType::I64);
  require_dtype(o_idx, DType::I64);
  require_dtype(o_data, w.dtype());
  for (const DlArray* a : {&w, &o_ptr, &o_idx, &o_data}) require_same_device(*a, idx);
  NormalizeParams p;
  p.threads = threads;
  p.stream = reinterpret_cast<void*>(stream);
  const Device dev = idx.device();
  std::unique_ptr<DlArray> ws_holder;
  p.workspace = workspace_of(workspace, dev, ws_holder);
  return with_float(w.dtype(), [&](auto tag) {
    using T = decltype(tag);
    auto iv = idx.matrix<const int64_t>(false);
    auto wv = w.matrix<const T>(false);
    const int64_t cap = 2 * iv.rows * iv.cols;
    int64_t* ptr = o_ptr.vector<int64_t>(iv.rows + 1, true);
    int64_t* cols = o_idx.vector<int64_t>(cap, true);
    T* data = o_data.vector<T>(cap, true);
    py::gil_scoped_release nogil;
    return sym_normalize<T>(dev, iv, wv, ptr, cols, data, p);
  });
}

void cg_solve_binding(py::object indptr, py::object indices, py::object data, py::object rhs,
                      py::object out_x, py::object out_iterations, py::object out_residuals,
                      double alpha, int64_t max_iter, double tol, int threads, uintptr_t stream,
                      py::object workspace, const std::string& spmm) {
  DlArray a_ptr(indptr.ptr(), "W.indptr"), a_idx(indices.ptr(), "W.indices"),
      a_data(data.ptr(), "W.data"), b(rhs.ptr(), "rhs"), x(out_x.ptr(), "x"),
      its(out_iterations.ptr(), "iterations"), res(out_residuals.ptr(), "residuals");
  require_dtype(a_ptr, DType::I64);
  require_dtype(a_idx, DType::I64);
  require_float(b);
  require_dtype(a_data, b.dtype());
  require_dtype(x, b.dtype());
  require_dtype(its, DType::I64);
  require_dtype(res, DType::F64);
  for (const DlArray* a : {&a_ptr, &a_idx, &a_data, &x, &its, &res}) require_same_device(*a, b);
  CgParams p;
  p.alpha = alpha;
  p.max_iter = max_iter;
  p.tol = tol;
  p.threads = threads;
  p.stream = reinterpret_cast<void*>(stream);
  p.spmm = parse_spmm(spmm);
  const Device dev = b.device();
  std::unique_ptr<DlArray> ws_holder;
  p.workspace = workspace_of(workspace, dev, ws_holder);
  with_float(b.dtype(), [&](auto tag) {
    using T = decltype(tag);
    auto bv = b.matrix<const T>(false);
    CsrView<T> w;
    w.rows = bv.rows;
    REXT_CHECK(a_idx.ndim() == 1, "W.indices: expected a 1-D array");
    w.nnz = a_idx.dim(0);
    w.indptr = a_ptr.vector<const int64_t>(w.rows + 1, false);
    w.indices = a_idx.vector<const int64_t>(w.nnz, false);
    w.data = a_data.vector<const T>(w.nnz, false);
    auto xv = x.matrix<T>(true);
    int64_t* it = its.vector<int64_t>(bv.cols, true);
    double* rs = res.vector<double>(bv.cols, true);
    py::gil_scoped_release nogil;
    cg_solve<T>(dev, w, bv, xv, it, rs, p);
  });
}

// Self-tests of the shared __host__ __device__ logic (core/topk.h, core/graph_math.h) with the
// int32 list indices the CUDA kernel uses: candidates are streamed through topk_insert in the
// given order, then the list is re-sorted with topk_sort after `perturb` is added to each value
// (as the exact re-score does).
std::pair<std::vector<float>, std::vector<int64_t>> selftest_topk(const std::vector<float>& vals,
                                                                  const std::vector<int64_t>& idx,
                                                                  int64_t k,
                                                                  const std::vector<float>& perturb) {
  REXT_CHECK(vals.size() == idx.size(), "vals and idx must have the same length");
  REXT_CHECK(k >= 1, "k must be >= 1");
  REXT_CHECK(perturb.empty() || int64_t(perturb.size()) == k, "perturb must be empty or of length k");
  std::vector<float> lv(k, -std::numeric_limits<float>::infinity());
  std::vector<int32_t> li(k, -1);
  for (size_t e = 0; e < vals.size(); ++e) topk_insert(lv.data(), li.data(), k, vals[e], idx[e]);
  if (!perturb.empty()) {
    for (int64_t e = 0; e < k; ++e) lv[e] += perturb[e];
    topk_sort(lv.data(), li.data(), k);
  }
  return {lv, std::vector<int64_t>(li.begin(), li.end())};
}

py::dict selftest_cg(double bb, double rs_new, double pq, int64_t it, double tol, double pp,
                     double floor) {
  bool active, broken = false;
  double bnorm, residual, rs = bb;
  int64_t iterations;
  cg_start(bb, tol, active, bnorm, iterations, residual);
  py::dict out;
  out["start_active"] = active;
  out["bnorm"] = bnorm;
  const double step = cg_step(active, broken, rs, pq, pp);
  out["step"] = step;
  out["step_active"] = active;
  out["step_broken"] = broken;
  const double beta =
      cg_advance(active, broken, it, rs_new, rs, bnorm, tol, floor, iterations, residual);
  out["broken"] = broken;
  out["beta"] = beta;
  out["active"] = active;
  out["iterations"] = iterations;
  out["residual"] = residual;
  out["rs"] = rs;
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "reclip_ext._core: fused top-k affinity, symmetric normalisation and batched CG "
            "kernels (CPU, and CUDA when built with it). Call them through reclip_ext.";
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const rext::TypeError& err) {
      PyErr_SetString(PyExc_TypeError, err.what());
    } catch (const rext::cpu::WorkspaceError& err) {
      PyErr_SetString(PyExc_MemoryError, err.what());
    }
  });

  m.def("knn_affinity", &knn_affinity_binding, py::arg("sources"), py::arg("out_indices"),
        py::arg("out_weights"), py::arg("k"), py::arg("exclude_self"), py::arg("normalize"),
        py::arg("weight"), py::arg("gamma"), py::arg("block_rows"), py::arg("threads"),
        py::arg("stream"), py::arg("precision") = "exact", py::arg("workspace") = py::none(),
        py::arg("query_start") = 0, py::arg("query_stop") = -1, py::arg("queries") = py::none(),
        "Top-k affinity of the stacked rows of `sources` (1 or 2 DLPack capsules) into the "
        "caller-allocated (Q, k) outputs, for the query rows [query_start, query_stop) of the "
        "sources (query_stop = -1: all), or for the rows of `queries` (a DLPack capsule, not "
        "rows of the sources: exclude_self must be False); indices are rows of the sources. "
        "precision: 'exact' | 'tf32' | 'bf16' (the last two: float32 on CUDA). workspace: a "
        "uint8 device buffer of knn_affinity_workspace_bytes (CUDA only).");
  m.def("sym_normalize", &sym_normalize_binding, py::arg("indices"), py::arg("weights"),
        py::arg("out_indptr"), py::arg("out_indices"), py::arg("out_data"), py::arg("threads"),
        py::arg("stream"), py::arg("workspace") = py::none(),
        "D^-1/2 (A + A^T) D^-1/2 into caller-allocated CSR buffers of capacity 2 N k; returns nnz. "
        "workspace: a uint8 device buffer of sym_normalize_workspace_bytes (CUDA only).");
  m.def("cg_solve", &cg_solve_binding, py::arg("indptr"), py::arg("indices"), py::arg("data"),
        py::arg("rhs"), py::arg("out_x"), py::arg("out_iterations"), py::arg("out_residuals"),
        py::arg("alpha"), py::arg("max_iter"), py::arg("tol"), py::arg("threads"),
        py::arg("stream"), py::arg("workspace") = py::none(), py::arg("spmm") = "kernel",
        "Batched CG for (I - alpha W) X = rhs into caller-allocated outputs. workspace: a uint8 "
        "device buffer of cg_solve_workspace_bytes (CUDA only). spmm: 'kernel' | 'cusparse' "
        "(CUDA only; load_cusparse first).");
  m.def(
      "knn_affinity_workspace_bytes",
      [](int64_t n, int64_t d, int64_t k, const std::string& dtype, const std::string& precision,
         int64_t queries, bool separate) {
        REXT_CHECK(n >= 1 && d >= 1 && k >= 1, "n, d and k must be >= 1");
        REXT_CHECK(queries >= -1, "queries must be >= 0, or -1 for all n rows");
        return knn_affinity_workspace_bytes(n, d, k, parse_float_dtype(dtype),
                                            parse_precision(precision), queries, separate);
      },
      py::arg("n"), py::arg("d"), py::arg("k"), py::arg("dtype"), py::arg("precision") = "exact",
      py::arg("queries") = -1, py::arg("separate") = false,
      "Bytes of CUDA workspace knn_affinity needs for N rows of d columns and k neighbours, "
      "for `queries` query rows (-1: all N), `separate` when they are not rows of x.");
  m.def(
      "sym_normalize_workspace_bytes",
      [](int64_t n, int64_t k, const std::string& dtype, int device) {
        const bool dbl = parse_float_dtype(dtype);
        py::gil_scoped_release nogil;
        return sym_normalize_workspace_bytes(Device{DeviceKind::CUDA, device}, n, k, dbl);
      },
      py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("device"),
      "Bytes of CUDA workspace sym_normalize needs for (N, k) inputs on CUDA device `device` "
      "(CUB sizes its temporary storage per device, so this needs a device).");
  m.def(
      "cg_solve_workspace_bytes",
      [](int64_t n, int64_t m, const std::string& dtype) {
        REXT_CHECK(n >= 1 && m >= 1, "n and m must be >= 1");
        return cg_solve_workspace_bytes(n, m, parse_float_dtype(dtype));
      },
      py::arg("n"), py::arg("m"), py::arg("dtype"),
      "Bytes of CUDA workspace cg_solve needs for N rows and m right-hand sides.");
  m.def("_selftest_topk", &selftest_topk, py::arg("vals"), py::arg("idx"), py::arg("k"),
        py::arg("perturb") = std::vector<float>{},
        "Streams candidates through the shared top-k insert (int32 lists), optionally re-sorts.");
  m.def(
      "_selftest_weight",
      [](double s, const std::string& weight, double gamma) {
        return affinity_weight(s, parse_weight(weight), gamma);
      },
      py::arg("s"), py::arg("weight"), py::arg("gamma"), "The shared affinity weight f(s).");
  m.def("_selftest_sqrt_product", &sqrt_product, py::arg("a"), py::arg("b"),
        "The shared overflow-safe sqrt(a b).");
  m.def("_selftest_cg", &selftest_cg, py::arg("bb"), py::arg("rs_new"), py::arg("pq"),
        py::arg("it"), py::arg("tol"), py::arg("pp") = 1.0, py::arg("floor") = 0.0,
        "One column through the shared CG rules: start from ||b||^2 = bb, step (p.p = pp),\n"
        "advance (residual floor `floor`).");
  m.def("_selftest_cg_scale", &cg_column_scale, py::arg("bmax"),
        "The shared power-of-two scale of a CG column with largest entry bmax.");
  m.def("_selftest_cg_floor", &cg_residual_floor, py::arg("n"), py::arg("tiny"),
        "The shared ||r||^2 below which a CG column stops as converged.");
  m.def(
      "_selftest_mma_layout",
      [] {
        py::list lanes;
        for (int lane = 0; lane < 32; ++lane) {
          const MmaLaneAddress a = mma_a_address(lane), b = mma_b_address(lane);
          py::list acc;
          for (int e = 0; e < 4; ++e)
            acc.append(py::make_tuple(mma_acc_row(lane, e), mma_acc_col(lane, e)));
          lanes.append(py::make_tuple(py::make_tuple(a.row, a.col_bytes),
                                      py::make_tuple(b.row, b.col_bytes), acc));
        }
        return lanes;
      },
      "Per lane of the tensor-core tile loop: its A and B ldmatrix addresses (row, byte\n"
      "offset) and the (row, column) of its four accumulator entries (core/mma_layout.h).");
  m.def("built_with_cuda", &rext::built_with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("built_with_cusparse", &rext::built_with_cusparse,
        "True when cg_solve's spmm='cusparse' path was compiled in (cuSPARSE itself is opened "
        "at run time).");
  m.def(
      "load_cusparse",
      [](const std::vector<std::string>& candidates) {
        py::gil_scoped_release nogil;
        return rext::load_cusparse(candidates);
      },
      py::arg("candidates") = std::vector<std::string>{},
      "Opens libcusparse.so.12 for spmm='cusparse' (once per process) and returns what was "
      "opened: $REXT_CUSPARSE_LIBRARY if set, else the soname, then `candidates` (paths). "
      "RuntimeError listing the tries when none opens, or in a build without the path.");
  m.def("cuda_device_count", &rext::cuda_device_count,
        "Visible CUDA devices (0 without CUDA support, a driver or a device).");
  m.def("simd_level", &rext::simd_level, "CPU tile kernels in use: 'avx2' or 'generic'.");
#ifdef REXT_VERSION
  m.attr("__version__") = REXT_VERSION;
#endif
}
