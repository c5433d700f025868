"""CPU smoke tests of the GPU benchmark harness (benchmarks/device_bench.py, device_check.sh):
the CLI runs in its CPU mode and writes a complete JSON report, reclip_ext's labels agree with
the torch baseline's on the same graph, the torch baseline's pieces are right, and the shell
script parses. Nothing here needs a GPU, cupy or the CUDA kernels."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import device_bench
import recipes
import synthetic

torch = pytest.importorskip("torch")
recipes.import_reclip_ext()  # at collection: an editable install's rebuild hook needs real fds

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "device_check.sh"
SMOKE = ["--device", "cpu", "--n", "2000", "--m", "10", "--d", "64", "--mm-repeat", "3"]


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    """device_bench.py as device_check.sh runs it (python -P, a fresh process), in CPU mode."""
    out = tmp_path_factory.mktemp("device_bench") / "report.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-P", str(HERE / "device_bench.py"), *SMOKE,
                           "--json", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=HERE.parent, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_smoke_report_structure(smoke_report):
    report, stdout = smoke_report
    assert {"config", "environment", "machine", "models", "anchors", "targets", "cases",
            "errors", "skipped", "wall_s"} <= set(report)
    assert report["errors"] == [] and report["skipped"] == []
    assert report["config"]["device"] == "cpu" and report["config"]["precisions"] == ["exact"]
    machine = report["machine"]
    assert set(machine["mm_tflops"]) == {"bf16", "tf32", "fp32"}
    assert all(v > 0 for v in machine["mm_tflops"].values()) and machine["copy_gbps"] > 0
    assert "2*N*N*d" in report["models"]["knn_flops"]
    assert any("zlap not run" in note for note in report.get("notes", []))

    (case,) = report["cases"]
    assert case["status"] == "ok"
    assert (case["n"], case["m"], case["d"], case["N"]) == (2000, 10, 64, 2010)
    assert set(case["runs"]) == {"reclip_ext/exact", "torch/exact"}
    for key, run in case["runs"].items():
        assert set(run["times"]) == {"knn", "normalize", "solve", "total"}, key
        assert all(t > 0 for t in run["times"].values()), key
        assert run["recall"] >= 0.999, key  # exact fp32 against the float64 reference
        assert run["iterations"] >= 1 and run["nnz"] > 0
        derived = run["derived"]
        assert derived["knn_tflops"] > 0 and derived["cg_gbps"] > 0
        assert derived["cg_bytes_per_iteration"] == run["nnz"] * 12 + 10 * 2010 * 10 * 4
    rext = case["runs"]["reclip_ext/exact"]
    assert rext["staged_label_agreement"] == 1.0
    assert report["config"]["spmm"] == ["kernel"] and list(rext["solve_by_spmm"]) == ["kernel"]
    assert rext["solve_by_spmm"]["kernel"]["solve"] == rext["times"]["solve"]
    assert case["runs"]["torch/exact"]["agreement_with_reclip_ext"] >= 0.99
    assert set(case["ratios"]["exact"]["torch_over_reclip_ext"]) == {"knn", "normalize", "solve",
                                                                      "total"}
    assert 0 <= case["data"]["zero_shot_accuracy"] <= 1
    assert case["reference"]["rows"] == 1000
    assert "n=2,000 m=10" in stdout and "recall vs float64" in stdout


def test_budget_zero_skips_everything_but_still_reports(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = device_bench.main([*SMOKE, "--n", "300,600", "--budget-s", "0", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [c["status"] for c in report["cases"]] == ["skipped", "skipped"]
    assert len(report["skipped"]) == 2 and not report["errors"]
    assert "skipped" in capsys.readouterr().out


def test_cases_run_headline_first():
    args = device_bench.parse_args(["--device", "cpu"])
    assert device_bench.cases_of(args) == [(100_000, 1000), (100_000, 100),
                                           (1_280_000, 1000), (1_280_000, 100)]
    assert device_bench.parse_args(["--quick", "--device", "cpu"]).n == [100_000]
    assert device_bench.parse_args(["--n", "1.28M,100k", "--device", "cpu"]).n == [1_280_000,
                                                                                 100_000]
    args = device_bench.parse_args(["--n", "200,300", "--m", "10,20", "--largest-first"])
    assert device_bench.cases_of(args) == [(300, 20), (300, 10), (200, 20), (200, 10)]
    args = device_bench.parse_args(["--n", "300,200", "--m", "10,20"])
    assert device_bench.cases_of(args) == [(200, 20), (200, 10), (300, 20), (300, 10)]
    with pytest.raises(SystemExit):
        device_bench.parse_args(["--device", "cpu", "--precisions", "bf16"])


def test_spmm_choice():
    assert device_bench.parse_args(["--device", "cpu"]).spmm == ["kernel"]
    assert device_bench.parse_args([]).spmm is None  # main() decides from the build
    assert device_bench.parse_args(["--spmm", "cusparse, kernel"]).spmm == ["cusparse", "kernel"]
    for bad in (["--spmm", "kernel,cublas"], ["--spmm", "kernel,kernel"], ["--spmm", ","],
                ["--device", "cpu", "--spmm", "kernel,cusparse"]):
        with pytest.raises(SystemExit):
            device_bench.parse_args(bad)
    rext = recipes.import_reclip_ext()
    assert device_bench.spmm_default(rext, "cpu") == ["kernel"]
    assert device_bench.spmm_default(None, "cuda") == ["kernel"]
    assert device_bench.spmm_default(rext, "cuda") == (
        ["kernel", "cusparse"] if rext.built_with_cusparse() else ["kernel"])


def test_solve_by_spmm_side_by_side(monkeypatch, capsys):
    """Two SpMMs timed on the same system and printed side by side; on the CPU the second is
    a stand-in (the kernel's own product under the name 'cusparse'), so only the harness is
    under test here."""
    case = _case()
    rext = case.rext
    solve = rext.cg_solve
    seen = []

    def stand_in(*args, spmm="kernel", **kw):
        seen.append(spmm)
        return solve(*args, spmm="kernel", **kw)

    monkeypatch.setattr(rext, "cg_solve", stand_in)
    case.a.spmm = ["kernel", "cusparse"]
    run = case.run_reclip_ext("exact")
    assert seen == ["kernel", "cusparse"] and run["spmm"] == "kernel"
    by = run["solve_by_spmm"]
    assert list(by) == ["kernel", "cusparse"]
    assert by["kernel"]["solve"] == run["times"]["solve"] and by["cusparse"]["solve"] > 0
    assert by["cusparse"]["iterations"] == by["kernel"]["iterations"] == run["iterations"]
    assert by["cusparse"]["label_agreement"] == 1.0 and "label_agreement" not in by["kernel"]
    case.record["runs"] = {"reclip_ext/exact": run}
    rates = {"mm_tflops": {"bf16": 1.0, "tf32": 1.0, "fp32": 1.0}, "copy_gbps": 10.0}
    case.derive(rates)
    device_bench.print_case(case.record, rates)
    out = capsys.readouterr().out
    assert "reclip_ext solve by SpMM: kernel " in out and "labels agree 1.0000" in out


def test_budget_prediction():
    assert device_bench.Budget(None).left() == math.inf
    budget = device_bench.Budget(100.0)
    assert budget.refuse("torch/bf16", 1000, 10) is None  # nothing known: allowed
    budget.record("torch/bf16", 1000, 10, wall=2.0, knn=1.0)
    # kNN part x (N ratio)^2, the rest x (N*m ratio)
    assert budget.predict("torch/bf16", 2000, 20) == pytest.approx(1.0 * 4 + 1.0 * 4)
    assert budget.refuse("torch/bf16", 10_000, 10) is not None  # 100 + 10 s > 100 s left
    budget.record("torch/bf16", 1000, 20, wall=3.0, knn=1.0)
    assert budget.predict("torch/bf16", 2000, 20) == pytest.approx(4 + 2 * 2)  # same m
    assert budget.predict("torch/bf16", 2000, 10) == pytest.approx(4 + 1 * 2)  # same m
    assert budget.predict("torch/bf16", 2000, 40) == pytest.approx(4 + 2 * 4)  # latest


def test_torch_baseline_pieces_match_the_references():
    """Chunked torch kNN (chunk boundaries, self exclusion) = the float64 reference on tie-free
    data; torch sparse W = scipy's; batched CG on torch = the same CG on numpy."""
    x = torch.cat(synthetic.clip_like(290, 10, 32, seed=5, device="cpu")[:2])
    n, k = x.shape[0], 7
    rows = torch.arange(n)
    idx, val = recipes.torch_knn(x, k, chunk=64)
    ref = device_bench.exact_topk(torch, x, rows, k, chunk=50)
    assert device_bench.recall(torch, idx, ref) == 1.0
    assert not (idx == rows[:, None]).any()
    assert torch.allclose(val, (x @ x.T).gather(1, idx).clamp_min(0), atol=1e-6)

    w = recipes.torch_normalize(idx, val)
    dense = w.to_dense().double().numpy()
    a = np.zeros((n, n))
    np.put_along_axis(a, idx.numpy(), val.double().numpy(), axis=1)
    b = a + a.T
    dinv = 1 / np.sqrt(b.sum(1))
    assert np.allclose(dense, dinv[:, None] * b * dinv[None, :], atol=1e-6)

    y = recipes.rhs(n, 10, torch.float32, "cpu")
    assert np.array_equal(y.numpy(), recipes.rhs(n, 10))
    z, its, res = recipes.batched_cg(w, y, 0.99, 20, 1e-6)
    z_np, its_np, _ = recipes.batched_cg(dense.astype(np.float32), y.numpy(), 0.99, 20, 1e-6)
    assert its.tolist() == its_np.tolist()
    assert np.allclose(z.numpy(), z_np, rtol=1e-4, atol=1e-5)
    assert (res <= 1).all()


def test_synthetic_data_on_a_torch_device():
    text, images, y = synthetic.clip_like(3000, 20, 48, seed=1, device="cpu", chunk=700)
    x = torch.cat([text, images])
    assert x.shape == (3020, 48) and y.shape == (3000,)
    assert torch.allclose(x.norm(dim=1), torch.ones(3020), atol=1e-5)
    assert torch.bincount(y).tolist() == [150] * 20  # balanced classes, as in synthetic.py
    acc = float((synthetic.zero_shot(text, images) == y).float().mean())
    acc_np = np.mean(synthetic.zero_shot(text.numpy(), images.numpy()) == y.numpy())
    assert acc == pytest.approx(acc_np, abs=2 / 3000)  # the numpy path; a near-tie may flip
    assert 0.2 < acc < 0.99  # imperfect zero-shot, far above chance (0.05)
    again = synthetic.clip_like(3000, 20, 48, seed=1, device="cpu", chunk=3000)
    assert torch.equal(images, again.images)  # seeded; the chunks do not change the stream


def test_chunk_rows():
    assert device_bench.chunk_rows(1_281_000, 2, 0, 4.0) == 1536
    assert device_bench.chunk_rows(1_281_000, 4, 0, 4.0) == 768
    assert device_bench.chunk_rows(100, 4, 0, 4.0) == 100
    assert device_bench.chunk_rows(100, 4, 30, 4.0) == 30


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    proc = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


# --------------------------------------------------------------------------------------------
# The GPU-only paths, exercised on the CPU with stand-ins


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In this process torch's OpenMP pool may spin (OMP_WAIT_POLICY is only read when the
    runtime loads) and starve reclip_ext's threads on a small machine: keep torch on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _case(n=300, m=10, d=16, extra=()):
    args = device_bench.parse_args(["--device", "cpu", "--n", str(n), "--m", str(m), "--d", str(d),
                                    "--recall-sample", "100", "--baselines", "torch,zlap",
                                    *extra])
    clock = device_bench.Clock(torch, "cpu")
    case = device_bench.Case(torch, recipes.import_reclip_ext(), args, clock,
                             device_bench.Budget(None), n, m, {})
    case.prepare()
    return case


