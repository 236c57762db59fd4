"""Benchmark of the multi-scale deformable attention op: compiled kernel against the PyTorch path.

Run ``python -m deformable_detr.benchmark.attention [--threads 2] [--repeat 5] [--device cpu]
[--clock wall|cpu]``.
The implementations run side by side in one process on the two shapes of the project's
benchmark (an 800x1216 image at strides 8/16/32/64, 8 heads x 32 channels, 4 points): the encoder
(every token is a query) and the decoder (300 queries). Sampling locations are uniform in
[-0.05, 1.05], so some fall outside the image; attention weights are softmax-normalised. Three
variants are timed: the compiled kernel and the PyTorch reference on float32 inputs, and the
compiled kernel on bfloat16 values (float32 locations and weights, as autocast passes them).

The header names the CPU (model and the avx512f / avx512_bf16 / amx_bf16 / amx_tile flags from
/proc/cpuinfo), the thread count, the torch version and the load average. Times are the best and
the median of ``--repeat`` runs after one warm-up, the variants alternating inside every repeat
so that a change of machine load affects them alike; forward+backward computes the gradients of
value, locations and weights. ``--clock cpu`` times the CPU time of the process (all threads)
instead of the wall clock: on a machine shared with other jobs it counts only the work done, not
the time a thread waits to be scheduled, so ``--threads 1 --clock cpu`` compares builds best.

Peak extra memory is measured for each case in a fresh subprocess: on the CPU the peak resident
set size above the level reached once the inputs exist (the kernel's peak counter is reset
there), on CUDA the peak of ``torch.cuda.max_memory_allocated`` above the allocated inputs.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from deformable_detr.layers.ms_deform_attn_func import (
    _has_compiled_kernel,
    ms_deform_attn_reference,
    multi_scale_deformable_attention,
)

LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
SHAPES = ("encoder", "decoder")
IMPLS = {"compiled": multi_scale_deformable_attention, "reference": ms_deform_attn_reference}
# name: (implementation, dtype of value)
VARIANTS = {
    "compiled": ("compiled", torch.float32),
    "reference": ("reference", torch.float32),
    "compiled-bf16": ("compiled", torch.bfloat16),
}
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def make_inputs(shape, device, dtype=torch.float32, seed=0):
    """Inputs of the ``encoder`` or ``decoder`` benchmark shape.

    Args:
        shape (str): "encoder" (queries = all tokens) or "decoder" (300 queries).
        device (str): torch device.
        dtype (torch.dtype): dtype of every floating-point input.
        seed (int): random seed.

    Returns:
        tuple: value, spatial_shapes, level_start_index, sampling_locations, attention_weights.
    """
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_tokens = int(sizes.sum())
    num_queries = num_tokens if shape == "encoder" else 300
    num_levels = len(LEVELS)
    value = torch.randn(1, num_tokens, NUM_HEADS, HEAD_DIM, generator=gen, dtype=dtype)
    locations = torch.rand(
        1, num_queries, NUM_HEADS, num_levels, NUM_POINTS, 2, generator=gen, dtype=dtype
    )
    locations = locations * 1.1 - 0.05
    logits = torch.randn(1, num_queries, NUM_HEADS, num_levels * NUM_POINTS, generator=gen)
    weights = logits.softmax(-1).view(1, num_queries, NUM_HEADS, num_levels, NUM_POINTS)
    tensors = (value, spatial_shapes, level_start_index, locations, weights.to(dtype))
    return tuple(t.to(device) for t in tensors)


def _with_value_dtype(inputs, dtype):
    return (inputs[0].to(dtype),) + tuple(inputs[1:])


def cpu_description():
    """CPU model name and which of ``CPU_FLAGS`` it has, from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key.strip() == "model name":
                    model = rest.strip()
                elif key.strip() == "flags":
                    flags = set(rest.split())
                    break
    except OSError:
        return model
    listed = " ".join(f"{flag}={'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    return f"{model} ({listed})"


def header(device, threads, repeat, clock="wall"):
    """Lines naming the machine and the settings a table was measured with."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    lines = [
        f"cpu: {cpu_description()}, {os.cpu_count()} logical CPUs",
        f"torch {torch.__version__}, device={device}, threads={threads}, repeat={repeat}, "
        f"clock={clock}, "
        f"load average {' '.join(f'{x:.2f}' if isinstance(x, float) else x for x in load)}",
    ]
    if device == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    return lines


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _run(fn, inputs, backward):
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))
    return [t.grad for t in leaves]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_cases(device, repeat, clock="wall"):
    """Time every (shape, mode, variant); variants alternate within a repeat.

    Args:
        device (str): torch device.
        repeat (int): timed runs per case.
        clock (str): "wall" (``time.perf_counter``) or "cpu" (``time.process_time``, the CPU time
            of all the process's threads).

    Returns:
        dict: (shape, mode, variant) -> list of seconds.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    times = {}
    for shape in SHAPES:
        base = make_inputs(shape, device)
        inputs = {name: _with_value_dtype(base, dtype) for name, (_, dtype) in VARIANTS.items()}
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            for name, (impl, _) in VARIANTS.items():
                _run(IMPLS[impl], inputs[name], backward)  # warm-up
            for _ in range(repeat):
                for name, (impl, _) in VARIANTS.items():
                    _sync(device)
                    start = now()
                    _run(IMPLS[impl], inputs[name], backward)
                    _sync(device)
                    times.setdefault((shape, mode, name), []).append(now() - start)
    return times


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory_child(shape, variant, mode, device, threads):
    """Peak extra memory (bytes) of one case; meant to run in a fresh process."""
    torch.set_num_threads(threads)
    impl, dtype = VARIANTS[variant]
    inputs = _with_value_dtype(make_inputs(shape, device), dtype)
    small = _with_value_dtype(make_inputs("decoder", device), dtype)
    backward = mode == "fwd+bwd"
    fn = IMPLS[impl]
    if device == "cuda":
        _run(fn, small, backward)  # load kernels before measuring
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(fn, inputs, backward)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # A small call first, so that one-time allocations (kernels, thread pools) are not counted.
    _run(fn, small, backward)
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current size.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    _run(fn, inputs, backward)
    return (_rss_kib("VmHWM") - base) * 1024


def measure_memory(shape, variant, mode, device, threads):
    cmd = [sys.executable, "-m", "deformable_detr.benchmark.attention", "--device", device]
    cmd += ["--threads", str(threads), "--memory-child", shape, variant, mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def _mb(memory, key):
    value = memory.get(key)
    return f"{value / 2**20:.1f}" if value is not None else "-"


def format_table(times, memory, threads, device, repeat, clock="wall"):
    """The float32 table (compiled against reference) and the bfloat16 table, under a header."""
    lines = header(device, threads, repeat, clock)
    lines.append(
        "float32: best / median seconds; ratio = reference / compiled; memory = peak extra MB"
    )
    lines.append(
        f"{'shape':<8} {'mode':<8} {'compiled':>9} {'median':>9} {'reference':>10} {'median':>9} "
        f"{'ratio':>7} {'median':>7} {'mem comp':>9} {'mem ref':>9}"
    )
    for shape in SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            c = times[(shape, mode, "compiled")]
            r = times[(shape, mode, "reference")]
            lines.append(
                f"{shape:<8} {mode:<8} {min(c):9.4f} {statistics.median(c):9.4f} "
                f"{min(r):10.4f} {statistics.median(r):9.4f} {min(r) / min(c):6.1f}x "
                f"{statistics.median(r) / statistics.median(c):6.1f}x "
                f"{_mb(memory, (shape, mode, 'compiled')):>9} "
                f"{_mb(memory, (shape, mode, 'reference')):>9}"
            )
    lines.append(
        "bfloat16 values (compiled): best / median seconds; ratios against the float32 reference "
        "and the float32 compiled kernel, best (median)"
    )
    lines.append(
        f"{'shape':<8} {'mode':<8} {'bf16':>9} {'median':>9} {'vs f32 reference':>18} "
        f"{'vs f32 compiled':>17} {'mem bf16':>9}"
    )
    for shape in SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            b = times[(shape, mode, "compiled-bf16")]
            c = times[(shape, mode, "compiled")]
            r = times[(shape, mode, "reference")]
            med_b = statistics.median(b)
            vs_ref = f"{min(r) / min(b):.1f}x ({statistics.median(r) / med_b:.1f}x)"
            vs_comp = f"{min(c) / min(b):.2f}x ({statistics.median(c) / med_b:.2f}x)"
            lines.append(
                f"{shape:<8} {mode:<8} {min(b):9.4f} {med_b:9.4f} {vs_ref:>18} {vs_comp:>17} "
                f"{_mb(memory, (shape, mode, 'compiled-bf16')):>9}"
            )
    lines.append(
        "memory: peak extra "
        + (
            "torch.cuda.max_memory_allocated above the inputs"
            if device == "cuda"
            else "resident set size (VmHWM - VmRSS) above the inputs"
        )
        + ", each case in a fresh subprocess"
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall-clock time, or CPU time of the process (robust to other jobs on the machine)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument(
        "--memory-child", nargs=3, metavar=("SHAPE", "VARIANT", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu does not measure GPU work; use --clock wall with --device cuda")

    if args.memory_child:
        shape, variant, mode = args.memory_child
        peak = measure_memory_child(shape, variant, mode, args.device, args.threads)
        print(json.dumps({"peak_bytes": peak}))
        return

    if not _has_compiled_kernel(args.device):
        print(
            f"warning: deformable_detr._C has no {args.device} kernel; 'compiled' below is the "
            "reference path",
            file=sys.stderr,
        )
    torch.set_num_threads(args.threads)
    times = time_cases(args.device, args.repeat, args.clock)
    memory = {}
    if not args.no_memory:
        for shape in SHAPES:
            for mode in ("fwd", "fwd+bwd"):
                for variant in VARIANTS:
                    memory[(shape, mode, variant)] = measure_memory(
                        shape, variant, mode, args.device, args.threads
                    )
    print(
        format_table(times, memory, torch.get_num_threads(), args.device, args.repeat, args.clock)
    )


if __name__ == "__main__":
    main()
