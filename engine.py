"""
The distributed engine every stage runs on: ranks and collectives (torchrun's process group, or a
group of one for a lone GPU process), stop signals and phase-1 work kept in pieces, FSDP2
sharding with each rank reading only its shard of a checkpoint, the HF export, the optimisation
step (micro-batches, gradient sync, clipping, AdamW and its schedule) and generation on every
rank.

Run
    torchrun --nproc_per_node 8 train.py ...   # every stage of train.py runs on this engine
    python train.py ...                        # one process: unsharded on CPU, a group of one on a GPU
It is imported, not run; tests/test_distributed.py shows it at work on 1 and 2 gloo processes.

Deliberate simplifications
- One 1-D mesh over every GPU of every node (no HSDP); bf16 compute over fp32 master weights.
- A checkpoint is read shard by shard only from safetensors files holding every parameter (or
  every one but the rm stage's new score head); anything else (.bin files, a checkpoint lacking
  other parameters) is loaded whole on each rank's CPU first, then sharded block by block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import losses
from config import HUB_ID, Config
from reward import RewardModel, require_reward_head
from sample import GenerationStopped, generate

# ==============================================================================================
# Ranks and collectives


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # a process group exists
    fsdp: bool = False  # models are sharded with fully_shard
    objects: object = None  # the group pickled objects travel over: gloo beside NCCL (None: the default group)
    sharded_gradients: bool = False  # FSDP2 reduces gradients on every micro-batch (plan.sharded_gradients)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Runtime:
    """The device and, whenever models are sharded, a process group: torchrun's (NCCL on CUDA, gloo
    on CPU), or on a GPU without torchrun a group of this one process, so that `python train.py`
    on one GPU runs the same FSDP2 path as a torchrun job. On CPU without torchrun: none."""
    rt = Runtime()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in a single process is intended
    if cfg.deterministic:
        # cuBLAS refuses deterministic matmuls without a fixed workspace; it reads this at its first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if torchrun:
        rt.rank, rt.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rt.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        rt.device = torch.device("cuda", rt.local_rank)
        torch.cuda.set_device(rt.device)
    rt.fsdp = rt.device.type == "cuda" or rt.world > 1
    if torchrun or rt.fsdp:
        start_process_group(rt, cfg.dist_timeout_minutes)
    return rt


def start_process_group(rt: Runtime, timeout_minutes: float) -> None:
    """torchrun's process group (its environment variables), or one of this process alone. Every
    collective waits up to timeout_minutes for the slowest rank (NCCL's own default is 10 minutes,
    shorter than a generation phase on a slow rank). On CUDA the group is bound to this rank's GPU
    (NCCL starts now, so a broken node fails at start-up), and pickled objects (generations,
    scores) travel over a gloo group beside it rather than through GPU memory."""
    from datetime import timedelta

    timeout = timedelta(minutes=timeout_minutes)
    cuda = rt.device.type == "cuda"
    backend, device_id = ("nccl", rt.device) if cuda else ("gloo", None)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
        )
    rt.distributed = True
    rt.objects = dist.new_group(backend="gloo", timeout=timeout) if cuda else None


def print0(rt: Runtime, *args) -> None:
    if rt.main:
        print(*args, flush=True)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def all_reduce_sum(rt: Runtime, values: torch.Tensor) -> torch.Tensor:
    if rt.distributed:
        values = values.to(rt.device)
        dist.all_reduce(values)
    return values


def all_reduce_max(rt: Runtime, values: torch.Tensor) -> torch.Tensor:
    if rt.distributed:
        values = values.to(rt.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_objects(rt: Runtime, obj) -> list:
    if not rt.distributed:
        return [obj]
    gathered = [None] * rt.world
    dist.all_gather_object(gathered, obj, group=rt.objects)
    return gathered


# ==============================================================================================
# Stopping on SIGTERM / SIGINT, and phase-1 work kept in pieces


class Stopped(Exception):
    """A signal asked the run to stop; the message says where and what was saved."""


STOP_SIGNAL: list[int] = []  # the signal that asked for a stop, once one came


def request_stop(signum, frame) -> None:
    """Signal handler: the first signal asks for a stop at the next safe point; a second one exits at once."""
    if STOP_SIGNAL:
        os._exit(128 + signum)
    STOP_SIGNAL.append(signum)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"\ntrain.py: {signal.Signals(signum).name}: stopping after the current step or piece of work, keeping "
            "what is done (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )


def check_stop(rt: Runtime, where: str) -> None:
    """Collective: raise Stopped when any rank got a stop signal. `where` says what a resume redoes."""
    if all_reduce_sum(rt, torch.tensor([float(bool(STOP_SIGNAL))])).item() > 0:
        raise Stopped(where)


def stop_exit(message: str, program: str = "train.py") -> None:
    """The one-line end of a run stopped by a signal, named by its program: exit status 128 + the
    signal, as shells report it."""
    print(f"{program}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(128 + STOP_SIGNAL[0])


PIECE = 256  # tuples (or prompts) per piece of phase-1 work: l_off scores, rewards


class Pieces:
    """Phase-1 work kept as it finishes, so that a stop signal costs seconds, not the phase: the
    work is cut into pieces (the l_off scores of PIECE tuples, one round of generate calls, the
    rewards of PIECE prompts' answers); each piece's result, once every rank has it, is written by
    rank 0 to <directory>/<name>-<k>.pt (atomically), and every rank checks for a stop signal
    before each piece. A rerun of the same phase (--resume) reads the finished pieces back and
    computes the rest: the phase is deterministic given its inputs (the iteration's policy and
    reference as exported, the seeds), so the result is the uninterrupted one. directory=None keeps
    nothing but still stops between pieces (evaluation)."""

    def __init__(self, directory: Path | None, rt: Runtime, where: str):
        self.directory, self.rt, self.where = directory, rt, where
        barrier(rt)  # pieces a previous run finished, the same list on every rank
        self.done = {p.stem for p in directory.glob("*.pt")} if directory and directory.exists() else set()
        barrier(rt)  # every rank has read it before any changes the directory (PPO removes pieces at once)
        self.restored_s = 0.0  # the seconds the pieces read back took when they were computed

    def run(self, name: str, count: int, compute) -> list:
        """[compute(k) for k in range(count)], compute(k) being a collective that gives every rank
        the same result; finished pieces are read back instead of computed."""
        results = []
        for k in range(count):
            key = f"{name}-{k:05d}"
            if key in self.done:
                results.append(torch.load(self.directory / f"{key}.pt", map_location="cpu", weights_only=False))
                seconds = self.directory / f"{key}.seconds"
                self.restored_s += float(seconds.read_text()) if seconds.exists() else 0.0
                continue
            kept = f" ({name}: {k} of {count} pieces kept)" if self.directory else ""
            check_stop(self.rt, f"{self.where}{kept}")
            tic = time.time()
            results.append(compute(k))
            if self.directory is not None and self.rt.main:
                self.directory.mkdir(parents=True, exist_ok=True)
                (self.directory / f"{key}.seconds").write_text(f"{time.time() - tic:.3f}")  # before the piece
                torch.save(results[-1], self.directory / f"{key}.tmp")
                os.replace(self.directory / f"{key}.tmp", self.directory / f"{key}.pt")
        return results

    def remove(self) -> None:
        """Once the phase's result is in a checkpoint, its pieces are not needed any more."""
        if self.directory is not None and self.rt.main:
            shutil.rmtree(self.directory, ignore_errors=True)
        barrier(self.rt)


# ==============================================================================================
# Models: loading, FSDP2 sharding, HF export

MASTER_DTYPE = torch.float32  # weights and optimizer state; bf16 compute comes from FSDP's mixed precision on GPU


def _decoder_blocks(lm) -> list:
    names = set(getattr(lm, "_no_split_modules", None) or [])
    return [m for m in lm.modules() if type(m).__name__ in names]


def shard_model(root: torch.nn.Module, lm, cfg: Config, rt: Runtime, trainable: bool) -> torch.nn.Module:
    """Activation checkpointing per decoder block, fully_shard per block, then the root.

    bf16 parameters and fp32 gradient reductions on GPU, fp32 on CPU. `root` is the module whose
    forward runs the whole model (the LogprobModel wrapper or a reward model), so the head's
    gathered weight is what the fused kernel sees. fully_shard moves each block to the GPU as it
    shards it, so the whole model is never there unsharded (its freed blocks would stay cached in
    the allocator). A frozen model's root reshards after each forward: with no backward to come,
    keeping its gathered embeddings and head (2 GiB at 8B) would only hold memory.
    """
    if trainable and cfg.activation_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        root.requires_grad_(False)
    if not rt.fsdp:
        return root.to(rt.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    policy = mixed_precision(rt)
    for block in _decoder_blocks(lm):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=None if trainable else True)
    return root


def mixed_precision(rt: Runtime):
    """FSDP2's precision: on GPU, bf16 parameters in compute over the fp32 master weights and fp32
    gradient reductions; on CPU fp32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if rt.device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def reshard(model: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after a forward without gradients (the root's own:
    embeddings, final norm, head): every FSDP module back to its shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def weights_dtype(rt: Runtime, trainable: bool) -> torch.dtype:
    """fp32 master weights for a model that trains; a frozen one (reference, reward model) is held
    in bf16 on GPU, which is what it computes in anyway, so it needs no fp32 copy."""
    return MASTER_DTYPE if trainable or rt.device.type != "cuda" else torch.bfloat16


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, and initialisers do
    nothing) and their buffers real: RoPE's inv_freq and the like are computed at construction
    and are not in checkpoints. What accelerate's init_empty_weights(include_buffers=False) does."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(path: str) -> list[Path]:
    """The safetensors files of a model directory or of a hub id's cached snapshot ([] without them)."""
    directory = Path(path)
    if not directory.is_dir():
        if not HUB_ID.fullmatch(path):
            return []
        from huggingface_hub import snapshot_download

        try:  # from_pretrained fetches the same files; a failure here leaves the error to it
            directory = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
        except Exception:
            return []
    return sorted(directory.glob("*.safetensors"))


def load_pretrained(auto_class, path: str, rt: Runtime, dtype: torch.dtype, seed: int | None = None, **config):
    """(model, checkpoint files, missing keys) of `auto_class` from `path`. Under FSDP2, when the
    safetensors checkpoint holds every parameter, or every one but a new head that this load
    initialises (`seed` given: the rm stage's score head on the SFT model), the model is built with
    its parameters on the meta device and `files` are the checkpoint: load_shards fills in each
    rank's shard after sharding, reading only the rows it holds, so no rank ever holds the whole
    model. Otherwise (one process on CPU, other formats) from_pretrained loads it whole on CPU,
    `seed` seeding what it initialises; files = []. Either way the missing keys are returned, and
    init_new_parameters gives them the same values on any number of ranks."""
    from transformers import AutoConfig

    files = checkpoint_files(path) if rt.fsdp else []
    if files:
        from safetensors import safe_open

        with parameters_on_meta():
            model = auto_class.from_config(AutoConfig.from_pretrained(path, **config), dtype=dtype)
        stored = {key for file in files for key in safe_open(file, framework="pt").keys()}
        missing = [name for name, _ in model.named_parameters() if name not in stored]
        head = [name for name in missing if not name.startswith(model.base_model_prefix + ".")]
        if not missing or (seed is not None and missing == head):
            try:
                from transformers import GenerationConfig

                model.generation_config = GenerationConfig.from_pretrained(path)  # its stop ids, as from_pretrained
            except OSError:
                pass  # no generation_config.json: the one from_config derived from the config stays
            return model, files, missing
        del model
    if seed is not None:
        torch.manual_seed(seed)
    model, info = auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **config)
    return model, [], info["missing_keys"]


