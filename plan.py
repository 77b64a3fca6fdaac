"""
The memory plan and --dry_run: from a model's config alone (no weight loaded), each stage's
steps and tokens, and per GPU and phase (training, generation, reward scoring) the memory it
holds, refusing a plan that cannot fit; grad_accumulation=auto reads the same estimate.

Run
    python train.py --model=tulu8b --dry_run --gpus=8 --gpu_memory_gb=80
    python train.py --model=tulu8b --method=ppo --dry_run      # PPO: actor and critic both trained
Single process, CPU or GPU; reads configs only (from the hub, or a local directory).

Deliberate simplifications
- Arithmetic from the shapes, with a fixed allowance for the CUDA context, NCCL and fragmentation;
  scripts/gpu_check.sh sets a measured peak beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from config import HUB_ID, Config, ConfigError, load_config, sft_path, train_source
from engine import Runtime, _decoder_blocks

# ==============================================================================================
# Shapes and the memory of each phase

GIB = 2**30

OVERHEAD_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation: a fixed allowance per GPU

# The dataset card's size, for planning where the data cannot be read (no network)
KNOWN_PAIRS = {("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"): 61135}


@dataclass
class Shapes:
    """What the memory estimate needs of an architecture, read from its config alone."""

    params: int  # every parameter, tied ones once
    outside_blocks: int  # embeddings, final norm, head: the FSDP root's own parameters
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int  # key/value heads x head dim: the KV cache per token and layer is 2 x this


def model_shapes(path: str, flag: str = "--model") -> Shapes:
    """Shapes of a model directory or hub id, counting its parameters on the meta device (no memory).
    A config that does not load is a one-line error naming `flag`."""
    from transformers import AutoModelForCausalLM

    config = load_config(flag, path).get_text_config()
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in lm.parameters())
    inside = sum(p.numel() for block in _decoder_blocks(lm) for p in block.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Shapes(
        params,
        params - inside,
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        kv_heads * head_dim,
    )


def activation_bytes(s: Shapes, tokens: int, checkpointing: bool, grad: bool = True) -> float:
    """bf16 activations of one micro-batch of `tokens` on one GPU: a block keeps about
    10 x hidden + 4 x intermediate values per token (attention projections, norms, residuals; the
    MLP's gate, up, activation and product); with checkpointing only each block's input stays and
    one block is recomputed at a time; without gradients only the block running."""
    block = tokens * (10 * s.hidden + 4 * s.intermediate) * 2
    if not grad:
        return block
    return s.layers * tokens * s.hidden * 2 + block if checkpointing else s.layers * block


def memory_plan(
    cfg: Config, world: int, gpu_gib: float, policy: Shapes, annotator: Shapes, sharded_gradients: bool
) -> dict:
    """GiB per GPU in each phase of a run: {phase: {component: GiB}}.

    Training counts the fused kernel's whole working set (a logits tile, the head's bf16 weight
    gradient, the fp32 hidden gradient) and the fp32 buffer FSDP2 copies the root's gradients into
    for their reduce-scatter (torch's foreach_reduce). Generation counts what stays allocated when the vLLM
    child starts: the shards, once the roots are resharded and the cache emptied (release_memory),
    and the child's gpu_memory_utilization share, which vLLM refuses to start without. A frozen
    model's root reshards after each forward (shard_model), so no gathered reference root is
    counted. PPO (--method ppo) trains two models, the actor (the policy's shapes) and the critic
    (the reward model's), keeps both AdamW states across its rollouts, and holds the reward model
    beside the reference throughout."""
    w, p, r, ppo = world, policy.params, annotator.params, cfg.method == "ppo"
    gathered = lambda s: 2 * (s.outside_blocks + 2 * (s.params - s.outside_blocks) / s.layers)  # noqa: E731 (bf16 root + 2 prefetched blocks)
    trained = p + r if ppo else p  # parameters with gradients and AdamW state
    # MetaAPO's micro-batch: offline and online chosen and rejected; PPO's: one response per item
    tokens = cfg.micro_batch_size * (1 if ppo else 4) * cfg.max_len
    resident = {"policy weights (fp32 shards)": 4 * p / w, "reference (bf16 shards)": 2 * p / w}
    if ppo:
        resident.update({"critic weights (fp32 shards)": 4 * r / w, "reward model (bf16 shards)": 2 * r / w})
    adam = {"AdamW state (fp32 shards)": 8 * trained / w}
    training = {
        **resident,
        "gradients (fp32, sharded)" if sharded_gradients else "gradients (fp32, unsharded while accumulating)": 4
        * trained
        / (w if sharded_gradients else 1),
        **adam,
        "gathered bf16 weights and gradients (root + 2 blocks)": 2 * gathered(policy)
        + (2 * gathered(annotator) if ppo else 0),
        f"activations ({tokens} tokens per micro-batch)": activation_bytes(policy, tokens, cfg.activation_checkpointing)
        + (activation_bytes(annotator, tokens, cfg.activation_checkpointing) if ppo else 0),
        "log-prob kernel chunk (fp32 logits tile, bf16 head gradient, fp32 hidden gradient)": (
            (cfg.chunk_size or 256) * policy.vocab * 6
            + policy.vocab * policy.hidden * 2
            + 2 * tokens * policy.hidden * 4
        ),
        # FSDP2 copies a group's gradients into one reduce_dtype buffer before its reduce-scatter; the root's is the
        # largest (embeddings and head)
        "fp32 reduce-scatter input (the root's gradients)": 4
        * max(policy.outside_blocks, annotator.outside_blocks if ppo else 0),
    }
    plan = {
        "training (phase 2)": training,
        "generation (phase 1)": {
            **resident,
            **(adam if ppo else {}),  # MetaAPO's optimizer is made after phase 1; PPO's lives across rollouts
            "vLLM's share (gpu_memory_utilization)": cfg.gpu_memory_utilization * gpu_gib * GIB,
        },
        "reward scoring (phase 1)": {
            **resident,
            **({} if ppo else {"reward model (bf16 shards)": 2 * r / w}),
            "gathered bf16 reward-model weights": gathered(annotator),
            f"activations, no gradient ({cfg.micro_batch_size * 4 * cfg.rm_max_len} tokens)": activation_bytes(
                annotator, cfg.micro_batch_size * 4 * cfg.rm_max_len, True, grad=False
            ),
        },
    }
    for parts in plan.values():
        parts["CUDA context, NCCL, fragmentation"] = OVERHEAD_GIB * GIB
    return {phase: {k: v / GIB for k, v in parts.items()} for phase, parts in plan.items()}


def vllm_need_gib(cfg: Config, s: Shapes) -> float:
    """What one vLLM engine (tensor_parallel_size=1) needs in its share: the bf16 weights, the KV
    cache of one longest request, and about 1 GiB of activations."""
    context = cfg.vllm_max_model_len or cfg.max_prompt_len + cfg.max_new_tokens
    return (2 * s.params + context * s.layers * 2 * s.kv_width * 2) / GIB + 1.0


# What a stop's estimate assumes (nothing here measures them; scripts/gpu_check.sh measures a step's tokens/s)
ASSUMED_TFLOPS = 400.0  # bf16 compute per GPU in training: about 40% of an H100's or H200's dense peak
ASSUMED_WRITE_GIB_S = 1.0  # checkpoint write speed per GPU (node-local NVMe; a shared file system may be slower)
TORCHRUN_GRACE_S = 30  # torchrun sends SIGKILL this long after it forwards SIGTERM (--shutdown_timeout's default)


def stop_estimate(cfg: Config, world: int, policy: Shapes, annotator: Shapes) -> dict:
    """What a stop signal in training costs before the process can exit: the step under way (its
    tokens per GPU at ASSUMED_TFLOPS, counting 6 N per trained token, 2 N for the reference's
    forward and 2 N for recomputing checkpointed activations), then a checkpoint (fp32 weights and
    AdamW state of what trains, each GPU writing its shard at ASSUMED_WRITE_GIB_S); and the
    torchrun --shutdown_timeout that leaves twice that, in whole minutes."""
    ppo = cfg.method == "ppo"
    trained = policy.params + (annotator.params if ppo else 0)
    tokens = math.ceil(cfg.batch_size / world) * (1 if ppo else 4) * cfg.max_len
    flops_per_token = (8 + 2 * cfg.activation_checkpointing) * policy.params
    step_s = tokens * flops_per_token / (ASSUMED_TFLOPS * 1e12)
    checkpoint_gib = 12 * trained / GIB
    write_s = checkpoint_gib / world / ASSUMED_WRITE_GIB_S
    return {
        "step_tokens_per_gpu": tokens,
        "step_s": step_s,
        "checkpoint_gib": checkpoint_gib,
        "checkpoint_gib_per_gpu": checkpoint_gib / world,
        "write_s": write_s,
        "shutdown_timeout_s": max(60, 60 * math.ceil(2 * (step_s + write_s) / 60)),
    }


def export_bytes(cfg: Config) -> int:
    """Bytes per parameter of a stage's export: export_dtype, or under auto bf16 on GPUs and fp32
    on a machine without one (a dry run there plans the CPU run, unless --gpus is given)."""
    on_cpu = not torch.cuda.is_available() and not cfg.gpus
    return 4 if cfg.export_dtype == "fp32" or (cfg.export_dtype == "auto" and on_cpu) else 2


def disk_estimate(cfg: Config, policy: Shapes, annotator: Shapes) -> dict:
    """GiB on disk when the pipeline's MetaAPO stage ends, the peak of a run (finished stages keep
    no checkpoints, only their model/): the exports of the stages this run trains (reward model,
    DPO warm-up; export_bytes each), each iteration's export (fp32 but the last) and the final
    model/, and keep_checkpoints checkpoints of the policy (fp32 weights and AdamW state, 12
    bytes per parameter)."""
    export = export_bytes(cfg)
    parts = {}
    if not cfg.reward_model:
        parts["reward model export"] = export * annotator.params / GIB
    if not cfg.policy:
        parts["DPO warm-up export"] = export * policy.params / GIB
    parts["MetaAPO iteration exports and model/"] = ((cfg.iterations - 1) * 4 + 2 * export) * policy.params / GIB
    parts["checkpoints"] = cfg.keep_checkpoints * 12 * policy.params / GIB
    return parts


def plan_shapes(cfg: Config) -> tuple[Shapes, Shapes]:
    """(the policy's shapes, the annotating reward model's): the latter is the policy's architecture
    when this run trains it (the rm stage starts from the SFT model)."""
    path = sft_path(cfg) if Path(sft_path(cfg)).exists() or not cfg.init_from_config else cfg.model
    policy = model_shapes(path, "--sft_model" if cfg.sft_model else "--model")
    given = cfg.reward_model and (Path(cfg.reward_model).exists() or HUB_ID.fullmatch(cfg.reward_model))
    return policy, model_shapes(cfg.reward_model, "--reward_model") if given else policy


def needs_sharded_gradients(cfg: Config, world: int, gpu_gib: float, policy: Shapes, annotator: Shapes) -> bool:
    """grad_accumulation=auto's choice: gradients stay sharded when the unsharded ones would not
    fit beside the rest of the training phase (memory_plan; for PPO, actor and critic together)."""
    if cfg.grad_accumulation != "auto":
        return cfg.grad_accumulation == "sharded"
    unsharded = memory_plan(cfg, world, gpu_gib, policy, annotator, False)["training (phase 2)"]
    return sum(unsharded.values()) > 0.9 * gpu_gib


def sharded_gradients(cfg: Config, rt: Runtime) -> bool:
    """Whether FSDP2 reduces gradients on every micro-batch (they stay sharded) or only on the
    last: grad_accumulation sharded, unsharded, or auto (needs_sharded_gradients on GPU; on CPU
    they stay unsharded). Decided once per run (main sets rt.sharded_gradients)."""
    if cfg.grad_accumulation != "auto" or rt.device.type != "cuda" or not rt.fsdp:
        return cfg.grad_accumulation == "sharded"
    gpu_gib = torch.cuda.get_device_properties(rt.device).total_memory / GIB
    return needs_sharded_gradients(cfg, rt.world, gpu_gib, *plan_shapes(cfg))


# ==============================================================================================
# --dry_run


def count_pairs(cfg: Config) -> int | None:
    """Offline pairs a run trains on (rows of the data; the dataset card's count when it cannot be read here)."""
    source = train_source(cfg)
    count = (
        len(data.load_preferences(*source, cfg.skip_bad_rows)[0])
        if Path(source[0]).exists()
        else KNOWN_PAIRS.get(source)
    )
    return min(count, cfg.max_train_pairs) if count is not None and cfg.max_train_pairs else count


def dry_run(cfg: Config, world: int) -> None:
    """Print the plan of `cfg` on `world` GPUs of gpu_memory_gb each; refuse (ConfigError, with the
    numbers) one whose phases cannot fit."""
    gpu_gib = cfg.gpu_memory_gb or (
        torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    )
    policy, annotator = plan_shapes(cfg)
    pairs = count_pairs(cfg)
    lines = [
        f"plan for {world} GPU(s) of {gpu_gib:.0f} GiB: policy {sft_path(cfg)} ({policy.params / 1e9:.2f}B "
        f"parameters), reward model {annotator.params / 1e9:.2f}B, "
        f"{pairs if pairs is not None else 'an unknown number of'} offline pairs",
        "",
    ]
    if pairs is not None:
        rows = []
        if not cfg.reward_model:
            rows.append(("rm", math.ceil(pairs / cfg.rm_batch_size), pairs * 2 * cfg.rm_max_len))
        if not cfg.policy:
            rows.append(("dpo", math.ceil(pairs * cfg.epochs / cfg.batch_size), pairs * cfg.epochs * 2 * cfg.max_len))
        chunk = math.ceil(pairs / cfg.iterations)
        rows.append(
            (
                "metaapo, per iteration (all tuples sampled)",
                math.ceil(chunk * cfg.epochs / cfg.batch_size),
                chunk * cfg.epochs * 4 * cfg.max_len,
            )
        )
        steps = math.ceil(0.58 * chunk / cfg.batch_size)
        lines += (
            ["| stage | optimizer steps | tokens (at most) |", "|---|---|---|"]
            + [f"| {n} | {s:,} | {t:,} |" for n, s, t in rows]
            + [
                f"MetaAPO: {cfg.iterations} iterations of {chunk:,} tuples, K = {cfg.num_samples} generations per "
                f"sampled prompt (at the paper's 58% annotation, about {steps} policy steps and "
                f"{steps // cfg.meta_interval} meta updates per iteration)",
            ]
        )
        if cfg.method in ("pipeline", "metaapo") and cfg.weighting == "meta" and steps < cfg.meta_interval:
            lines.append(
                f"warning: about {steps} policy steps per iteration, fewer than --meta_interval={cfg.meta_interval}: "
                "the meta-learner gets no update and stays at its initial weights (leftover steps are dropped at "
                "each iteration's end); a smaller --batch_size or --meta_interval, or more pairs, would give it some"
            )
        lines.append("")
    sharded_gradients = needs_sharded_gradients(cfg, world, gpu_gib, policy, annotator)
    plan = memory_plan(cfg, world, gpu_gib, policy, annotator, sharded_gradients)
    too_big = []
    for phase, parts in plan.items():
        total = sum(parts.values())
        lines += [f"{phase}: {total:.1f} GiB of {gpu_gib:.0f}"] + [f"  {v:7.2f} GiB  {k}" for k, v in parts.items()]
        if total > gpu_gib:
            too_big.append(f"{phase} needs {total:.1f} GiB per GPU, more than the {gpu_gib:.0f} GiB there are")
    need, share = vllm_need_gib(cfg, policy), cfg.gpu_memory_utilization * gpu_gib
    lines.append(
        f"vLLM engine per GPU: {need:.1f} GiB needed (bf16 weights, one request's KV cache) of its {share:.1f} GiB "
        "share"
    )
    if cfg.generator == "vllm" and need > share:
        too_big.append(
            f"vLLM needs {need:.1f} GiB per GPU but gets {share:.1f} (gpu_memory_utilization "
            f"{cfg.gpu_memory_utilization})"
        )
    disk = disk_estimate(cfg, policy, annotator)
    lines.append(
        f"disk at its peak (MetaAPO's last iteration): {sum(disk.values()):.1f} GiB in {cfg.out_dir} "
        f"({'fp32' if export_bytes(cfg) == 4 else 'bf16'} exports): "
        + ", ".join(f"{v:.1f} {k}" for k, v in disk.items())
    )
    stop = stop_estimate(cfg, world, policy, annotator)
    lines.append(
        f"a stop signal in training: the step under way ({stop['step_tokens_per_gpu']:,} tokens per GPU, about "
        f"{stop['step_s']:.0f} s at {ASSUMED_TFLOPS:.0f} TFLOP/s), then a checkpoint of {stop['checkpoint_gib']:.1f} "
        f"GiB ({stop['checkpoint_gib_per_gpu']:.1f} per GPU: fp32 weights and AdamW state; about {stop['write_s']:.0f} "
        f"s at {ASSUMED_WRITE_GIB_S:.0f} GiB/s per GPU). torchrun kills its workers {TORCHRUN_GRACE_S} s after "
        f"forwarding a SIGTERM: launch with TORCH_ELASTIC_SHUTDOWN_TIMEOUT={stop['shutdown_timeout_s']} (or torchrun "
        f"--shutdown_timeout {stop['shutdown_timeout_s']}), or a stop loses the work since the last checkpoint"
    )
    print("\n".join(lines))
    if too_big:
        raise ConfigError(
            f"the plan does not fit on {world} x {gpu_gib:.0f} GiB: "
            + "; ".join(too_big)
            + ". More GPUs, --grad_accumulation=sharded, a smaller --micro_batch_size or --max_len would help."
        )
    print(f"the plan fits ({'sharded' if sharded_gradients else 'unsharded'} gradient accumulation)")
