"""
On-policy generation and online pair construction.

What it does
- `generate(prompts, ...)`: one API for both backends. Prompts are token-id lists (already
  rendered through the chat template by data.encode_prompt); each gets `n` responses as
  `Generation(token_ids, text, finish_reason)`, token_ids ending with the stop token when the
  model stopped ("stop") and cut at `max_new_tokens` otherwise ("length"). An answer stops on the
  chat template's end-of-turn token (data.end_of_turn_id) or on the generation config's and the
  tokenizer's EOS ids (`stop_token_ids`).
  - backend "transformers" (CPU, tests, GPU fallback): `model.generate` in batches with left
    padding, top_k=0 (no top-k filter; transformers' default of 50 differs from vLLM), stop ids as above,
    `synced_gpus` when the model is sharded over several ranks; the global RNG is forked and
    seeded, so a call is deterministic for a seed and leaves the training RNG untouched; the
    model's train/eval mode is restored. The checkpoint's own generation_config (e.g. Qwen's
    repetition_penalty 1.05) is set aside during the call, so only the given values and
    transformers' neutral defaults apply, as with vLLM's explicit SamplingParams. Greedy decoding
    (temperature 0) generates once per prompt and repeats the answer n times.
  - backend "vllm" (GPU; docs/gpu.md#vllm): written against vLLM 0.33.0 (its LLM, SamplingParams,
    RequestOutput / CompletionOutput as read in its source; the tests' stand-in has the same
    signatures). Every rank writes its strided share of the prompts to jsonl and runs
    `python sample.py --backend vllm ...` as a child process with CUDA_VISIBLE_DEVICES set to its
    local GPU and the torchrun variables removed. The child builds `vllm.LLM(model, dtype=bfloat16,
    tensor_parallel_size=1, enforce_eager (default off: CUDA graphs), gpu_memory_utilization, seed,
    max_model_len)`, max_model_len being the longest prompt + max_new_tokens unless set (without it
    vLLM sizes the KV cache for the model's whole context, 131k for Llama-3.1). It samples with one
    `SamplingParams(n, temperature, top_p, top_k=0 (no top-k filter), max_tokens, seed,
    stop_token_ids=[the template's end of turn])` per token-id prompt (vLLM adds the generation
    config's EOS ids itself, and ends token_ids with the stop token); seed = seed + (the prompt's
    global index) * n, so every prompt has its own random streams, whatever the number of ranks
    or chunks. That makes vLLM's samples reproducible in distribution, not bit for bit: its logits
    depend on which requests share a batch and on the CUDA-graph batch size, so a rerun (or a
    resumed phase) can draw other tokens. Greedy decoding (which vLLM refuses with n > 1)
    samples once and repeats. It appends each of 4 chunks to its jsonl output as the chunk ends
    and exits, which frees all of its GPU memory. A rerun of the same request (same weights,
    prompts, sampling, seed) keeps the finished chunks: a kill during a long generation phase
    loses at most one chunk. The ranks agree on success (a failure on any rank,
    in the worker or in the glue around it, is an error on every rank) before any result is used,
    and the results are reassembled in the original order.
- `make_online_pairs`: scores each prompt's candidates with a reward model (reward.py) and takes
  the best as chosen and the worst as rejected. Prompts whose candidates all get the same reward
  give no pair and are counted; responses cut at the length limit stay candidates, are scored
  without an end-of-turn token (as unfinished answers) and are counted. The SELM variant adds the
  offline chosen and rejected answers to the ranking pool.

Run
    python sample.py --model out/toy/sft --prompts F.jsonl --output G.jsonl --n 8
    python sample.py --backend vllm --model PATH --prompts F.jsonl --output G.jsonl --n 8 --max_new_tokens 2048
Prompt rows hold `prompt_token_ids` (a list of ints; this is how the vLLM worker is fed) or
`prompt` (a string or a message list, rendered with the model's chat template); an integer
`index` (default: the row's position) sets the vLLM backend's per-prompt seed. Output rows
repeat the input row with `responses`: [{token_ids, text, finish_reason}, ...]. The CLI is a
single process; under torchrun, train.py calls `generate`, which shards the vLLM workers.

Deliberate simplifications
- vLLM is imported only in the child process (so only there must it be installed); the training
  process never holds an engine. A colocated sleep-mode engine is not implemented.
- The transformers backend samples each batch of prompts in one `generate` call with
  num_return_sequences = n; results therefore depend on batch_size as well as on the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from data import DataError, encode_prompt, end_of_turn_id, iter_rows, load_tokenizer, write_jsonl

BACKENDS = ("transformers", "vllm")
# Variables torchrun sets for its workers; a vLLM child must not see them, or it would try to
# join the training job's process group.
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens; ends with the stop token when finish_reason == "stop"
    text: str  # decoded without special tokens
    finish_reason: str  # "stop" (a stop token) or "length" (cut at max_new_tokens)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Where an answer ends: the chat template's end-of-turn token first, then the generation
    config's EOS ids (e.g. Llama-3.1-Instruct's [128001, 128008, 128009]) and the tokenizer's EOS."""
    eos = getattr(generation_config, "eos_token_id", None)
    # prompts rendered without a template have none
    turn = [end_of_turn_id(tokenizer)] if getattr(tokenizer, "chat_template", None) else []
    ids = turn + (list(eos) if isinstance(eos, (list, tuple)) else [eos]) + [tokenizer.eos_token_id]
    if not any(i is not None for i in ids):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: no end-of-turn or EOS token to stop generation on")
    return list(dict.fromkeys(i for i in ids if i is not None))