def shard_rows(param: torch.Tensor, rt: Runtime) -> tuple[torch.Tensor, int]:
    """(this rank's part of a parameter, the first row of the whole it holds). FSDP2 shards dim 0
    in chunks of ceil(rows / world), rank r holding chunk r (a rank past the rows holds none)."""
    local = param.to_local() if hasattr(param, "to_local") else param  # this rank's rows, unpadded
    return local, rt.rank * math.ceil(param.shape[0] / rt.world) if param.dim() else 0


@torch.no_grad()
def init_new_parameters(root: nn.Module, names: list[str], seed: int, std: float, rt: Runtime) -> None:
    """Parameters a checkpoint lacks (the rm stage's new score head), the same values on any number
    of ranks: drawn whole, in order, from one generator seeded with `seed` (normal(0, std) for a
    matrix, zeros for a vector: transformers' initialisation of a new Linear, and its values when
    from_pretrained initialises the head after torch.manual_seed(seed)); each rank keeps its rows."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(root.named_parameters())
    for name in names:
        param = params[name]
        whole = torch.zeros(param.shape)
        if param.dim() > 1:
            whole.normal_(0.0, std, generator=generator)
        local, start = shard_rows(param, rt)
        local.copy_(whole[start : start + local.shape[0]] if param.dim() else whole)


@torch.no_grad()
def load_shards(root: nn.Module, prefix: str, files: list[Path], rt: Runtime, new: tuple[str, ...] = ()) -> None:
    """Fill a model sharded with its parameters on the meta device (load_pretrained) from its
    safetensors files: each rank reads only its rows of each tensor (shard_rows; safetensors slices
    are read from the file). `prefix`: the wrapper's name for the HF model (e.g. "lm." in
    LogprobModel); `new`: parameters the files lack, left for init_new_parameters."""
    from safetensors import safe_open

    buffers = {name: buffer.clone() for name, buffer in root.named_buffers()}  # real already: keep them
    root.to_empty(device=rt.device)
    for name, buffer in root.named_buffers():
        buffer.copy_(buffers[name])
    handles = [safe_open(file, framework="pt") for file in files]
    where = {key: handle for handle in handles for key in handle.keys()}
    for name, param in root.named_parameters():
        key = name[len(prefix) :]
        if key in new:
            continue
        local, start = shard_rows(param, rt)
        if local.numel():
            rows = (
                where[key].get_slice(key)[start : start + local.shape[0]] if param.dim() else where[key].get_tensor(key)
            )
            local.copy_(rows.to(local.dtype))


def load_causal_lm(path: str, cfg: Config, rt: Runtime, from_config: bool = False, trainable: bool = True):
    """(HF causal LM, tokenizer, checkpoint files load_shards must read after sharding: see load_pretrained)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = data.load_tokenizer(path)
    if from_config:
        torch.manual_seed(cfg.seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=weights_dtype(rt, trainable))
        files = []
    else:
        lm, files, _ = load_pretrained(AutoModelForCausalLM, path, rt, weights_dtype(rt, trainable))
    lm.config.use_cache = False
    return lm, tokenizer, files


