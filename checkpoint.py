"""
A stage's directory and what makes a run resumable: config.json (with the rules for resuming with
other settings), metrics.jsonl (and its Weights & Biases copy), checkpoints written with
torch.distributed.checkpoint and checked for completeness before use, done.json, and the RNG
states every rank saves.

Run
    python train.py --resume ...       # continue any stage from its latest complete checkpoint
It is imported, not run; tests/test_resume.py kills, stops and damages runs and compares weights.

Deliberate simplifications
- Checkpoints are whole (model, optimizer, position, RNG, meta-learner) and atomic (a .tmp
  directory renamed into place); the last keep_checkpoints are kept while a stage runs, none is
  merged or thinned, and a finished stage keeps none.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from config import Config, ConfigError, _short, config_dict
from engine import (
    Progress,
    Runtime,
    barrier,
    make_optimizer,
    make_scheduler,
    print0,
    request_stop,
    saved_progress,
    setup_distributed,
)

# ==============================================================================================
# Resuming with other settings

# Keys a stage may be resumed with other values of: they change how it is saved, logged, evaluated
# or laid out in memory, not what it computes. Every other key must match the stage's config.json.
RESUME_HARMLESS = (
    "method",
    "save_every",
    "save_minutes",
    "keep_checkpoints",
    "micro_batch_size",
    "activation_checkpointing",
    "chunk_size",
    "deterministic",
    "gpu_memory_utilization",
    "vllm_max_model_len",
    "vllm_enforce_eager",
    "vllm_python",
    "dist_timeout_minutes",
    "eval_samples",
    "eval_prompts",
    "wandb_project",
)

PATH_KEYS = (
    "model",
    "out_dir",
    "dataset",
    "test_dataset",
    "sft_dataset",
    "sft_model",
    "reward_model",
    "policy",
    "reference",
)


def same_path(a: str, b: str) -> bool:
    """Two spellings of one file or directory (relative / absolute, links); hub ids by their text."""
    if a == b:
        return True
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except OSError:
        return False


def resume_changes(saved: dict, cfg: Config) -> tuple[dict, dict]:
    """The keys whose value differs between a stage's saved config and `cfg`, as {key: (saved, now)}:
    (those that change the result, the harmless ones). A key the saved config lacks had its default."""
    defaults = config_dict(type(cfg)())  # an experiment's config: its subclass's defaults
    harmless_keys = RESUME_HARMLESS + getattr(cfg, "EXTRA_RESUME_HARMLESS", ())
    path_keys = PATH_KEYS + getattr(cfg, "EXTRA_PATH_KEYS", ())
    result, harmless = {}, {}
    for key, now in config_dict(cfg).items():
        if key in ("preset", "resume"):
            continue
        before = saved.get(key, defaults[key])
        now = list(now) if isinstance(now, tuple) else now
        if before == now or (key in path_keys and same_path(str(before), str(now))):
            continue
        # KTO's reference point comes from the micro-batch
        kto_batch = key == "micro_batch_size" and cfg.method == "kto"
        (harmless if (key in harmless_keys and not kto_batch) or key == "out_dir" else result)[key] = (before, now)
    return result, harmless


def read_json(path: Path) -> dict:
    """A JSON record this program wrote (config.json, done.json); a damaged one is a clear error."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); remove {path.parent} to run that stage again") from None


