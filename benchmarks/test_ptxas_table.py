"""benchmarks/ptxas_table.py --sass: its loop finder on a hand-written listing, and the real
kernels of this repository compiled for sm_90 (skipped without nvcc and nvdisasm; one compile,
shared by the assertions)."""
from __future__ import annotations

import shutil

import pytest

import ptxas_table

# nvdisasm -c style: an outer loop (cp.async + an inner FMA loop) whose divergent shuffle takes
# an out-of-line path after EXIT and branches back into it; then an unreachable self-branch.
# Neither backward branch after EXIT is a loop of its own.
LISTING = """\
.text.f:
        /*0000*/                   MOV R0, RZ ;
.L_x_1:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0020*/                   MOV R3, RZ ;
.L_x_2:
        /*0030*/                   LDS R4, [R5] ;
        /*0040*/                   FFMA R6, R4, R4, R6 ;
        /*0050*/              @!PT LDS RZ, [RZ] ;
        /*0060*/                   ISETP.GE.AND P0, PT, R3, 0x20, PT ;
        /*0070*/              @!P0 BRA `(.L_x_2) ;
        /*0080*/                   BRA.DIV UR4, `(.L_x_3) ;
        /*0090*/                   SHFL.IDX PT, R9, R9, RZ, 0x1f ;
.L_x_4:
        /*00a0*/                   IADD3 R0, R0, 0x1, RZ ;
        /*00b0*/                   ISETP.GE.AND P1, PT, R0, R7, PT ;
        /*00c0*/              @!P1 BRA `(.L_x_1) ;
        /*00d0*/                   EXIT ;
.L_x_3:
        /*00e0*/                   WARPSYNC.COLLECTIVE R8, `(.L_x_5) ;
        /*00f0*/                   SHFL.IDX R9, R9, RZ, 0x1f ;
        /*0100*/                   BRA `(.L_x_4) ;
.L_x_6:
        /*0110*/                   BRA `(.L_x_6) ;
"""


def test_loops_of_a_listing():
    code = ptxas_table.parse_sass(LISTING)["f"]
    assert len(code) == 17  # the never-executed `@!PT LDS` is dropped
    assert sorted(len(body) for body in ptxas_table.loops(code)) == [4, 14]
    hot = ptxas_table.hot_loops(code)
    assert hot["inner"] == dict(ptxas_table.counts(code, set()), instr=4, LDS=1, FFMA=1)
    # The outer loop holds the out-of-line shuffle path (3 instructions) but not EXIT.
    assert hot["K step"] == dict(ptxas_table.counts(code, set()), instr=14, LDGSTS=1, LDS=1,
                                 FFMA=1, nest=1)


@pytest.fixture(scope="module")
def kernels():
    nvdisasm = ptxas_table.find_nvdisasm()
    if shutil.which("nvcc") is None or nvdisasm is None:
        pytest.skip("needs nvcc and nvdisasm")
    return {r["kernel"]: r for r in ptxas_table.sass_report(ptxas_table.REPO, "sm_90", nvdisasm)}


def test_knn_tile_loops(kernels):
    tiles = {name: r["loops"] for name, r in kernels.items() if name.startswith("topk_tiles<")}
    # FMA (fp32 and fp64), bf16 and tf32 tensor cores
    assert all(any(f"(Mma){m}" in name for name in tiles) for m in range(3)), list(tiles)
    for name, loops in tiles.items():
        inner, step = loops["inner"], loops["K step"]
        # operands arrive by cp.async and are read from shared memory only, never through
        # generic addresses (which the wmma API compiled to)
        assert step["LDGSTS"] > 0 and step["LD"] == 0, name
        # The K loop holds the inner loop: at least as many of every kind.
        assert all(step[k] >= inner[k] for k in ("instr",) + ptxas_table.KINDS), name
        if "(Mma)0" in name:  # CUDA cores: FMAs in the inner loop, no tensor-core op
            fma = "DFMA" if name.startswith("topk_tiles<double") else "FFMA"
            assert inner[fma] > 0 and inner["HMMA"] == 0, name
        else:
            assert inner["HMMA"] > 0 and inner["FFMA"] == inner["DFMA"] == 0, name
            assert inner["LDSM"] > 0, name  # fragments through ldmatrix


def test_spmm_loops(kernels):
    spmm = {name: r for name, r in kernels.items() if name.startswith("spmm<")}
    assert any("float" in n for n in spmm) and any("double" in n for n in spmm), list(spmm)
    for name, r in spmm.items():
        inner = r["loops"]["inner"]
        assert inner["LDG"] > 0 and inner["HMMA"] == 0, name
        assert inner["DFMA" if "double" in name else "FFMA"] > 0, name
        assert "K step" not in r["loops"] and r["regs"] > 0


def test_missing_tools_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("NVDISASM", raising=False)
    assert ptxas_table.main(["--sass"]) == 2
    assert "nvdisasm" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--sass", "--root", "/nonexistent"], "--root"),  # no csrc/ to compile there
    (["/nonexistent/build.log"], "log"),
    ([], "log"),
])
def test_bad_arguments_exit_2_naming_them(argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        ptxas_table.main(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_build_log_without_a_ptxas_report_is_status_1(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("-- reclip_ext: CUDA OFF\n")
    assert ptxas_table.main([str(log)]) == 1