def deterministic_top_p(top_p: float):
    """transformers' TopPLogitsWarper with its running sum over the sorted probabilities taken in
    integers (units of 2**-52): torch has no deterministic CUDA cumsum for floats and raises on one
    under use_deterministic_algorithms (--deterministic), whereas an integer sum does not depend on
    its order. It keeps the same tokens but where a cut point lies within float noise (~1e-7) of
    top_p; transformers_generate uses it under --deterministic only."""
    from transformers import TopPLogitsWarper

    class IntegerTopP(TopPLogitsWarper):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            units = (sorted_logits.softmax(dim=-1).double() * 2**52).round().long()
            remove = units.cumsum(dim=-1) <= round((1 - self.top_p) * 2**52)  # the least likely tokens
            remove[..., -self.min_tokens_to_keep :] = False
            return scores.masked_fill(remove.scatter(1, sorted_indices, remove), self.filter_value)

    return IntegerTopP(top_p)


def _finish(token_ids: list[int], eos_ids: list[int], tokenizer) -> Generation:
    """Cut a generated row at its first EOS (kept); without EOS it ran to the length limit."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            kept = token_ids[: position + 1]
            return Generation(kept, tokenizer.decode(kept[:-1], skip_special_tokens=True), "stop")
    return Generation(token_ids, tokenizer.decode(token_ids, skip_special_tokens=True), "length")


@torch.no_grad()
def transformers_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    synced_gpus: bool = False,
) -> list[list[Generation]]:
    """Sample n responses per prompt with `model.generate` (see the module docstring)."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # greedy: one answer per prompt, repeated n times (transformers refuses n > 1)
    per_call = n if temperature > 0 else 1
    # under --deterministic, top-p in integers (deterministic_top_p): torch refuses top-p's float cumsum on CUDA there
    integer_top_p = temperature > 0 and top_p < 1 and torch.are_deterministic_algorithms_enabled()
    processors = [deterministic_top_p(top_p)] if integer_top_p else []
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=1.0 if integer_top_p else top_p, top_k=0)
        if temperature > 0
        else dict(do_sample=False)
    )
    config = GenerationConfig(
        **sampling,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=per_call,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    device = model.device  # the GPU of a sharded model too (its DTensors)
    was_training = model.training
    model.eval()
    # generate() fills every field left unset in `config` from model.generation_config (the checkpoint's own
    # sampling defaults); an empty one in its place leaves only transformers' neutral defaults
    own_config, model.generation_config = model.generation_config, GenerationConfig()
    results: list[list[Generation]] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(prompts), batch_size):
                torch.manual_seed(seed + start // batch_size)
                batch = prompts[start : start + batch_size]
                width = max(len(p) for p in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, prompt in enumerate(batch):  # left padding: every prompt ends where generation starts
                    input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
                    attention_mask[row, width - len(prompt) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                    synced_gpus=synced_gpus,
                )
                rows = output[:, width:].tolist()  # (len(batch) * per_call, new tokens), grouped by prompt
                for i in range(len(batch)):
                    results.append([_finish(rows[i * per_call + j % per_call], eos_ids, tokenizer) for j in range(n)])
    finally:
        model.generation_config = own_config
        model.train(was_training)
    return results


def _distributed(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


# Variables a vLLM child must not inherit: a user's VLLM_PORT would make eight children bind one
# port; the training process's allocator settings (e.g. expandable_segments) are not vLLM's.
CHILD_DROPPED_VARIABLES = ("VLLM_PORT", "PYTORCH_CUDA_ALLOC_CONF")


def vllm_child_environment(local_rank: int) -> dict[str, str]:
    """The environment of a vLLM worker: the parent's, minus torchrun's variables and
    CHILD_DROPPED_VARIABLES, with only the rank's own GPU visible and compile caches of its own
    (vLLM's and inductor's, under a rank<local_rank> folder of the usual place), so that eight
    children starting at once never write one cache file together; later iterations reuse them."""
    dropped = TORCHRUN_VARIABLES + CHILD_DROPPED_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("TORCHELASTIC_")}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local_rank] if visible else str(local_rank)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    vllm_cache = os.environ.get("VLLM_CACHE_ROOT") or os.path.join(cache, "vllm")
    env["VLLM_CACHE_ROOT"] = os.path.join(vllm_cache, f"rank{local_rank}")
    inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(vllm_cache, "inductor")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(inductor_cache, f"rank{local_rank}")
    return env


def _weights_stamp(model_path: str) -> list:
    """What identifies the weights at a path: its weight files' names, sizes and times (a hub id by itself)."""
    files = (
        sorted(p for p in Path(model_path).glob("*") if p.suffix in (".safetensors", ".bin"))
        if Path(model_path).is_dir()
        else []
    )
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files] or [str(model_path)]


