"""
The Python steps of scripts/gpu_check.sh (the GPU check), one subcommand each:

    python scripts/gpu_check.py precision            # the fused kernel's bf16 errors at the real LM-head shape
    python scripts/gpu_check.py build DIR LAYERS     # a Llama-3.1-8B-shaped policy and reward model (random) + data
    python scripts/gpu_check.py train TAG ARGS...    # train.main(ARGS) with step times, tokens and peak memory kept
    python scripts/gpu_check.py report TAGS RANKS ARGS...  # tokens/s, MFU, peak memory beside the plan on RANKS GPUs
    python scripts/gpu_check.py toy DIR ARGS...      # the toy pipeline run in DIR, stopped by SIGTERM, then resumed

Single process (train also under torchrun). Measurements go to $OUT/measure-TAG.json (OUT defaults
to out/gpu_check). With GPU_CHECK_DRY=1 every shape is tiny, so the same code runs on a CPU in
seconds: tests/test_gpu_check.py runs the whole check that way.

Deliberate simplifications: MFU counts 6 N FLOPs per trained token for the policy and 2 N for the
frozen reference's forward (N = parameters without the input embedding; attention's own FLOPs
and activation recomputation are not counted), against GPU_PEAK_TFLOPS (default: 989 for an
H100 / H200, bf16 dense).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import checkpoint  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
import plan  # noqa: E402
import train  # noqa: E402

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
OUT = Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, SXM


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# precision: the kernel against an fp32 reference on the same bf16 inputs


def precision() -> bool:
    """Errors of the kernel's log-probs and gradients at bf16 against the fp32 logits path (TF32
    off) on the same bf16 inputs, at several chunk sizes; the weight gradient's error should not
    grow with the number of tiles (each element rounded once); host syncs in one call."""
    n, h, v = (512, 64, 2048) if DRY else (8192, 4096, 128256)
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    batch = 8
    length = n // batch + 1
    hidden = torch.randn(batch, length, h, device=DEVICE, generator=generator).bfloat16()
    weight = (torch.randn(v, h, device=DEVICE, generator=generator) * 3.0 / h**0.5).bfloat16()  # logits std ~3
    zipf = 1.0 / torch.arange(1, v + 1, device=DEVICE, dtype=torch.float32)  # frequent targets recur across tiles
    ids = torch.multinomial(zipf, batch * length, replacement=True, generator=generator).view(batch, length)
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    mask[:, 0] = False
    coefficients = torch.randn(batch, device=DEVICE, generator=generator) * 0.05
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    reference = losses.naive_sequence_logprobs(h32 @ w32.t(), ids, mask)
    (reference * coefficients).sum().backward()
    truth = (reference.detach(), h32.grad, w32.grad)
    del h32, w32, reference

    def relative(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    errors, finite = {}, True
    for chunk in (64, 256, 2048, n):
        h_, w_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = losses.sequence_logprobs(h_, w_, ids, mask, chunk_size=chunk)
        (out * coefficients).sum().backward()
        got = (out.detach(), h_.grad, w_.grad)
        errors[chunk] = [relative(x, t) for x, t in zip(got, truth)]
        finite = finite and all(torch.isfinite(x).all().item() for x in got)
        print(
            f"chunk {chunk:5d}: relative error logp {errors[chunk][0]:.1e}  grad_hidden {errors[chunk][1]:.1e}  "
            f"grad_weight {errors[chunk][2]:.1e}  finite={finite}"
        )
    if DEVICE == "cuda":
        h_, w_ = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            (losses.sequence_logprobs(h_, w_, ids, mask) * coefficients).sum().backward()
            torch.cuda.set_sync_debug_mode("default")
        print("host-device syncs in one forward + backward:", sum("synchroniz" in str(c.message) for c in caught))
    ratio = errors[64][2] / errors[n][2]
    ok = finite and errors[256][0] < 1e-3 and errors[256][1] < 3e-2 and errors[256][2] < 3e-2 and ratio <= 1.3
    print(f"PRECISION {'OK' if ok else 'BAD'}: grad_weight error at chunk 64 / one chunk = {ratio:.2f}x (<= 1.3)")
    return ok


# ----------------------------------------------------------------------------------------------
# build: a Llama-3.1-8B-shaped policy and reward model with few layers, and 4k-token pairs


def build(out: Path, layers: int) -> None:
    """Policy and reward model with Llama-3.1-Tulu-3-8B's hidden size, heads and vocabulary (tiny
    widths when dry) and `layers` decoder blocks, random bf16 weights, the Tulu 3 chat template over
    a byte-level tokenizer (tests/chat_tokenizers.py); train/test pairs of ~4k tokens."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    import chat_tokenizers

    tokenizer = chat_tokenizers.build("tulu3")
    llama = LlamaConfig.from_pretrained(ROOT / "tests" / "model_configs" / "llama-3.1-tulu-3-8b-sft")
    llama.num_hidden_layers = layers
    llama.pad_token_id, llama.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    llama.eos_token_id = tokenizer.eos_token_id
    if DRY:
        llama.hidden_size, llama.intermediate_size, llama.head_dim = 64, 128, 16
        llama.num_attention_heads, llama.num_key_value_heads, llama.vocab_size = 4, 2, 512
    for name, cls in (("policy", LlamaForCausalLM), ("rm", LlamaForSequenceClassification)):
        llama.num_labels = 1 if name == "rm" else 2
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = cls(llama).to(torch.bfloat16)
        if name == "policy":
            model.generation_config = GenerationConfig(
                eos_token_id=[tokenizer.eos_token_id],
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        del model
    rng = random.Random(0)
    words = "alpha beta gamma delta answer question model reason token order".split()
    scale = 0.1 if DRY else 1.0

    def text(n_words: int) -> str:  # about 6.4 characters, so 6.4 byte-level tokens, a word
        return " ".join(rng.choice(words) for _ in range(max(1, int(n_words * scale))))

    for split, n in (("train_prefs", 8), ("test_prefs", 2)):
        rows = [{"prompt": text(160), "chosen": text(460), "rejected": text(380)} for _ in range(n)]
        data.write_jsonl(out / "data" / f"{split}.jsonl", rows)
    print(f"built {out} ({layers} layers, hidden {llama.hidden_size}, vocabulary {llama.vocab_size})")


# ----------------------------------------------------------------------------------------------
# train: train.main with step times, tokens and peak memory recorded


def tokens_of(batch: list) -> int:
    """Real (unpadded) tokens of a global batch's sequences: prompt + answer for each answer a
    tuple carries (offline chosen and rejected, and the online pair where there is one)."""
    total = 0
    for item in batch:
        for role in dpo.OFFLINE_ROLES + dpo.ONLINE_ROLES:
            answer = getattr(item, role, None)
            if answer is not None:
                total += len(item.prompt_ids) + len(answer)
    return total


def measured_train(tag: str, argv: list[str]) -> None:
    """Run train.main(argv) with hooks: per optimizer step its time (forward, backward and step,
    synchronised) and tokens; per stage the peak allocated memory before training (loading, phase
    1) and the peak allocated / reserved in training; at each generation phase the memory held and
    free. Written to $OUT/measure-TAG.json on rank 0 when the run ends."""
    GIB = 2**30
    record: dict = {"steps": [], "stages": {}, "generation": []}
    current: dict = {}

    def peaks() -> tuple[float, float]:
        if DEVICE != "cuda":
            return 0.0, 0.0
        return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB

    start, accumulate, step = checkpoint.Stage.start, engine.accumulate_gradients, engine.optimizer_step
    generate = engine.distributed_generate  # what Algorithm 1's phase 1 calls

    def stage_start(self):
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return start(self)

    def timed_accumulate(stage, model, batch, *args, **kwargs):
        entry = record["stages"].get(stage.name)
        if entry is None:  # the stage's first step: the peak so far is loading's (and phase 1's)
            entry = record["stages"][stage.name] = {"before_training_peak_allocated_gib": peaks()[0]}
            entry.update(train_peak_allocated_gib=0.0, train_peak_reserved_gib=0.0)
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
        sync()
        current.update(started=time.perf_counter(), tokens=tokens_of(batch), stage=stage.name)
        return accumulate(stage, model, batch, *args, **kwargs)

    def timed_step(stage, *args, **kwargs):
        out = step(stage, *args, **kwargs)
        sync()
        record["steps"].append(
            {"stage": current["stage"], "time_s": time.perf_counter() - current["started"], "tokens": current["tokens"]}
        )
        entry, (allocated, reserved) = record["stages"][current["stage"]], peaks()
        entry["train_peak_allocated_gib"] = max(entry["train_peak_allocated_gib"], allocated)
        entry["train_peak_reserved_gib"] = max(entry["train_peak_reserved_gib"], reserved)
        return out

    def measured_generate(*args, **kwargs):
        if DEVICE == "cuda":
            free, total = torch.cuda.mem_get_info()
            record["generation"].append(
                {
                    "allocated_gib": torch.cuda.memory_allocated() / GIB,
                    "reserved_gib": torch.cuda.memory_reserved() / GIB,
                    "free_gib": free / GIB,
                    "total_gib": total / GIB,
                }
            )
        return generate(*args, **kwargs)

    checkpoint.Stage.start, engine.accumulate_gradients = stage_start, timed_accumulate
    engine.optimizer_step, engine.distributed_generate = timed_step, measured_generate
    try:
        train.main(argv)
    finally:
        if os.environ.get("RANK", "0") == "0":
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / f"measure-{tag}.json").write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------------------------
# report: throughput and memory beside the plan