def load_logprob_model(path: str, cfg: Config, rt: Runtime, trainable: bool, from_config: bool = False):
    """(LogprobModel sharded as the FSDP root, tokenizer)."""
    lm, tokenizer, files = load_causal_lm(path, cfg, rt, from_config, trainable)
    model = losses.LogprobModel(lm, cfg.chunk_size or None)
    model = shard_model(model, lm, cfg, rt, trainable)
    if files:
        load_shards(model, "lm.", files, rt)
    if rt.fsdp:  # FSDP2 sets up its root at the first forward: run one now (2 tokens), or a generate() that calls
        with torch.no_grad():  # the blocks without the root first would make a block a root of its own
            ids = torch.zeros(1, 2, dtype=torch.long, device=rt.device)
            model(ids, torch.ones_like(ids), torch.tensor([[False, True]], device=rt.device))
    model.train(trainable)
    return model, tokenizer


def load_reward_model(path: str, cfg: Config, rt: Runtime, trainable: bool = False, init_head: bool = False):
    """A sequence-classification model (num_labels = 1), sharded, wrapped as reward.RewardModel.
    init_head: the rm stage's start, the SFT model with a new score head (seeded)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = data.load_tokenizer(path)
    model, files, missing = load_pretrained(
        AutoModelForSequenceClassification,
        path,
        rt,
        weights_dtype(rt, trainable),
        seed=cfg.seed if init_head else None,
        num_labels=1,
    )
    if not init_head:  # the annotator must have a trained score head, not a random one
        require_reward_head(path, model, {"missing_keys": missing})
    model = shard_model(model, model, cfg, rt, trainable)
    if files:
        load_shards(model, "", files, rt, new=tuple(missing))
    if init_head:  # the new head's values do not depend on how the model was loaded nor on the ranks
        init_new_parameters(model, missing, cfg.seed, model.config.initializer_range, rt)
    model.train(trainable)
    return RewardModel(
        model, tokenizer, max_len=cfg.rm_max_len, batch_size=max(1, cfg.micro_batch_size) * 4, group=rt.objects
    )


def copy_tree(source: Path, target: Path) -> None:
    """Copy a model directory atomically (a temporary copy renamed into place). Only for a stage's
    own unfinished output: a finished stage is never entered again."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def release_memory(*models: nn.Module) -> None:
    """Give back the memory of models the caller has just deleted (`del model` first: a model
    still referenced anywhere stays in memory) and the gathered weights of `models` (reshard),
    then the allocator's cache to the GPU."""
    for model in models:
        if model is not None:  # evaluate.py's vLLM generator loads no policy
            reshard(model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def full_state_dict(model: torch.nn.Module, rt: Runtime) -> dict:
    """The whole model's state on CPU on every rank (collective under FSDP)."""
    if not rt.fsdp:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(
    model: torch.nn.Module,
    hf_model,
    tokenizer,
    path: Path,
    cfg: Config,
    rt: Runtime,
    prefix: str = "",
    dtype: torch.dtype | None = None,
) -> None:
    """An HF safetensors checkpoint + tokenizer at `path`, loadable by from_pretrained and vLLM,
    written atomically (a temporary directory renamed into place), in `dtype` or else export_dtype's."""
    state = full_state_dict(model, rt)
    if rt.main:
        if dtype is None:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
                cfg.export_dtype, torch.bfloat16 if rt.device.type == "cuda" else torch.float32
            )
        state = {k[len(prefix) :]: v.to(dtype) for k, v in state.items() if k.startswith(prefix)}
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier(rt)