def vllm_generate(
    model_path: str,
    prompts: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    workdir: str | os.PathLike,
    gpu_memory_utilization: float = 0.5,
    chunks: int = 4,
    max_model_len: int = 0,
    enforce_eager: bool = False,
    group=None,
    python: str = "",
    should_stop=None,
) -> list[list[Generation]]:
    """Sample with one vLLM child process per rank (see the module docstring). Collective when
    distributed: every rank passes the same prompts and gets every result, gathered over `group`
    (default: the default process group; train.py passes a gloo group with a long timeout, so
    the results never travel through GPU memory and ranks that finish early can wait).

    Resumable: the worker writes its share in `chunks` pieces; a call that finds the finished
    pieces of the same request (same weights, prompts, sampling and seed) in `workdir` keeps them
    and generates only the rest. A kill loses at most one piece. `python`: the interpreter the
    child runs (default this one), e.g. a virtual environment of its own when vLLM pins another
    torch than training uses. `should_stop()`, polled while the children run: when it turns true
    they are terminated and GenerationStopped is raised on every rank (their finished chunks stay)."""
    if not prompts:  # every rank has the same prompts, so every rank returns here (vLLM is never started)
        return []
    rank, world = _distributed(group)
    workdir = Path(workdir) / f"rank{rank}"
    share = list(range(rank, len(prompts), world))
    sampling = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    # the same context on every rank: the longest prompt of all + max_new_tokens, unless given
    max_model_len = max_model_len or max(map(len, prompts)) + max_new_tokens
    engine = {"gpu_memory_utilization": gpu_memory_utilization, "chunks": chunks, "max_model_len": max_model_len}
    error, results = None, {}
    try:  # whatever fails here, every rank must still reach the collective below, or the others would hang in it
        _prepare_request(workdir, model_path, prompts, share, sampling)
        if share:
            error, results = _run_worker(
                workdir, model_path, sampling, engine, enforce_eager, share, rank, python, should_stop
            )
    except Exception as err:
        error, results = f"rank {rank}: {type(err).__name__}: {err}", {}
    gathered = [(error, results)]
    if world > 1:  # agree on success before any rank uses a result
        gathered = [None] * world
        dist.all_gather_object(gathered, (error, results), group=group)
    errors = [e for e, _ in gathered if e]
    if STOPPED in errors:
        raise GenerationStopped(f"the vLLM workers were stopped; their finished chunks are kept in {workdir.parent}")
    if errors:
        raise RuntimeError("vLLM generation failed; no result is used.\n" + "\n".join(errors))
    merged = {index: generations for _, part in gathered for index, generations in part.items()}
    return [merged[i] for i in range(len(prompts))]