def report(tags: list[str], ranks: int, argv: list[str]) -> bool:
    """Print tokens/s and MFU per stage (median over steps after the first; MFU over the `ranks`
    GPUs) and rank 0's measured peak memory beside plan.memory_plan for the same config on `ranks`
    GPUs, for the runs measured under `tags`; True when the plan holds (measured reserved memory
    in training at most the plan's training total)."""
    record: dict = {"steps": [], "stages": {}, "generation": []}
    for tag in tags:
        part = json.loads((OUT / f"measure-{tag}.json").read_text())
        record["steps"] += part["steps"]
        record["stages"].update(part["stages"])
        record["generation"] += part["generation"]
    cfg = config.parse_config(argv)
    shapes = plan.model_shapes(cfg.model)
    gpu = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    total_gib = gpu.total_memory / plan.GIB if gpu else 80.0
    peak = float(os.environ.get("GPU_PEAK_TFLOPS", 0)) or next(
        (tflops for name, tflops in PEAK_TFLOPS.items() if gpu and name in gpu.name), 0.0
    )
    trained = shapes.params - shapes.vocab * shapes.hidden  # without the input embedding (a lookup)
    flops_per_token = 6 * trained + 2 * trained  # policy forward + backward, the frozen reference's forward
    print(
        f"{shapes.layers}-layer Llama-3.1-8B shape ({shapes.params / 1e6:,.1f}M parameters, {trained / 1e6:,.1f}M "
        f"without the input embedding), {cfg.micro_batch_size} tuple(s) per micro-batch, max_len {cfg.max_len}, "
        f"{ranks} rank(s)"
    )
    print("| stage | steps | tokens / step | s / step (median) | tokens/s | MFU |")
    print("|---|---|---|---|---|---|")
    for stage in dict.fromkeys(s["stage"] for s in record["steps"]):
        steps = [s for s in record["steps"] if s["stage"] == stage]
        timed = steps[1:] or steps  # the first step warms up
        seconds = statistics.median(s["time_s"] for s in timed)
        tokens = statistics.median(s["tokens"] for s in timed)
        mfu = f"{flops_per_token * tokens / seconds / (ranks * peak * 1e12):.1%}" if peak else "n/a"
        print(f"| {stage} | {len(steps)} | {tokens:,.0f} | {seconds:.3f} | {tokens / seconds:,.0f} | {mfu} |")
    sharded = plan.needs_sharded_gradients(cfg, ranks, total_gib, shapes, shapes)
    memory = plan.memory_plan(cfg, ranks, total_gib, shapes, shapes, sharded)
    training = sum(memory["training (phase 2)"].values())
    print(f"memory, GiB per GPU of {total_gib:.0f} on {ranks}: the plan's training phase {training:.1f}")
    if DEVICE != "cuda":
        print("no CUDA: peak memory not measured (dry run)")
        return True
    for name, stage in record["stages"].items():
        print(
            f"  {name}: training peak allocated {stage['train_peak_allocated_gib']:.1f}, reserved "
            f"{stage['train_peak_reserved_gib']:.1f}; before training (loading, phase 1) allocated "
            f"{stage['before_training_peak_allocated_gib']:.1f}"
        )
    resident = sum(v for k, v in memory["generation (phase 1)"].items() if "vLLM" not in k)
    for g in record["generation"]:
        print(
            f"  at generation: allocated {g['allocated_gib']:.1f}, reserved {g['reserved_gib']:.1f} (plan: "
            f"{resident:.1f} with the allowance); free {g['free_gib']:.1f} of {g['total_gib']:.1f}, so a vLLM child "
            f"could start with gpu_memory_utilization up to {g['free_gib'] / g['total_gib']:.2f}"
        )
    worst = max(s["train_peak_reserved_gib"] for s in record["stages"].values())
    holds = worst <= training
    print(f"MEMORY PLAN {'HOLDS' if holds else 'UNDERESTIMATES'}: measured reserved {worst:.1f} vs plan {training:.1f}")
    return holds