# ==============================================================================================
# The optimisation loop every stage shares


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


def trainable_parameters(model: nn.Module) -> list:
    """The parameters an optimizer must hold: under FSDP2 the shards. A root's forward without
    gradients leaves its own parameters (embeddings, final norm, head) unsharded and registers the
    unsharded tensors on the module until the next backward; an optimizer built then would hold
    tensors that never get a gradient, so every FSDP module is resharded first."""
    reshard(model)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, lr: float, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the shards (trainable_parameters), created after sharding."""
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, total_steps: int, cfg: Config):
    """Linear warm-up over warmup_ratio of the steps, then cosine down to lr_floor * lr."""
    warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shuffled(items: list, seed: int) -> list:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


@dataclass
class Progress:
    """Where a stage's optimisation is: restored from checkpoints, advanced by each optimizer step."""

    step: int = 0  # optimizer steps of this stage so far
    batch: int = 0  # global batches done in the current pass


def saved_progress(saved: dict) -> Progress:
    """The Progress a checkpoint recorded (old key accepted: "loop")."""
    return Progress(**(saved["progress"] if "progress" in saved else saved["loop"]))


def progress_state(progress: Progress):
    """The checkpoint_extras of a stage whose checkpoints need only its Progress beside model and optimizer."""
    return lambda: {"progress": dataclasses.asdict(progress)}