def _prepare_request(
    workdir: Path, model_path: str, prompts: list[list[int]], share: list[int], sampling: dict
) -> None:
    """This rank's prompts file; a workdir that holds another request's pieces is started afresh."""
    request = {"model": str(model_path), "weights": _weights_stamp(str(model_path)), **sampling}
    key = hashlib.sha1(json.dumps({**request, "prompts": [[i, prompts[i]] for i in share]}).encode()).hexdigest()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / "request.sha1"
    if not stamp.exists() or stamp.read_text() != key:
        (workdir / "generations.jsonl").unlink(missing_ok=True)
        # the index sets the prompt's seed
        write_jsonl(workdir / "prompts.jsonl", [{"index": i, "prompt_token_ids": prompts[i]} for i in share])
        stamp.write_text(key)


class GenerationStopped(Exception):
    """A stop was asked for (should_stop) while the vLLM workers ran: they were terminated, and the
    chunks they had finished are kept for the next call of the same request."""


STOPPED = "stopped"  # _run_worker's outcome when should_stop() ended the worker


def _run_worker(
    workdir: Path,
    model_path: str,
    sampling: dict,
    engine: dict,
    enforce_eager: bool,
    share: list[int],
    rank: int,
    python: str = "",
    should_stop=None,
) -> tuple[str | None, dict]:
    """Run this rank's vLLM worker (this file with --backend vllm) on its prompts file; returns
    (error or None, {prompt index: its generations}), error STOPPED when should_stop() turned true
    while it ran (checked twice a second): the worker is then sent SIGTERM (and killed if it has
    not exited 30 s later)."""
    output_path, log_path = workdir / "generations.jsonl", workdir / "worker.log"
    flags = {
        "backend": "vllm",
        "model": model_path,
        "prompts": workdir / "prompts.jsonl",
        "output": output_path,
        **sampling,
        **engine,
    }
    command = [python or sys.executable, str(Path(__file__).resolve())] + [
        s for k, v in flags.items() for s in (f"--{k}", str(v))
    ]
    command += ["--enforce_eager"] * enforce_eager
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    with open(log_path, "a") as log:
        child = subprocess.Popen(command, env=vllm_child_environment(local_rank), stdout=log, stderr=subprocess.STDOUT)
        while child.poll() is None:
            try:
                child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if should_stop is not None and should_stop():
                    child.terminate()
                    try:
                        child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
        returncode = child.returncode
    if returncode != 0 and should_stop is not None and should_stop():  # ended by us, or by the same signal
        return STOPPED, {}
    if returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        return f"rank {rank}: the vLLM worker exited with status {returncode}; the end of {log_path}:\n{tail}", {}
    results = {}
    for _, row in iter_rows(output_path):
        if isinstance(row, DataError):
            raise row
        results[row["index"]] = [Generation(r["token_ids"], r["text"], r["finish_reason"]) for r in row["responses"]]
    missing = sorted(set(share) - set(results))
    if missing or any(len(results[i]) != sampling["n"] for i in share):
        return f"rank {rank}: the vLLM worker's output {output_path} is incomplete ({len(missing)} prompts missing)", {}
    return None, results