# ----------------------------------------------------------------------------------------------
# toy: the pipeline stopped by SIGTERM during MetaAPO's training, then resumed


def toy_stop_and_resume(directory: Path, argv: list[str]) -> bool:
    """`python train.py ARGV` (the toy pipeline) run in `directory`, where no out/ exists yet (a
    fresh checkout: the toy's assets are built first), SIGTERM once MetaAPO's first training step
    is logged: it must exit with 143 and a checkpoint; the same command with --resume must finish
    and write the results table."""
    import signal
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    argv = [*argv, "--out_dir=run"]
    out = directory / "run"
    log = out / "metaapo" / "metrics.jsonl"
    started = time.time()
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=directory)
    while process.poll() is None:
        if log.exists() and any('"iteration": 1, "lr"' in line for line in log.read_text().splitlines()):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    status = process.wait()
    print(f"stopped by SIGTERM after {time.time() - started:.0f}s with status {status} (143 expected)", flush=True)
    if status != 143:
        return False
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--resume"], cwd=directory)
    table = out / "results.md"
    print(f"resumed: status {resumed.returncode}, {time.time() - started:.0f}s in all", flush=True)
    return resumed.returncode == 0 and table.exists() and "| MetaAPO |" in table.read_text()


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "precision":
        raise SystemExit(0 if precision() else 1)
    if command == "build":
        return build(Path(args[0]), int(args[1]))
    if command == "train":
        return measured_train(args[0], args[1:])
    if command == "report":
        raise SystemExit(0 if report(args[0].split(","), int(args[1]), args[2:]) else 1)
    if command == "toy":
        raise SystemExit(0 if toy_stop_and_resume(Path(args[0]), args[1:]) else 1)
    raise SystemExit(f"gpu_check.py: unknown step {command!r}; one of precision, build, train, report, toy")


if __name__ == "__main__":
    main()