def normalise_metrics(sums: dict) -> dict:
    """Metric sums -> means: `x_sum` / `x_count` becomes `x`; `loss` is already normalised."""
    out = {"loss": sums.get("loss", 0.0)}
    for key, value in sums.items():
        if key.endswith("_sum"):
            name = key[:-4]
            count = sums.get(name + "_count", 0.0)
            out[name] = value / count if count else float("nan")
    return out


def global_batches(items: list, batch_size: int) -> list[list]:
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def epoch_batches(items: list, epochs: int, batch_size: int, seed: int) -> list[list]:
    """Global batches of `epochs` passes over `items`, pass e shuffled with seed + e."""
    return [b for epoch in range(epochs) for b in global_batches(shuffled(items, seed + epoch), batch_size)]


class TrainingPass:
    """One optimisation pass over global batches (identical on every rank), from progress.batch:
    what a training loop needs besides its algorithm, so that the loop itself can be written out
    where the algorithm is (train.py's phase 2, `optimize` for the other stages):

        training = TrainingPass(stage, model, optimizer, scheduler, batches, progress, desc, ...)
        for batch in training:                               # the batches left
            record, outputs = training.step(batch, loss_fn)  # micro-batches, gradient sync, clip, AdamW
            ...                                              # what the algorithm does after a step
            training.end_step(record)                        # logged; a checkpoint at the cadence; a stop

    loss_fn(items, mask, batch_size, world) returns (loss to backward, dict of metric sums) and,
    optionally, a third value per micro-batch that step() hands back in `outputs` (MetaAPO: the
    step's detached scores); see accumulate_gradients. A checkpoint (checkpoint_extras() with model and
    optimizer) is written every save_every steps of the pass, or by default by time: after the
    first step, then once CHECKPOINT_SHARE of the time since the last would have gone into writing
    it (at 8B a checkpoint is 90 GiB; at the toy's size a few milliseconds); `save_period`: every
    that many steps of the stage instead, for stages made of many short passes. Also once
    save_minutes have passed since the last, and after the step during which a stop signal came
    (then Stopped is raised). None is written at a pass's last step but on a stop: what follows
    (an export, a checkpoint between phases) keeps its result."""

    def __init__(
        self,
        stage,
        model,
        optimizer,
        scheduler,
        batches: list[list],
        progress: Progress,
        desc: str,
        *,
        checkpoint_extras=None,
        log_extra: dict | None = None,
        save_period: int = 0,
    ):
        self.stage, self.model, self.optimizer, self.scheduler = stage, model, optimizer, scheduler
        self.batches, self.progress, self.desc = batches, progress, desc
        self.checkpoint_extras, self.log_extra, self.save_period = checkpoint_extras, log_extra or {}, save_period
        self.every = stage.cfg.save_every  # 0: by time (reduce_metrics' save_due)
        self.records: list[dict] = []  # one per step taken in this pass
        self.stop = self.save_due = False
        self.bar = tqdm(
            total=len(batches),
            initial=progress.batch,
            desc=f"[{stage.name}] {desc}",
            disable=not stage.rt.main,
            leave=False,
            dynamic_ncols=True,
        )

    def __iter__(self):
        while self.progress.batch < len(self.batches):
            yield self.batches[self.progress.batch]
        self.bar.close()

    def step(self, batch: list, loss_fn, size: float | None = None) -> tuple[dict, list]:
        """One optimizer step on `batch`: (the step's record, loss_fn's third values). `size`: what
        the loss is normalised by (default the batch's size in pairs; SFT gives tokens)."""
        sums, outputs = accumulate_gradients(self.stage, self.model, batch, loss_fn, size or len(batch))
        metrics, self.stop, self.save_due = reduce_metrics(
            self.stage, sums, by_time=not (self.every or self.save_period)
        )
        loss = metrics.get("loss", 0.0)
        grad_norm = optimizer_step(
            self.stage, self.model, self.optimizer, self.scheduler, loss, batch, self.progress, self.desc
        )
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": self.progress.step, **self.log_extra, "lr": lr, "grad_norm": grad_norm}
        return {**record, **normalise_metrics(metrics)}, outputs

    def end_step(self, record: dict) -> None:
        """Log the step's record; write a checkpoint at the cadence, when save_minutes are up or
        when a stop signal came; then, after a stop signal, raise Stopped."""
        stage, progress = self.stage, self.progress
        stage.log(record)
        self.records.append(record)
        self.bar.set_postfix(loss=f"{record.get('loss', 0):.4f}")
        self.bar.update()
        if self.save_period:
            cadence = progress.step % self.save_period == 0
        else:
            due = self.save_due or (self.every and progress.batch % self.every == 0)
            cadence = due and progress.batch < len(self.batches)
        if self.checkpoint_extras is not None and (self.stop or cadence):
            stage.save_checkpoint(progress.step, self.model, self.optimizer, self.scheduler, self.checkpoint_extras())
        if self.stop:
            self.bar.close()
            kept = (
                f"; checkpoint {stage.latest_checkpoint()}"
                if self.checkpoint_extras is not None
                else "; no checkpoint (none is kept here)"
            )
            raise Stopped(
                f"[{stage.name}] stopped after step {progress.step} ({self.desc}, {progress.batch} of "
                f"{len(self.batches)} batches){kept}"
            )