@pytest.fixture
def fake_cupy(monkeypatch):
    """numpy / scipy standing in for cupy / cupyx.scipy (the same API), so that the ZLaP recipe's
    code runs on the CPU."""
    import types

    sp = pytest.importorskip("scipy.sparse")
    spla = pytest.importorskip("scipy.sparse.linalg")
    cupy = types.ModuleType("cupy")
    for name in ("zeros", "argmax", "float32", "from_dlpack"):
        setattr(cupy, name, getattr(np, name))
    device = types.SimpleNamespace(synchronize=lambda: None)
    cupy.cuda = types.SimpleNamespace(Device=lambda: device)
    cupyx = types.ModuleType("cupyx")
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy, cupyx_scipy.sparse = cupyx_scipy, sp
    for name, mod in {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy,
                      "cupyx.scipy.sparse": sp, "cupyx.scipy.sparse.linalg": spla}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return cupy


@pytest.mark.parametrize("classes", [10, 4])
def test_zlap_recipe_on_the_torch_graph(fake_cupy, classes, capsys):
    case = _case(extra=["--zlap-classes", str(classes)])
    rext_run = case.run_reclip_ext("exact")
    torch_run = case.run_torch("exact")
    zlap = case.run_zlap("exact")
    case.record["runs"] = {"reclip_ext/exact": rext_run, "torch/exact": torch_run,
                           "zlap/exact": zlap}
    rates = {"mm_tflops": {"bf16": 1.0, "tf32": 1.0, "fp32": 1.0}, "copy_gbps": 10.0}
    case.derive(rates)
    assert zlap["classes_timed"] == classes and zlap["iterations"] == 20
    t = zlap["times"]
    assert t["knn"] == torch_run["times"]["knn"] and t["normalize"] == torch_run["times"][
        "normalize"]
    assert t["total"] == pytest.approx(t["knn"] + t["normalize"] + t["solve"])
    ratios = case.record["ratios"]["exact"]
    assert set(ratios) == {"torch_over_reclip_ext", "zlap_over_reclip_ext"}
    if classes == 10:  # every class solved: per-class CG = batched CG, same labels
        assert not zlap["extrapolated"]
        assert zlap["agreement_with_reclip_ext"] >= 0.99
        assert zlap["accuracy"] == pytest.approx(torch_run["accuracy"], abs=0.01)
    else:
        assert zlap["extrapolated"] and "4 of 10 classes" in zlap["extrapolation"]
        assert t["solve"] == pytest.approx(zlap["build_s"] + zlap["cg_timed_s"] * 10 / 4)
        assert "agreement_with_reclip_ext" not in zlap
    device_bench.print_case(case.record, rates)
    out = capsys.readouterr().out
    assert "(torch)" in out and ("*" in out) == (classes == 4)


