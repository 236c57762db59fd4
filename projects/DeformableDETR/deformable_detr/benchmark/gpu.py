"""GPU check: build the CUDA kernel, run the GPU tests, benchmark the op and the whole model.

Run ``python -m deformable_detr.benchmark.gpu --out DIR`` (``scripts/gpu_check.sh`` prepares the
environment and calls it). The stages run in this order, each in a subprocess with its own time
limit and all of them inside one overall budget:

- ``build``: ``setup.py build_ext --inplace`` with the CUDA kernel forced on (the caller sets
  ``TORCH_CUDA_ARCH_LIST`` to the GPU present);
- ``env``: the GPU, the versions, which compiled kernels are registered, and one small op call
  forward and backward, so that a build without code for this GPU fails here, with its reason;
- ``tests``: every test behind ``skipif(not torch.cuda.is_available())`` (this module is also the
  pytest plugin that selects them);
- ``op``: the deformable-attention op, compiled kernel against the PyTorch reference path, in
  float32, float16 and bfloat16 values (float32 locations and weights, as autocast passes them),
  forward and forward+backward, on the encoder and decoder shapes of
  :mod:`deformable_detr.benchmark.attention`;
- ``model``: whole-model inference throughput (images/s) of the r50 and single-scale models with
  random weights on 800x1216 images at batch 1 and 4, in float32 and under float16 and bfloat16
  autocast. A timed call is ``model(inputs)`` on images already on the device, pre- and
  post-processing included, synchronised before and after.

Times are the best and the median of ``--repeat`` runs after one warm-up, the compared variants
alternating within every run. One JSON (``gpu_check.json``) holds every stage's status, seconds and
results; it is rewritten after each stage, and the op and model stages save their results after
each case, so that a stage stopped at its limit still leaves what it measured. Every stage's output
goes to ``gpu_check.log``. The exit status is 1 when a stage fails or runs out of time.

``--device cpu --tiny`` runs the env, op and model stages with small sizes on the CPU (the build
and the GPU tests are skipped there): a check of the driver itself.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import torch

SCHEMA = "deformable_detr.gpu_check/1"
MODULE = "deformable_detr.benchmark.gpu"
STAGES = ("build", "env", "tests", "op", "model")
# Seconds per stage and overall, sized for an H100-class GPU and a many-core host: the whole check
# stays under 8 minutes even when every stage runs to its limit.
TIMEOUTS = {"build": 170, "env": 45, "tests": 120, "op": 60, "model": 90}
TOTAL_BUDGET = 440
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Frames per second of the official implementation on a V100 (its README's table), batch 1 / 4.
OFFICIAL_V100_FPS = {"r50": {1: 15.0, 4: 19.4}, "r50_single_scale": {1: 27.0, 4: 42.4}}
MODEL_VARIANTS = ("r50", "r50_single_scale")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path, data):
    # Written beside and renamed, so that a reader never sees half a file.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _summary(times):
    return {"best_s": min(times), "median_s": statistics.median(times), "runs_s": times}


# ---------------------------------------------------------------- stages run in a child process


def env_stage(args, emit):
    """Machine, versions and registered kernels; one small op call forward and backward."""
    from deformable_detr.benchmark.attention import cpu_description
    from deformable_detr.layers import ms_deform_attn_func as func

    result = {
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_cuda_arch_list_env": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "compiled_kernels": sorted(func._COMPILED_DEVICE_TYPES),
        "compiled_import_error": func._COMPILED_IMPORT_ERROR and str(func._COMPILED_IMPORT_ERROR),
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        result.update(
            gpu=props.name,
            capability="%d.%d" % (props.major, props.minor),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            torch_arch_list=torch.cuda.get_arch_list(),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            result["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            result["driver"] = None
    emit(result)
    if args.device not in func._COMPILED_DEVICE_TYPES:
        raise RuntimeError(
            f"deformable_detr._C has no {args.device} kernel (registered: "
            f"{result['compiled_kernels']}, import error: {result['compiled_import_error']}); "
            "the benchmarks would time the reference path against itself"
        )
    # The compiled kernel on a small input, synchronised: a build without code for this GPU, or a
    # kernel that faults, stops the check here with the kernel's own message.
    from deformable_detr.benchmark.attention import _run

    inputs = _small_op_inputs(args.device)
    _run(func.multi_scale_deformable_attention, inputs, backward=True)
    _sync(args.device)
    result["kernel_smoke"] = "ok"
    emit(result)


def _small_op_inputs(device):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    value = torch.randn(2, 60, 2, 8, generator=g)
    locations = torch.rand(2, 5, 2, 2, 3, 2, generator=g)
    weights = torch.rand(2, 5, 2, 2, 3, generator=g)
    return tuple(t.to(device) for t in (value, shapes, starts, locations, weights))


def op_stage(args, emit):
    """Compiled op against the PyTorch reference, per shape, dtype and mode."""
    from deformable_detr.benchmark import attention

    device = args.device
    shapes = ("decoder",) if args.tiny else attention.SHAPES
    cases = []
    result = {"repeat": args.repeat, "levels": attention.LEVELS, "cases": cases}
    for shape in shapes:
        base = attention.make_inputs(shape, device)
        for dtype_name in args.dtypes:
            inputs = attention._with_value_dtype(base, DTYPES[dtype_name])
            with torch.no_grad():
                compiled, reference = (attention.IMPLS[i](*inputs).float() for i in attention.IMPLS)
            diff = (compiled - reference).abs().max().item()
            del compiled, reference
            for backward in (False, True):
                times = {impl: [] for impl in attention.IMPLS}
                for impl, fn in attention.IMPLS.items():
                    attention._run(fn, inputs, backward)  # warm-up
                for _ in range(args.repeat):
                    for impl, fn in attention.IMPLS.items():
                        times[impl].append(
                            _timed(lambda: attention._run(fn, inputs, backward), device)
                        )
                case = {
                    "shape": shape,
                    "mode": "fwd+bwd" if backward else "fwd",
                    "dtype": dtype_name,
                    "max_abs_diff_fwd": diff,
                }
                for impl, fn in attention.IMPLS.items():
                    case[impl] = _summary(times[impl])
                    case[impl]["peak_extra_bytes"] = _peak_bytes(
                        lambda: attention._run(fn, inputs, backward), device, above_current=True
                    )
                for stat in ("best", "median"):
                    case[f"speedup_{stat}"] = (
                        case["reference"][f"{stat}_s"] / case["compiled"][f"{stat}_s"]
                    )
                cases.append(case)
                emit(result)
        del base


def _peak_bytes(fn, device, above_current=False):
    """Peak CUDA memory allocated during ``fn()``, or its excess over what was allocated before.

    Only the CUDA allocator keeps a peak that can be reset in-process (None elsewhere; the op's CPU
    figures come from :mod:`deformable_detr.benchmark.attention`, measured in fresh processes).
    """
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if above_current else 0
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def model_stage(args, emit):
    """Images/s of the whole model per variant, batch and precision."""
    from deformable_detr.benchmark.model import build_ours

    device = args.device
    height, width = (96, 128) if args.tiny else (800, 1216)
    variants = ("r50_single_scale",) if args.tiny else MODEL_VARIANTS
    cases = []
    result = {
        "height": height,
        "width": width,
        "repeat": args.repeat,
        "official_v100_images_per_s": OFFICIAL_V100_FPS,
        "cases": cases,
    }
    g = torch.Generator().manual_seed(0)
    for variant in variants:
        model = build_ours(variant, ["MODEL.DEVICE", device])
        for batch in args.batches:
            images = [
                torch.randint(0, 256, (3, height, width), generator=g).float().to(device)
                for _ in range(batch)
            ]
            inputs = [{"image": im, "height": height, "width": width} for im in images]
            calls = {p: _model_call(model, inputs, device, p) for p in args.precisions}
            for call in calls.values():
                call()  # warm-up: kernel selection, allocator growth
            times = {p: [] for p in calls}
            for _ in range(args.repeat):
                for p, call in calls.items():
                    times[p].append(_timed(call, device))
            for p, call in calls.items():
                case = {"variant": variant, "batch": batch, "precision": p}
                case.update(_summary(times[p]))
                case["images_per_s"] = batch / case["median_s"]
                case["peak_bytes"] = _peak_bytes(call, device)
                cases.append(case)
            emit(result)
        del model


def _model_call(model, inputs, device, precision):
    def call():
        with torch.inference_mode():
            if precision == "float32":
                return model(inputs)
            with torch.autocast(device, dtype=DTYPES[precision]):
                return model(inputs)

    return call


CHILD_STAGES = {"env": env_stage, "op": op_stage, "model": model_stage}


def run_child(args):
    """Run one of :data:`CHILD_STAGES`, saving its result to ``args.result`` as it grows."""
    state = {"result": None}

    def emit(result):
        state["result"] = result
        _write_json(args.result, {"result": result, "error": None})

    try:
        CHILD_STAGES[args.child](args, emit)
    except Exception as e:
        _write_json(args.result, {"result": state["result"], "error": f"{type(e).__name__}: {e}"})
        raise


# ------------------------------------------------------------ the GPU tests (a pytest plugin)


def is_gpu_test(item):
    """Whether a collected test is one that runs only where CUDA is available.

    Such a test carries ``skipif(not torch.cuda.is_available(), reason=...)``: a condition that is
    true exactly when CUDA is missing, under a reason that names CUDA. Tests skipped *because* a
    GPU is present have the opposite condition and are left out.
    """
    no_cuda = not torch.cuda.is_available()
    for mark in item.iter_markers("skipif"):
        condition = mark.args[0] if mark.args else mark.kwargs.get("condition")
        reason = str(mark.kwargs.get("reason", ""))
        if isinstance(condition, str) or len(mark.args) > 1:
            continue
        if "cuda" in reason.lower() and bool(condition) == no_cuda:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Keep only the GPU tests (active when this module is loaded with ``-p``)."""
    keep = [item for item in items if is_gpu_test(item)]
    dropped = [item for item in items if not is_gpu_test(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def gpu_test_files(tests_dir):
    """Test files that mention ``torch.cuda.is_available``: where the GPU tests can be."""
    found = []
    for folder, _, files in os.walk(tests_dir):
        for name in sorted(files):
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    if "torch.cuda.is_available" in f.read():
                        found.append(path)
    return sorted(found)


def junit_summary(path):
    """Counts and per-test outcomes from a pytest JUnit XML report."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = "failed" if tag == "failure" else tag
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    return {
        "tests": int(suite.get("tests", 0)),
        "failures": int(suite.get("failures", 0)),
        "errors": int(suite.get("errors", 0)),
        "skipped": int(suite.get("skipped", 0)),
        "cases": cases,
    }


# ------------------------------------------------------------------------------- the driver


class Check:
    """Runs the stages one after the other and keeps the JSON report up to date."""

    def __init__(self, args):
        self.args = args
        self.json_path = os.path.join(args.out, "gpu_check.json")
        self.log_path = os.path.join(args.out, "gpu_check.log")
        self.deadline = time.monotonic() + args.budget
        self.report = {
            "schema": SCHEMA,
            "started": _now(),
            "finished": None,
            "device": args.device,
            "tiny": args.tiny,
            "budget_s": args.budget,
            "ok": None,
            "stages": {},
        }

    def log(self, line):
        print(f"[gpu_check] {line}", flush=True)
        with open(self.log_path, "a") as f:
            f.write(f"[gpu_check] {line}\n")

    def save(self):
        _write_json(self.json_path, self.report)

    def run(self, stages):
        for stage in STAGES:
            if stage not in stages:
                continue
            record = self.run_stage(stage)
            self.report["stages"][stage] = record
            self.log(f"{stage}: {record['status']} in {record['seconds']:.1f} s")
            if record["error"] or record.get("reason"):
                self.log(f"{stage}: {record['error'] or record['reason']}")
            self.save()
            if stage in ("build", "env") and record["status"] not in ("ok", "skipped"):
                break  # nothing after them means anything without a working kernel
        failed = [
            s for s, r in self.report["stages"].items() if r["status"] not in ("ok", "skipped")
        ]
        not_run = [s for s in stages if s not in self.report["stages"]]
        self.report["ok"] = not failed and not not_run
        self.report["finished"] = _now()
        if not_run:
            self.report["not_run"] = not_run
        self.save()
        self.log(f"{'ok' if self.report['ok'] else 'FAILED'}: {self.json_path}")
        return 0 if self.report["ok"] else 1

    def run_stage(self, stage):
        record = {"status": None, "seconds": 0.0, "returncode": None, "timeout_s": None}
        record.update(result=None, error=None)
        if self.args.device != "cuda" and stage in ("build", "tests"):
            record.update(status="skipped", reason="needs a CUDA device")
            return record
        remaining = self.deadline - time.monotonic()
        if remaining < 5:
            record.update(status="failed", error="the overall time budget is spent")
            return record
        timeout = max(1, int(min(self.args.timeouts[stage], remaining)))
        record["timeout_s"] = timeout
        self.log(f"{stage}: starting (limit {timeout} s)")
        start = time.monotonic()
        if self.args.in_process and stage in CHILD_STAGES:
            self.run_in_process(stage, record)
        else:
            self.run_subprocess(stage, timeout, record)
        record["seconds"] = round(time.monotonic() - start, 2)
        return record

    def run_in_process(self, stage, record):
        def emit(result):
            record["result"] = result

        try:
            CHILD_STAGES[stage](self.args, emit)
            record["status"] = "ok"
        except Exception as e:
            with open(self.log_path, "a") as f:
                f.write(traceback.format_exc())
            record.update(status="failed", error=f"{type(e).__name__}: {e}")

    def stage_command(self, stage):
        """The command line of a stage, and the file its result is read from."""
        a = self.args
        if stage == "build":
            return [sys.executable, "setup.py", "build_ext", "--inplace"], None
        if stage == "tests":
            xml = os.path.join(a.out, "gpu_tests.xml")
            files = gpu_test_files(os.path.join(a.root, "tests"))
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", MODULE]
            return cmd + ["-rfEs", f"--junitxml={xml}"] + files, xml
        result = os.path.join(a.out, f"{stage}.json")
        cmd = [sys.executable, "-m", MODULE, "--child", stage, "--result", result]
        cmd += ["--device", a.device, "--repeat", str(a.repeat)]
        cmd += ["--dtypes", *a.dtypes, "--batches", *map(str, a.batches)]
        cmd += ["--precisions", *a.precisions] + (["--tiny"] if a.tiny else [])
        return cmd, result

    def run_subprocess(self, stage, timeout, record):
        cmd, result_path = self.stage_command(stage)
        if result_path and os.path.exists(result_path):
            os.remove(result_path)
        env = dict(os.environ)
        if stage == "build":
            env["FORCE_CUDA"] = "1"
            env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
            # This process has the old library loaded: the build must write a new file rather
            # than overwrite the one mapped here. A failed build then leaves no stale kernel.
            package = os.path.join(self.args.root, "projects", "DeformableDETR", "deformable_detr")
            for old in glob.glob(os.path.join(package, "_C*.so")):
                os.remove(old)
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=self.args.root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                )
                record["returncode"] = proc.returncode
                record["status"] = "ok" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                record.update(status="timeout", error=f"stopped after {timeout} s")
        if result_path and os.path.exists(result_path):
            if stage == "tests":
                record["result"] = junit_summary(result_path)
            else:
                with open(result_path) as f:
                    saved = json.load(f)
                record["result"] = saved["result"]
                record["error"] = record["error"] or saved["error"]
        if record["status"] == "failed" and not record["error"]:
            if stage == "tests" and record["returncode"] == 5:
                record["error"] = "pytest selected no GPU tests"
            else:
                record["error"] = f"exit status {record['returncode']}; see {self.log_path}"


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="output/gpu_check", help="folder of the JSON and log")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    parser.add_argument("--tiny", action="store_true", help="small sizes (a check of the driver)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs (default 10, tiny 1)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", choices=tuple(DTYPES), default=None)
    parser.add_argument("--budget", type=int, default=TOTAL_BUDGET, help="seconds for all stages")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help=f"a stage's limit (defaults: {TIMEOUTS})",
    )
    parser.add_argument("--root", default=ROOT, help="the repository (setup.py, tests/)")
    parser.add_argument(
        "--in-process", action="store_true", help="run env/op/model in this process (no limits)"
    )
    parser.add_argument("--child", choices=tuple(CHILD_STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    args.out = os.path.abspath(args.out)
    args.root = os.path.abspath(args.root)
    small_cpu = args.tiny or args.device == "cpu"
    if args.repeat is None:
        args.repeat = 1 if args.tiny else 10
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    # float16 is left out on the CPU, where the compiled kernel and autocast favour bfloat16.
    default_dtypes = ["float32", "bfloat16"] if small_cpu else list(DTYPES)
    args.dtypes = args.dtypes or default_dtypes
    args.precisions = args.precisions or default_dtypes
    args.batches = args.batches or ([1] if args.tiny else [1, 4])
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown} (choose from {', '.join(STAGES)})")
    args.stages = stages
    args.timeouts = dict(TIMEOUTS)
    for item in args.timeout:
        stage, _, seconds = item.partition("=")
        if stage not in TIMEOUTS or not seconds.isdigit():
            parser.error(f"--timeout {item!r}: expected STAGE=SECONDS with STAGE in {STAGES}")
        args.timeouts[stage] = int(seconds)
    if args.device == "cuda" and not torch.cuda.is_available() and args.child is None:
        if any(s != "build" for s in stages):
            parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.child and not args.result:
        parser.error("--child needs --result")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    os.makedirs(args.out, exist_ok=True)
    return Check(args).run(args.stages)


if __name__ == "__main__":
    sys.exit(main())