def generate(
    prompts: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    backend: str = "transformers",
    model=None,
    tokenizer=None,
    model_path: str | None = None,
    batch_size: int = 64,
    synced_gpus: bool = False,
    workdir: str | os.PathLike = "out/vllm",
    gpu_memory_utilization: float = 0.5,
    max_model_len: int = 0,
    enforce_eager: bool = False,
    group=None,
    vllm_python: str = "",
    should_stop=None,
) -> list[list[Generation]]:
    """n responses for each token-id prompt, in the prompts' order.

    transformers needs `model` and `tokenizer`; vllm needs `model_path`, an HF checkpoint
    directory of the current policy (train.py exports one before each generation phase).
    """
    if backend == "transformers":
        if model is None or tokenizer is None:
            raise ValueError("the transformers backend needs the model and its tokenizer")
        return transformers_generate(
            model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, seed, batch_size, synced_gpus
        )
    if backend == "vllm":
        if model_path is None:
            raise ValueError("the vllm backend needs model_path, an exported HF checkpoint of the policy")
        return vllm_generate(
            model_path,
            prompts,
            n,
            temperature,
            top_p,
            max_new_tokens,
            seed,
            workdir,
            gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            group=group,
            python=vllm_python,
            should_stop=should_stop,
        )
    raise ValueError(f"generator backend must be one of {BACKENDS}, got {backend!r}")


# ----------------------------------------------------------------------------------------------
# Online pairs


@dataclass
class Candidate:
    text: str
    token_ids: list[int]
    source: str  # "online" (a generation) or "offline" (the dataset's answer, SELM's pool)
    truncated: bool = False  # cut at the length limit


@dataclass
class OnlinePair:
    chosen: Candidate
    rejected: Candidate
    chosen_reward: float
    rejected_reward: float


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    all_equal: int = 0  # every candidate got the same reward: no pair
    truncated_candidates: int = 0  # candidates cut at the length limit (kept in the pool)
    offline_chosen: int = 0  # SELM: pairs whose chosen answer came from the dataset
    offline_rejected: int = 0
    rewards: list[float] = field(default_factory=list)  # every online candidate's reward

    @staticmethod
    def combined(parts: list[PairStats]) -> PairStats:
        """The counts of several make_online_pairs calls (pieces of one set of prompts) added up."""
        total = PairStats()
        for part in parts:
            for name in (f.name for f in fields(PairStats)):  # counts add, the rewards' lists join
                setattr(total, name, getattr(total, name) + getattr(part, name))
        return total


def best_and_worst(pool: list[Candidate], rewards: list[float]) -> OnlinePair | None:
    """The highest- and lowest-rewarded candidates (first ones on ties); None when all tie."""
    best = max(range(len(pool)), key=lambda i: rewards[i])
    worst = min(range(len(pool)), key=lambda i: rewards[i])
    if rewards[best] == rewards[worst]:
        return None
    return OnlinePair(pool[best], pool[worst], rewards[best], rewards[worst])