class _StubRext:
    """The real reclip_ext, but like a build that refuses a (text, images) pair and takes
    `precision=`; records what it was given."""

    def __init__(self):
        self.real = recipes.import_reclip_ext()
        self.calls = []

    def knn_affinity(self, x, k, **kw):
        self.calls.append(("knn_affinity", type(x).__name__, kw.pop("precision", None)))
        if isinstance(x, tuple):
            raise TypeError("x: expected one array")
        return self.real.knn_affinity(x, k, **kw)

    def label_propagate(self, text, images, **kw):
        self.calls.append(("label_propagate", None, kw.pop("precision", None)))
        return self.real.label_propagate(text, images, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_reclip_ext_gets_precision_and_a_stacked_x_when_a_pair_is_refused():
    case = _case()
    stub = _StubRext()
    case.rext = stub
    out = case.run_reclip_ext("bf16")
    assert out["knn_input"] == "X = [text; images]" and out["recall"] >= 0.999
    assert stub.calls == [("knn_affinity", "tuple", "bf16"), ("knn_affinity", "Tensor", "bf16"),
                          ("label_propagate", None, "bf16")]
    stub.calls.clear()
    case.run_reclip_ext("exact")  # the default precision is not passed at all
    assert [c[2] for c in stub.calls] == [None, None, None]


def test_torch_baseline_in_bf16_on_the_cpu():
    case = _case()
    out = case.run_torch("bf16")
    assert out["mm"].startswith("operands .to(bfloat16)")
    assert out["recall"] >= 0.9  # bf16 similarities: ties and rounding cost a little recall
    assert out["iterations"] == 20


def test_warm_up_runs_every_method(fake_cupy):
    args = device_bench.parse_args(["--device", "cpu", "--d", "16", "--baselines", "torch,zlap"])
    failed = device_bench.warm_up(torch, recipes.import_reclip_ext(), args,
                                  device_bench.Clock(torch, "cpu"))
    assert failed == {}


def test_main_with_every_recipe(fake_cupy, tmp_path, capsys):
    """The whole main loop with the ZLaP recipe in it (numpy/scipy standing in for cupy)."""
    out = tmp_path / "r.json"
    rc = device_bench.main([*SMOKE, "--n", "400", "--m", "6", "--d", "16", "--baselines",
                            "torch,zlap", "--zlap-classes", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["errors"]
    (case,) = report["cases"]
    assert set(case["runs"]) == {"reclip_ext/exact", "torch/exact", "zlap/exact"}
    assert case["runs"]["zlap/exact"]["extrapolated"]
    assert set(case["ratios"]["exact"]) == {"torch_over_reclip_ext", "zlap_over_reclip_ext"}
    assert "* zlap exact: per-class CG of 4 of 6 classes" in capsys.readouterr().out


def test_baselines_only_up_to_baselines_max_n(tmp_path):
    """The headline case runs reclip_ext alone: past --baselines-max-n the torch baseline is
    left out with a note, below it both run."""
    out = tmp_path / "report.json"
    code = device_bench.main(["--device", "cpu", "--n", "200,300", "--m", "10", "--d", "16",
                              "--baselines-max-n", "200", "--recall-sample", "50",
                              "--mm-size", "32", "--mm-repeat", "1", "--copy-mib", "1",
                              "--json", str(out)])
    assert code == 0
    small, big = json.loads(out.read_text())["cases"]
    assert (small["n"], big["n"]) == (200, 300)
    assert set(small["runs"]) == {"reclip_ext/exact", "torch/exact"}
    assert set(big["runs"]) == {"reclip_ext/exact"}
    assert big["status"] == "ok" and "times" in big["runs"]["reclip_ext/exact"]
    assert "baselines run only for n <= 200" in big["notes"]
