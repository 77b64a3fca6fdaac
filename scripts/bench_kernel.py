"""
The fused log-prob kernel's benchmark: forward + backward time, 8NHV/time and peak extra memory of
the naive path (logits + log_softmax + gather), torch's chunked F.linear_cross_entropy where this
torch has it, and ours (losses.sequence_logprobs) at several chunk sizes, one table per device.

Run
    python scripts/bench_kernel.py                                        # CPU, and CUDA when present
    python scripts/bench_kernel.py --devices cuda --chunk_sizes 256,1024,4096   # the CUDA table only
    python scripts/bench_kernel.py --shape 8192,4096,128256 --dtype bfloat16    # tokens,hidden,vocab
Single process, no torchrun; on the CPU each variant runs in a fresh process, so that its peak RSS
is its own. scripts/gpu_check.sh runs it at the real LM-head shape on a GPU.

Deliberate simplifications: random inputs (the cost does not depend on them); one prompt token per
sequence, the rest response.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from losses import default_chunk_size, naive_sequence_logprobs, select_response_rows, sequence_logprobs  # noqa: E402

BENCH_SHAPES = {  # device: (dtype, sequences, response tokens in all, hidden, vocab)
    "cpu": ("float32", 8, 4096, 1024, 32768),
    "cuda": ("bfloat16", 8, 8192, 4096, 128256),
}
BENCH_VARIANTS = {
    "naive": "logits + log_softmax + gather",
    "torch": "F.linear_cross_entropy(reduction='none', chunked) + sum",
    "ours": "fused kernel (sequence_logprobs)",
}


def torch_kernel_available() -> bool:
    """torch's chunked F.linear_cross_entropy with options= (newer than torch 2.12; the GPU machine's
    2.11 lacks it): the bench's 'torch' row, marked unavailable without it."""
    return hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")


def _bench_inputs(device: str, shape: tuple):
    dtype, batch, tokens, hidden_size, vocab = shape
    dtype = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    length = tokens // batch + 1  # one prompt token per sequence, the rest is response
    hidden = torch.randn(batch, length, hidden_size, device=device, dtype=dtype, generator=generator).requires_grad_()
    weight = (
        torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator) * hidden_size**-0.5
    ).requires_grad_()
    input_ids = torch.randint(0, vocab, (batch, length), device=device, generator=generator)
    response_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    response_mask[:, 0] = False
    coefficients = torch.randn(batch, device=device, generator=generator)
    return hidden, weight, input_ids, response_mask, coefficients


def _bench_step(variant: str, hidden, weight, input_ids, response_mask, coefficients, chunk_size):
    if variant == "naive":
        logps = naive_sequence_logprobs(hidden @ weight.t(), input_ids, response_mask)
    elif variant == "torch":
        rows, targets, sequence = select_response_rows(hidden, input_ids, response_mask)
        token = -F.linear_cross_entropy(rows, weight, targets, reduction="none", options=nn.LinearCrossEntropyOptions())
        logps = torch.zeros(input_ids.shape[0], device=rows.device, dtype=torch.float32).index_add(
            0, sequence, token.float()
        )
    else:
        logps = sequence_logprobs(hidden, weight, input_ids, response_mask, chunk_size)
    (logps * coefficients).sum().backward()
    hidden.grad = weight.grad = None