def make_online_pairs(
    prompts: list[list[dict]],
    generations: list[list[Generation]],
    reward_model,
    offline: list[tuple[tuple[str, list[int]], tuple[str, list[int]]]] | None = None,
) -> tuple[list[OnlinePair | None], PairStats]:
    """Score every candidate of every prompt with `reward_model` (anything with
    `score(prompts, responses)`) and pair the best with the worst.

    `offline`, for SELM: per prompt ((chosen text, chosen ids), (rejected text, rejected ids)) of
    the dataset, added to the pool. Returns one OnlinePair or None per prompt, and the counts.
    """
    pools: list[list[Candidate]] = []
    for i, candidates in enumerate(generations):
        pool = [Candidate(g.text, g.token_ids, "online", g.finish_reason == "length") for g in candidates]
        if offline is not None:
            (chosen_text, chosen_ids), (rejected_text, rejected_ids) = offline[i]
            pool += [Candidate(chosen_text, chosen_ids, "offline"), Candidate(rejected_text, rejected_ids, "offline")]
        pools.append(pool)
    flat_prompts = [prompts[i] for i, pool in enumerate(pools) for _ in pool]
    flat_texts = [candidate.text for pool in pools for candidate in pool]
    # a candidate cut at max_new_tokens is scored without an end of turn, as the unfinished answer it is
    flat_rewards = reward_model.score(
        flat_prompts, flat_texts, [not candidate.truncated for pool in pools for candidate in pool]
    )
    pairs, stats, offset = [], PairStats(prompts=len(pools)), 0
    for pool in pools:
        rewards = flat_rewards[offset : offset + len(pool)]
        offset += len(pool)
        stats.truncated_candidates += sum(c.truncated for c in pool)
        stats.rewards += [r for c, r in zip(pool, rewards) if c.source == "online"]
        pair = best_and_worst(pool, rewards)
        if pair is None:
            stats.all_equal += 1
        else:
            stats.pairs += 1
            stats.offline_chosen += pair.chosen.source == "offline"
            stats.offline_rejected += pair.rejected.source == "offline"
        pairs.append(pair)
    return pairs, stats


# ----------------------------------------------------------------------------------------------
# CLI, also the vLLM worker