def optimize(
    stage,
    model,
    optimizer,
    scheduler,
    batches: list[list],
    loss_fn,
    progress: Progress,
    desc: str,
    *,
    checkpoint_extras=None,
    log_extra: dict | None = None,
    sizes: list[float] | None = None,
    save_period: int = 0,
    before_batch=None,
    after_step=None,
) -> list[dict]:
    """The optimisation loop of the stages that need nothing between steps but these hooks (SFT,
    the reward model, the offline methods, PPO): a TrainingPass over `batches`. sizes[k]: what batch
    k's loss is normalised by (default its size in pairs); before_batch(batch) runs on every rank
    before a batch's micro-batches (KTO's reference point over the whole batch); after_step() after
    each optimizer step, its dict joining the step's record. Returns the records logged."""
    training = TrainingPass(
        stage,
        model,
        optimizer,
        scheduler,
        batches,
        progress,
        desc,
        checkpoint_extras=checkpoint_extras,
        log_extra=log_extra,
        save_period=save_period,
    )
    for batch in training:
        if before_batch is not None:
            before_batch(batch)
        record, _ = training.step(batch, loss_fn, sizes[progress.batch] if sizes is not None else None)
        if after_step is not None:
            record.update(after_step() or {})
        training.end_step(record)
    return training.records