def _bench_worker(variant: str, device: str, repeats: int, chunk_size: int | None, shape: tuple) -> dict:
    """Runs in a fresh process (CPU) so that peak RSS belongs to one variant alone."""
    import resource

    torch.manual_seed(0)
    inputs = _bench_inputs(device, shape)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if variant == "inputs":  # the baseline: the inputs alone (the gradients count as extra memory)
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    _bench_step(variant, *inputs, chunk_size)  # warm-up, also the memory measurement
    sync()
    result = {}
    if device == "cuda":
        result["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        _bench_step(variant, *inputs, chunk_size)
        sync()
        times.append(time.perf_counter() - start)
    result["median_s"] = statistics.median(times)
    result["times_s"] = times
    if device == "cpu":
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _run_worker(variant: str, device: str, repeats: int, chunk_size: int | None, shape: tuple) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--bench_worker", variant, "--device", device]
    command += ["--repeats", str(repeats), "--dtype", shape[0], "--shape", ",".join(map(str, shape[2:]))]
    if chunk_size:
        command += ["--chunk_size", str(chunk_size)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_shape(device: str, dtype: str | None = None, shape: tuple[int, int, int] | None = None) -> tuple:
    """(dtype, sequences, tokens, hidden, vocab): the device's BENCH_SHAPES, with dtype and
    (tokens, hidden, vocab) replaced where given."""
    default = BENCH_SHAPES[device]
    return (dtype or default[0], default[1], *(shape or default[2:]))


def _ratio(value: float, naive: float) -> str:
    return f"{value / naive:.2f}x" if naive > 0 else "-"  # tiny shapes can leave the naive RSS at its baseline


def bench(devices: list[str], repeats: int, chunk_sizes: list[int | None], dtype=None, shape=None) -> None:
    """Print one table per device: forward+backward time, 8NHV/time and peak extra memory of the
    naive path, torch's kernel (where this torch has it) and ours at each chunk size."""
    for device in devices:
        spec = bench_shape(device, dtype, shape)
        _, batch, tokens, hidden_size, vocab = spec
        print(
            f"\n{device.upper()}: {spec[0]}, {batch} sequences, N={tokens} response tokens, H={hidden_size}, "
            f"V={vocab}; forward+backward, median of {repeats} after a warm-up"
        )
        rows = [("naive", None), ("torch", None)] + [("ours", c) for c in chunk_sizes]
        results = {}
        for variant, chunk in rows:
            if variant == "torch" and not torch_kernel_available():
                results[(variant, chunk)] = None  # printed as unavailable
            elif device == "cpu":
                results[(variant, chunk)] = _run_worker(variant, device, repeats, chunk, spec)
            else:
                results[(variant, chunk)] = _bench_worker(variant, device, repeats, chunk, spec)
        if device == "cpu":
            baseline = _run_worker("inputs", device, repeats, None, spec)["peak_rss_mb"]
            for result in filter(None, results.values()):
                result["peak_extra_mb"] = result["peak_rss_mb"] - baseline
        naive = results[("naive", None)]
        flops = 8 * tokens * hidden_size * vocab
        print(
            "| variant | chunk | time (s) | min-max (s) | vs naive | peak extra memory (MiB) | vs naive | 8NHV/time "
            "(TFLOP/s) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for (variant, chunk), result in results.items():
            chunk_text = str(chunk or default_chunk_size(torch.device(device))) if variant == "ours" else "-"
            if result is None:
                print(
                    f"| {variant}: {BENCH_VARIANTS[variant]} | - | unavailable: torch {torch.__version__} has no "
                    "F.linear_cross_entropy(options=) | - | - | - | - | - |"
                )
                continue
            print(
                f"| {variant}: {BENCH_VARIANTS[variant]} | {chunk_text} | {result['median_s']:.3f} | "
                f"{min(result['times_s']):.2f}-{max(result['times_s']):.2f} | "
                f"{_ratio(result['median_s'], naive['median_s'])} | {result['peak_extra_mb']:.0f} | "
                f"{_ratio(result['peak_extra_mb'], naive['peak_extra_mb'])} | {flops / result['median_s'] / 1e12:.3f} |"
            )
        print(
            "peak extra memory: "
            + (
                "peak RSS of a fresh process per variant minus that of one holding the inputs only"
                if device == "cpu"
                else "max_memory_allocated minus the allocation before the call"
            )
            + "; gradients included"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark of the fused log-prob kernel.")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant, after one warm-up")
    parser.add_argument(
        "--chunk_sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated chunk sizes for our kernel (default: the device default)",
    )
    parser.add_argument(
        "--devices",
        type=lambda s: s.split(","),
        default=None,
        help="comma-separated devices to bench, e.g. cuda (default: cpu, and cuda when present)",
    )
    parser.add_argument(
        "--shape",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=None,
        help="N,H,V: response tokens, hidden size, vocabulary (default: the device's BENCH_SHAPES)",
    )
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the device's BENCH_SHAPES)")
    parser.add_argument("--bench_worker", choices=["inputs", *BENCH_VARIANTS], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.bench_worker:
        spec = bench_shape(args.device, args.dtype, args.shape)
        print(json.dumps(_bench_worker(args.bench_worker, args.device, args.repeats, args.chunk_size, spec)))
    else:
        devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        bench(devices, args.repeats, args.chunk_sizes or [None], args.dtype, args.shape)


if __name__ == "__main__":
    main()