def _finished_rows(path: Path) -> list[dict]:
    """The complete rows of a worker's output; a row cut by a kill is dropped and the file rewritten without it."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    write_jsonl(path, rows)
    return rows


def _vllm_worker(args, rows: list[dict], prompts: list[list[int]], indices: list[int]) -> None:
    """Runs in the child process: one engine, then the prompts not yet in args.output in
    args.chunks generate calls, each appended to args.output (and flushed to disk) as it ends.
    Prompt `indices[i]` samples with seed args.seed + indices[i] * n (vLLM seeds the n samples of
    a request seed, seed + 1, ...), so no two prompts share a random stream, whatever the chunks
    (the samples still depend on the batch composition through vLLM's numerics: see the module
    docstring)."""
    done = {row["index"] for row in _finished_rows(Path(args.output))}
    todo = [i for i, index in enumerate(indices) if index not in done]
    if not todo:
        return
    try:
        import vllm
    except ImportError:
        raise SystemExit(
            "the vllm backend needs vLLM installed (pip install vllm); it is an optional GPU extra"
        ) from None
    # a SIGTERM (the trainer stopping, or a scheduler) unwinds Python, so vLLM's own shutdown runs and
    # takes its engine process with it; what was appended to args.output stays
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tokenizer = load_tokenizer(args.model)
    # bf16 whatever the checkpoint's dtype (train.py writes the intermediate iterations' exports in fp32); max_model_len
    # bounds the KV cache to what the prompts need (Llama-3.1's own 131k would ask for ~16 GiB at 0.5 utilisation)
    llm = vllm.LLM(
        model=args.model,
        dtype="bfloat16",
        tensor_parallel_size=1,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        max_model_len=args.max_model_len,
    )
    per_call = args.n if args.temperature > 0 else 1  # vLLM refuses greedy with n > 1: one answer, repeated
    size = -(-len(todo) // max(1, args.chunks))
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        # top_k=0: no top-k filter; the end-of-turn token stops like the EOS ids vLLM takes from the generation config
        params = [
            vllm.SamplingParams(
                n=per_call,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_tokens=args.max_new_tokens,
                seed=args.seed + indices[i] * args.n,
                stop_token_ids=[end_of_turn_id(tokenizer)],
            )
            for i in chunk
        ]
        outputs = llm.generate([{"prompt_token_ids": prompts[i]} for i in chunk], params, use_tqdm=False)
        with open(args.output, "a") as f:
            for i, output in zip(chunk, outputs):
                responses = []
                for completion in [output.outputs[j % per_call] for j in range(args.n)]:
                    token_ids = list(completion.token_ids)
                    finish = "stop" if completion.finish_reason == "stop" else "length"
                    # the stopping token (EOS, or a model's extra stop token) closes the response, as in training
                    stop_token = (
                        completion.stop_reason if isinstance(completion.stop_reason, int) else tokenizer.eos_token_id
                    )
                    if finish == "stop" and (not token_ids or token_ids[-1] != stop_token):
                        token_ids.append(stop_token)
                    responses.append({"token_ids": token_ids, "text": completion.text, "finish_reason": finish})
                f.write(json.dumps({**rows[i], "responses": responses}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read_prompt_rows(path: str, tokenizer_source: str) -> tuple[list[dict], list[list[int]]]:
    rows, prompts, tokenizer = [], [], None
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        if (
            isinstance(row, dict)
            and isinstance(row.get("prompt_token_ids"), list)
            and all(isinstance(t, int) for t in row["prompt_token_ids"])
        ):
            ids = row["prompt_token_ids"]
        elif isinstance(row, dict) and isinstance(row.get("prompt"), (str, list)):
            if tokenizer is None:
                tokenizer = load_tokenizer(tokenizer_source)
            messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
            ids = encode_prompt(tokenizer, messages)
        else:
            raise DataError(
                f"{where}: a prompt row needs 'prompt_token_ids' (a list of ints) or 'prompt' (a string or messages)"
            )
        if not ids:
            raise DataError(f"{where}: empty prompt")
        rows.append(row)
        prompts.append(ids)
    return rows, prompts


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Generate n responses per prompt of a jsonl file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory or hub id of the policy")
    parser.add_argument("--prompts", required=True, help="jsonl/json rows with 'prompt_token_ids' or 'prompt'")
    parser.add_argument("--output", required=True, help="jsonl written with 'responses' added to each row")
    parser.add_argument("--backend", choices=BACKENDS, default="transformers")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per generate call (transformers backend)")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.5, help="vLLM's share of the GPU memory")
    parser.add_argument(
        "--chunks", type=int, default=4, help="vllm: pieces written to --output as they finish; a rerun keeps them"
    )
    parser.add_argument(
        "--max_model_len",
        type=int,
        default=0,
        help="vllm: the engine's context; 0 = the longest prompt + --max_new_tokens",
    )
    parser.add_argument(
        "--enforce_eager", action="store_true", help="vllm: no CUDA graphs (starts faster, decodes slower)"
    )
    args = parser.parse_args()

    rows, prompts = _read_prompt_rows(args.prompts, args.model)
    args.max_model_len = args.max_model_len or max(map(len, prompts), default=0) + args.max_new_tokens
    if args.backend == "vllm":
        indices = [row["index"] if isinstance(row.get("index"), int) else position for position, row in enumerate(rows)]
        rows = [{**row, "index": index} for row, index in zip(rows, indices)]
        _vllm_worker(args, rows, prompts, indices)
    else:
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=torch.bfloat16 if device == "cuda" else torch.float32
        ).to(device)
        generations = transformers_generate(
            model,
            load_tokenizer(args.model),
            prompts,
            args.n,
            args.temperature,
            args.top_p,
            args.max_new_tokens,
            args.seed,
            args.batch_size,
        )
        responses = [
            [{"token_ids": g.token_ids, "text": g.text, "finish_reason": g.finish_reason} for g in per_prompt]
            for per_prompt in generations
        ]
        write_jsonl(args.output, [{**row, "responses": r} for row, r in zip(rows, responses)])
    print(f"generated {args.n} responses for each of {len(rows)} prompts with {args.backend} -> {args.output}")


if __name__ == "__main__":
    main()