def read_pickle(path: Path):
    """A checkpoint's pickle (state.pt, rank<r>.pt) with every tensor on the CPU: torch.load would
    put each back on the device that saved it, so every rank of a GPU run would give GPU 0 a CUDA
    context for rank 0's meta-learner state, and a machine without CUDA could not read it at all.
    The meta-learner's load_state_dict copies it onto its own device."""
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(path: Path, record: dict) -> None:
    """Write atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


# ==============================================================================================
# A stage's directory

WANDB: list = []  # the Weights & Biases run (rank 0, --wandb_project), once started


@contextlib.contextmanager
def entry_process(cfg: Config):
    """An entry point's process around its work (train.py, evaluate.py, meta_aligner.py): SIGTERM /
    SIGINT caught so that a run stops between steps, the ranks' process group started (the Runtime
    is yielded); on the way out, whatever happened, end_process undoes it all."""
    handlers = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    rt = setup_distributed(cfg)
    try:
        yield rt
    finally:
        end_process(rt, handlers, deterministic)


def end_process(rt: Runtime, handlers: dict, deterministic: bool) -> None:
    """What entry_process undoes on the way out, whatever happened: the W&B run finished, the
    process group destroyed, the signal handlers and the deterministic flag it found restored
    (main() may run inside another program, the tests)."""
    if WANDB:
        WANDB.pop().finish()
    if rt.distributed:
        # models and optimizers caught in reference cycles go while the process group still
        # exists: freed after it, at interpreter exit, a rank could abort in a C++ destructor
        gc.collect()
        torch.distributed.destroy_process_group()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    torch.use_deterministic_algorithms(deterministic)


def start_wandb(cfg: Config, rt: Runtime) -> None:
    """Optional experiment tracking: wandb is an extra, imported only when asked for; with
    WANDB_MODE=offline it writes locally and needs no network."""
    if not cfg.wandb_project or not rt.main:
        return
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_project needs wandb, an optional extra: pip install wandb") from None
    WANDB.append(
        wandb.init(project=cfg.wandb_project, name=Path(cfg.out_dir).name, config=config_dict(cfg), dir=cfg.out_dir)
    )


class Stage:
    """One stage's directory: config.json, metrics.jsonl, checkpoints/, model/, done.json."""

    def __init__(self, cfg: Config, rt: Runtime, name: str):
        self.cfg, self.rt, self.name = cfg, rt, name
        self.dir = Path(cfg.out_dir) / name
        self.checkpoints = self.dir / "checkpoints"
        self.model_dir = self.dir / "model"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.metric_lines = 0
        self.last_save = time.time()  # when the last checkpoint was written, for the cadence by time
        self.save_cost_s: float | None = None  # the seconds the last checkpoint with a model took to write
        self.opened, self.elapsed_before = time.time(), 0.0  # elapsed_s(): this process's time + the kept work's

    def elapsed_s(self) -> float:
        """Seconds spent on the stage: in this process, plus, after a resume, what the processes
        before it had spent up to the checkpoint it resumed from (work lost after it is redone and
        counted once more, as it was spent)."""
        return self.elapsed_before + time.time() - self.opened

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").exists()

    def start(self) -> Path | None:
        """Create the directory; return the checkpoint to resume from, if any. An unfinished stage
        is never overwritten silently: without --resume it is an error. With --resume, every key
        that changes the result must equal the stage's config.json; harmless changes are recorded
        there under "resumes", the values the stage started with stay."""
        latest = self.latest_checkpoint()
        begun = latest is not None or self.metrics_path.exists()
        if begun and not self.cfg.resume:
            raise ConfigError(
                f"{self.dir} holds an unfinished run; pass --resume to continue it, or remove the directory"
            )
        if self.cfg.resume and not begun:
            print0(self.rt, f"[{self.name}] --resume: nothing to resume in {self.dir}; the stage starts afresh")
        elif self.cfg.resume and latest is None:
            print0(
                self.rt,
                f"[{self.name}] --resume: no checkpoint in {self.checkpoints} (the run stopped before its first); the "
                "stage starts afresh",
            )
        if latest is not None:
            latest = self.usable_checkpoint()
        record = {**config_dict(self.cfg), "stage": self.name}
        if begun and (self.dir / "config.json").exists():
            saved = read_json(self.dir / "config.json")
            changed, harmless = resume_changes(saved, self.cfg)
            if changed:
                lines = "\n".join(
                    f"  --{key}: {before} when it started, {now} now" for key, (before, now) in changed.items()
                )
                raise ConfigError(
                    f"--resume: {self.dir} started with other settings that change its result:\n{lines}\nResume with "
                    f"the values it started with (in {self.dir / 'config.json'}), or remove {self.dir} to start the "
                    "stage afresh with the new ones."
                )
            record = saved
            if harmless:
                record["resumes"] = saved.get("resumes", []) + [
                    {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": harmless}
                ]
                print0(
                    self.rt,
                    f"[{self.name}] resuming with "
                    + ", ".join(f"--{k}={now} (was {before})" for k, (before, now) in harmless.items()),
                )
        barrier(self.rt)
        if self.rt.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / "config.json", record)
        barrier(self.rt)
        if latest is None and self.rt.main:
            self.metrics_path.unlink(missing_ok=True)
        return latest

    def log(self, record: dict) -> None:
        if self.rt.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"stage": self.name, **record}) + "\n")
            if WANDB:  # a copy of the numbers; metrics.jsonl stays the record
                WANDB[0].log(
                    {
                        f"{self.name}/{k}": v
                        for k, v in record.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    }
                )
        self.metric_lines += 1

    def checkpoint_dirs(self) -> list[Path]:
        """The stage's checkpoints, oldest first (not the .tmp of one being written, nor a .damaged one)."""
        if not self.checkpoints.exists():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name))

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoint_dirs()
        return found[-1] if found else None

    def usable_checkpoint(self) -> Path:
        """The newest checkpoint that is complete (checkpoint_problem): a damaged newer one (a full
        disk, a node lost while copying) is named in a warning and moved aside to <name>.damaged,
        so that it is neither used nor counted among the kept ones; none usable is a refusal that
        leaves everything as it is."""
        found = self.checkpoint_dirs()
        problems = [(path, checkpoint_problem(path)) for path in reversed(found)]
        usable = next((path for path, problem in problems if problem is None), None)
        if usable is None:
            reasons = "; ".join(f"{path.name}: {problem}" for path, problem in problems)
            raise ConfigError(
                f"--resume: no usable checkpoint in {self.checkpoints} ({reasons}); remove {self.dir} to start the "
                "stage afresh"
            )
        barrier(self.rt)  # every rank has judged them before any is moved
        for path, problem in problems:
            if path == usable:
                break
            print0(self.rt, f"[{self.name}] checkpoint {path} is damaged ({problem}): moved aside, using {usable.name}")
            if self.rt.main:
                shutil.rmtree(path.with_name(path.name + ".damaged"), ignore_errors=True)
                os.replace(path, path.with_name(path.name + ".damaged"))
        barrier(self.rt)
        return usable

    def save_checkpoint(self, step: int, model, optimizer, scheduler, state: dict) -> None:
        """Model + optimizer through torch.distributed.checkpoint (model=None: a state-only
        checkpoint, for phase boundaries where the model is an HF export already), the rest
        (position, scheduler, meta-learner, online pairs) as pickles; atomically, keeping the last
        N. Each rank also writes its RNG states and `state["rank_local"]` (what differs by rank,
        such as its share of the meta buffer) to rank<r>.pt."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        started = time.time()
        final = self.checkpoints / f"step-{step:08d}"
        tmp = self.checkpoints / f"step-{step:08d}.tmp"
        if self.rt.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.rt)
        if model is not None:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        state = dict(state)
        torch.save({"rng": capture_rng(), "local": state.pop("rank_local", None)}, tmp / f"rank{self.rt.rank}.pt")
        if self.rt.main:
            torch.save(
                {
                    **state,
                    "has_model": model is not None,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "metric_lines": self.metric_lines,
                    "elapsed_s": self.elapsed_s(),
                },
                tmp / "state.pt",
            )
        barrier(self.rt)
        if self.rt.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoint_dirs()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.rt)
        self.last_save = time.time()
        if model is not None:
            self.save_cost_s = self.last_save - started

    def load_checkpoint(self, path: Path, model, optimizer, scheduler) -> dict:
        """Restore model, optimizer, scheduler, RNG states and metrics.jsonl from a checkpoint
        (model=None, or a state-only checkpoint: everything but model and optimizer) and return its
        recorded state, with this rank's `rank_local`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state = read_pickle(path / "state.pt")
        if model is not None and state["has_model"]:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        rank_path = path / f"rank{self.rt.rank}.pt"  # absent when resuming on more ranks than saved
        rank_state = read_pickle(rank_path if rank_path.exists() else path / "rank0.pt")
        restore_rng(rank_state["rng"])
        state["rank_local"] = rank_state["local"] if rank_path.exists() else None
        # metrics written after this checkpoint belong to the lost part of the run
        self.metric_lines = state["metric_lines"]
        self.elapsed_before = state.get("elapsed_s", 0.0)  # checkpoints before this key existed: 0
        if self.rt.main and self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines(keepends=True)[: self.metric_lines]
            self.metrics_path.write_text("".join(lines))
        print0(self.rt, f"[{self.name}] resumed from {path}")
        return state

    def finish(self, summary: dict) -> None:
        """Mark the stage done (done.json, written atomically), then drop its checkpoints: model/ is
        final and a finished stage is never resumed, so they are dead weight (at 8B, 90 GiB each).
        A kill between the two leaves a done stage, whose leftovers drop_checkpoints removes later."""
        if self.rt.main:
            write_json(self.dir / "done.json", summary)
        barrier(self.rt)
        self.drop_checkpoints()

    def drop_checkpoints(self) -> None:
        """Remove a finished stage's checkpoints (only once done.json exists)."""
        if self.rt.main and self.done:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        barrier(self.rt)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None: state.pt and every rank<r>.pt load; with a
    model, torch.distributed.checkpoint's .metadata loads and every file it names holds at least the
    bytes it points to (a truncated or missing shard shows here, before any rank reads it)."""
    for name in ["state.pt"] + sorted(p.name for p in path.glob("rank*.pt")):
        try:
            record = read_pickle(path / name)
        except Exception as err:  # missing, truncated, not a pickle: all mean the same here
            return f"{name} unreadable: {_short(err)}"
        if name == "state.pt":
            state = record
    if not (path / "rank0.pt").exists():
        return "rank0.pt missing"
    if state.get("has_model"):
        import torch.distributed.checkpoint as dcp

        try:
            metadata = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as err:
            return f".metadata unreadable: {_short(err)}"
        needed: dict[str, int] = {}
        for item in metadata.storage_data.values():
            needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
        for name, size in sorted(needed.items()):
            have = (path / name).stat().st_size if (path / name).exists() else None
            if have is None or have < size:
                return f"{name} {'missing' if have is None else f'truncated ({have} of {size} bytes)'}"
    return None


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prepare_pass(stage: Stage, latest: Path | None, model, lr: float, steps: int, cfg: Config):
    """AdamW and its schedule over `steps`, restored with the model from `latest` when resuming;
    returns (optimizer, scheduler, progress)."""
    optimizer = make_optimizer(model, lr, cfg)
    scheduler = make_scheduler(optimizer, steps, cfg)
    restored = stage.load_checkpoint(latest, model, optimizer, scheduler) if latest is not None else None
    progress = saved_progress(restored) if restored is not None else Progress()
    return optimizer, scheduler, progress