def accumulate_gradients(stage, model, batch: list, loss_fn, size: float) -> tuple[dict, list]:
    """Backward over this rank's strided share of a global batch, in micro-batches; a rank with
    fewer items runs padding masked out (mask 0) so every rank does the same number of forwards.
    Gradients are reduced on the last micro-batch only, or on every one (rt.sharded_gradients).
    Returns this rank's summed metrics and the third values loss_fn returned, one per micro-batch."""
    cfg, rt = stage.cfg, stage.rt
    micro = cfg.micro_batch_size
    share = batch[rt.rank :: rt.world]
    n_micro = math.ceil(math.ceil(len(batch) / rt.world) / micro)
    sums: dict[str, float] = {}
    outputs = []
    for m in range(n_micro):
        items = share[m * micro : (m + 1) * micro]
        mask = [1.0] * len(items)
        if not items:  # padding: the same computation, masked out
            items, mask = [batch[0]], [0.0]
        if rt.fsdp:
            # reduce-scatter on the last micro-batch only (unsharded fp32 gradients kept until then), or on every
            # one (gradients stay sharded, at the cost of more communication): grad_accumulation decides
            model.set_requires_gradient_sync(rt.sharded_gradients or m == n_micro - 1)
        loss, metrics, *output = loss_fn(items, torch.tensor(mask, device=rt.device), size, rt.world)
        loss.backward()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        outputs += output
    return sums, outputs


CHECKPOINT_SHARE = 0.05  # by default a checkpoint is due once writing it costs at most this share of the time


