"""The GPU check: its driver end to end on the CPU (tiny sizes), its stage limits, its selection of
the GPU tests, and the shell script's arguments."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from deformable_detr.benchmark import gpu

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
STAGE_KEYS = {"status", "seconds", "returncode", "timeout_s", "result", "error"}


def _load(out):
    with open(os.path.join(out, "gpu_check.json")) as f:
        return json.load(f)


def test_tiny_cpu_run_writes_the_report(tmp_path):
    out = str(tmp_path / "check")
    rc = gpu.main(["--device", "cpu", "--tiny", "--in-process", "--out", out])
    report = _load(out)
    assert rc == 0 and report["ok"] is True
    assert report["schema"] == gpu.SCHEMA and report["device"] == "cpu" and report["finished"]
    stages = report["stages"]
    assert list(stages) == list(gpu.STAGES)
    for name, record in stages.items():
        assert STAGE_KEYS <= set(record), name
    assert stages["build"]["status"] == stages["tests"]["status"] == "skipped"
    assert {stages[s]["status"] for s in ("env", "op", "model")} == {"ok"}

    env = stages["env"]["result"]
    assert env["kernel_smoke"] == "ok" and "cpu" in env["compiled_kernels"]

    op = stages["op"]["result"]["cases"]
    combos = {(c["shape"], c["mode"], c["dtype"]) for c in op}
    assert combos == {
        ("decoder", mode, dtype) for mode in ("fwd", "fwd+bwd") for dtype in ("float32", "bfloat16")
    }
    for case in op:
        for impl in ("compiled", "reference"):
            assert 0 < case[impl]["best_s"] <= case[impl]["median_s"]
        expected = case["reference"]["median_s"] / case["compiled"]["median_s"]
        assert case["speedup_median"] == pytest.approx(expected)
        tol = 1e-4 if case["dtype"] == "float32" else 5e-2
        assert case["max_abs_diff_fwd"] < tol, case

    model = stages["model"]["result"]
    assert {(c["variant"], c["batch"], c["precision"]) for c in model["cases"]} == {
        ("r50_single_scale", 1, p) for p in ("float32", "bfloat16")
    }
    for case in model["cases"]:
        assert case["images_per_s"] == pytest.approx(case["batch"] / case["median_s"])
    assert model["official_v100_images_per_s"]["r50"] == {"1": 15.0, "4": 19.4}

    with open(os.path.join(out, "gpu_check.log")) as f:
        log = f.read()
    assert "op: ok" in log and "model: ok" in log


def test_timeout_and_failure_are_recorded_and_fail_the_run(tmp_path, monkeypatch):
    commands = {
        "op": [sys.executable, "-c", "import time; time.sleep(60)"],
        "model": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
    }
    monkeypatch.setattr(gpu.Check, "stage_command", lambda self, stage: (commands[stage], None))
    out = str(tmp_path / "check")
    argv = ["--device", "cpu", "--stages", "op,model", "--out", out, "--timeout", "op=1"]
    assert gpu.main(argv) == 1
    report = _load(out)
    assert report["ok"] is False
    op, model = report["stages"]["op"], report["stages"]["model"]
    assert op["status"] == "timeout" and op["timeout_s"] == 1 and op["seconds"] < 30
    assert model["status"] == "failed" and model["returncode"] == 3
    assert "exit status 3" in model["error"]
    with open(os.path.join(out, "gpu_check.log")) as f:
        assert "boom" in f.read()


def test_spent_budget_fails_the_remaining_stages(tmp_path, monkeypatch):
    monkeypatch.setattr(
        gpu.Check, "stage_command", lambda self, stage: ([sys.executable, "-c", "pass"], None)
    )
    out = str(tmp_path / "check")
    assert gpu.main(["--device", "cpu", "--stages", "op", "--out", out, "--budget", "2"]) == 1
    assert _load(out)["stages"]["op"]["error"] == "the overall time budget is spent"


def test_failed_env_stops_the_run(tmp_path, monkeypatch):
    def broken(args, emit):
        emit({"partial": True})
        raise RuntimeError("deformable_detr._C has no cpu kernel")

    monkeypatch.setitem(gpu.CHILD_STAGES, "env", broken)
    out = str(tmp_path / "check")
    argv = ["--device", "cpu", "--tiny", "--in-process", "--stages", "env,op", "--out", out]
    assert gpu.main(argv) == 1
    report = _load(out)
    assert report["stages"]["env"]["result"] == {"partial": True}
    assert "no cpu kernel" in report["stages"]["env"]["error"]
    assert "op" not in report["stages"] and report["not_run"] == ["op"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stages", "op,bogus"], "unknown ['bogus']"),
        (["--timeout", "op"], "STAGE=SECONDS"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--batches", "0"], "--batches must be >= 1"),
    ],
)
def test_bad_arguments_name_the_culprit(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--device", "cpu"] + argv)
    assert message in capsys.readouterr().err


class _Item:
    def __init__(self, *marks):
        self.marks = [m.mark for m in marks]

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)


def test_gpu_test_selection_follows_the_skip_condition():
    no_cuda = not torch.cuda.is_available()
    needs = pytest.mark.skipif(no_cuda, reason="needs a CUDA device")
    has = pytest.mark.skipif(not no_cuda, reason="this machine has a CUDA device")
    assert gpu.is_gpu_test(_Item(needs))
    assert gpu.is_gpu_test(_Item(pytest.mark.filterwarnings("ignore"), needs))
    assert not gpu.is_gpu_test(_Item(has))
    assert not gpu.is_gpu_test(_Item(pytest.mark.skipif(no_cuda, reason="needs scipy")))
    assert not gpu.is_gpu_test(_Item())


def test_gpu_test_files_include_the_op_tests():
    files = [os.path.relpath(f, REPO) for f in gpu.gpu_test_files(os.path.join(REPO, "tests"))]
    assert os.path.join("tests", "layers", "test_ms_deform_attn_op.py") in files
    assert os.path.join("tests", "benchmark", "test_gpu_check.py") in files
    assert os.path.join("tests", "data", "test_dataset_mapper.py") not in files


def test_junit_summary(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest" errors="0" failures="1" skipped="1" tests="3">
        <testcase classname="tests.a" name="test_ok" time="0.1"/>
        <testcase classname="tests.a" name="test_bad" time="0.1"><failure message="x"/></testcase>
        <testcase classname="tests.b" name="test_skip" time="0"><skipped message="y"/></testcase>
        </testsuite></testsuites>"""))
    summary = gpu.junit_summary(str(xml))
    assert (summary["tests"], summary["failures"], summary["skipped"]) == (3, 1, 1)
    assert [c["outcome"] for c in summary["cases"]] == ["passed", "failed", "skipped"]
    assert summary["cases"][1]["id"] == "tests.a::test_bad"


def _script(*args, **kwargs):
    return subprocess.run(
        ["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_script_parses_and_documents_itself():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    help_ = _script("--help")
    assert help_.returncode == 0
    for option in ("--out", "--arch", "--wheels", "--python", "--prepare-wheels"):
        assert option in help_.stdout
    bad = _script("--bogus")
    assert bad.returncode == 2 and "'--bogus'" in bad.stderr


def test_script_names_the_missing_modules(tmp_path):
    # An interpreter that has nothing installed: the script stops before building anything.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    fake.chmod(0o755)
    result = _script("--python", str(fake), "--out", str(tmp_path / "out"), "--arch", "9.0")
    assert result.returncode == 2
    assert "cannot import: detectron2" in result.stderr
    assert "torch: pass an interpreter that has it" in result.stderr
    assert "--prepare-wheels" in result.stderr
    assert not os.path.exists(tmp_path / "out" / "gpu_check.json")