def reduce_metrics(stage, sums: dict, by_time: bool = False) -> tuple[dict, bool, bool]:
    """Every rank's metric sums added up; two flags ride on the same all-reduce: a stop signal on
    any rank, and rank 0's clock for a checkpoint (save_minutes passed since the last; by_time: no
    checkpoint with a model yet, or the last one's write time at most CHECKPOINT_SHARE of the time
    since it began). Returns (metrics, stop, save due)."""
    cfg, rt = stage.cfg, stage.rt
    since = time.time() - stage.last_save
    due = cfg.save_minutes > 0 and since > 60 * cfg.save_minutes
    if by_time:
        due = due or stage.save_cost_s is None or stage.save_cost_s <= CHECKPOINT_SHARE * (since + stage.save_cost_s)
    sums = {**sums, "_stop": float(bool(STOP_SIGNAL)), "_save": float(rt.main and due)}
    keys = sorted(sums)
    metrics = dict(zip(keys, all_reduce_sum(rt, torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()))
    return metrics, metrics.pop("_stop") > 0, metrics.pop("_save") > 0


def optimizer_step(
    stage, model, optimizer, scheduler, loss_value: float, batch: list, progress: Progress, desc: str
) -> float:
    """Clip the gradient norm, refuse a non-finite loss or gradient (nothing is saved: the last
    good checkpoint stays), step optimizer and schedule, advance `progress`; returns the norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], stage.cfg.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        rows = [getattr(item, "index", None) for item in batch[:8]]
        raise NonFiniteLoss(
            f"[{stage.name}] step {progress.step + 1} ({desc}, batch {progress.batch}, dataset rows {rows}...): loss "
            f"{loss_value}, gradient norm {grad_norm}; stopped without saving, the last good checkpoint is kept"
        )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.batch += 1
    return grad_norm


# ==============================================================================================
# Generation on every rank


def distributed_generate(
    policy,
    tokenizer,
    prompts: list[list[int]],
    model_path: str,
    n: int,
    cfg: Config,
    rt: Runtime,
    seed: int,
    workdir: Path,
    backend: str | None = None,
    pieces: Pieces | None = None,
    name: str = "generation",
):
    """n responses per prompt, on every rank: vLLM workers on the exported policy, or the
    sharded policy's own `generate`. There the prompts are cut into batches of gen_batch_size,
    batch k sampled with seed + k by rank k % world (in lockstep, synced_gpus), so the answers do
    not depend on the number of ranks; each round (one batch per rank) is a piece of `pieces`
    (`name`), kept as it finishes. A stop signal ends it between rounds, or terminates the vLLM
    workers (which keep their finished chunks): Stopped, naming where."""
    pieces = pieces or Pieces(None, rt, "stopped while generating")
    backend = backend or cfg.generator
    if backend == "vllm":
        # the child's start-up check needs gpu_memory_utilization x total free: nothing gathered, nothing cached
        release_memory(policy)
        try:
            return generate(
                prompts,
                n,
                cfg.temperature,
                cfg.top_p,
                cfg.max_new_tokens,
                seed,
                backend="vllm",
                model_path=model_path,
                workdir=workdir / "vllm",
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.vllm_max_model_len,
                enforce_eager=cfg.vllm_enforce_eager,
                group=rt.objects,
                vllm_python=cfg.vllm_python,
                should_stop=lambda: bool(STOP_SIGNAL),
            )
        except GenerationStopped as err:
            raise Stopped(f"{pieces.where} ({name}: {err})") from None
    batches = list(range(math.ceil(len(prompts) / cfg.gen_batch_size)))
    mine = batches[rt.rank :: rt.world]

    def one_round(r: int) -> dict:  # every rank generates one batch (or repeats one, unused); all get every batch
        k = mine[r] if r < len(mine) else batches[0]
        out = generate(
            prompts[k * cfg.gen_batch_size : (k + 1) * cfg.gen_batch_size],
            n,
            cfg.temperature,
            cfg.top_p,
            cfg.max_new_tokens,
            seed + k,
            model=policy.lm,
            tokenizer=tokenizer,
            batch_size=cfg.gen_batch_size,
            synced_gpus=rt.world > 1,
        )
        return {b: o for part in all_gather_objects(rt, {k: out} if r < len(mine) else {}) for b, o in part.items()}

    if rt.fsdp:
        policy.unshard()  # the root's own weights (embeddings, final norm, head) are shards outside its forward
    rounds = pieces.run(name, math.ceil(len(batches) / rt.world), one_round)  # the same number on every rank
    if rt.fsdp:
        policy.reshard()
    merged = {k: out for done in rounds for k, out in done.items()}
    return [generation for k in batches for generation in merged[k]]
