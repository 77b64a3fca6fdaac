"""Distributed set-up and FSDP2 loading as a GPU run meets them, shown on CPU: a single process
that shards without torchrun (a group of one), the deterministic environment, the process
group's timeout and device binding, each rank loading only its shard, no whole model moved
before sharding, memory released before a vLLM child starts, and the suite's CPU-only rule."""

import contextlib
import json
import os
import subprocess
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import config
import engine
from conftest import run_on_cpu

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_script(tmp_path, script: str, *args, torchrun: int = 0) -> list[dict]:
    """Run a Python script, alone (no torchrun variables in its environment) or under torchrun on
    gloo; each process reports one dict with report(row) (to a file of its rank: two processes'
    printed lines can interleave), returned in rank order."""
    path, results = tmp_path / "script.py", tmp_path / "results"
    results.mkdir()
    path.write_text(REPORT + script)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), RESULTS_DIR=str(results))
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={torchrun}"] if torchrun else [])
    result = subprocess.run(
        launcher + [str(path), *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads(file.read_text()) for file in sorted(results.glob("rank*.json"))]


REPORT = """
def report(row):
    import json, os
    with open(os.path.join(os.environ["RESULTS_DIR"], f"rank{row['rank']}.json"), "w") as f:
        json.dump(row, f)
"""

STEP = """
import dataclasses, gc, json, os, sys
from pathlib import Path
import torch
from torch.distributed.tensor import DTensor
import config, engine, losses

toy_dir, out = sys.argv[1], Path(sys.argv[2])
cfg = config.parse_config([f"--model={toy_dir}", "--activation_checkpointing=false", f"--out_dir={out}"])
ids = torch.tensor([[5, 6, 7, 8, 9, 10], [7, 7, 8, 9, 0, 0]])
attention, response = (ids > 0).long(), torch.zeros_like(ids, dtype=torch.bool)
response[:, 3:] = ids[:, 3:] > 0

def one_step(rt):
    policy, tokenizer = engine.load_logprob_model(toy_dir, cfg, rt, trainable=True)
    optimizer = engine.make_optimizer(policy, 1e-2, cfg)
    (-policy(ids, attention, response).sum()).backward()
    optimizer.step()
    return policy, tokenizer

plain, _ = one_step(engine.Runtime())  # one CPU process, no sharding: the reference
expected = {k: v.detach().clone() for k, v in plain.lm.state_dict().items()}
"""


def test_single_process_shards_without_torchrun(toy_dir, tmp_path):
    """C1: one GPU without torchrun runs FSDP2 in a process group of one (gloo here, NCCL there):
    load, a training step, a reshard before a vLLM child, an export; the same weights as the
    unsharded step. C4: the model is never moved to the device whole before sharding."""
    script = (
        STEP
        + """
assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
rt = engine.Runtime(fsdp=True)  # what setup_distributed makes of a lone GPU process, on CPU
engine.start_process_group(rt, cfg.dist_timeout_minutes)

def whole_move(self, *args, **kwargs):
    raise AssertionError("the whole model was moved to the device before sharding")

losses.LogprobModel.to = whole_move
policy, tokenizer = one_step(rt)
with torch.no_grad():  # a forward without gradients leaves the root's own weights gathered
    policy(ids, attention, response)
gathered = not all(isinstance(p, DTensor) for p in policy.parameters())
seen = {}

def vllm_stand_in(prompts, n, *args, **kwargs):  # what distributed_generate hands to vLLM, and when
    seen.update(sharded=all(isinstance(p, DTensor) for p in policy.parameters()), backend=kwargs["backend"])
    return [[] for _ in prompts]

engine.generate = vllm_stand_in
vllm_cfg = dataclasses.replace(cfg, generator="vllm")
engine.distributed_generate(policy, tokenizer, [[1, 2]], toy_dir, 2, vllm_cfg, rt, 0, out)
engine.export_hf(policy, policy.lm, tokenizer, out / "model", cfg, rt, prefix="lm.")
engine.export_hf(plain, plain.lm, tokenizer, out / "plain", cfg, engine.Runtime(), prefix="lm.")
from safetensors import safe_open
from transformers import AutoModelForCausalLM
exported = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
diff = max((exported[k] - expected[k]).abs().max().item() for k in expected)
names = {path: sorted(safe_open(out / path / "model.safetensors", "pt").keys()) for path in ("model", "plain")}
report({"rank": 0, "gathered": gathered, **seen, "max_diff": diff, "world": engine.dist.get_world_size(), **names})
del policy, plain
gc.collect()  # FSDP's objects go while the process group exists (as train.main does)
engine.dist.destroy_process_group()
"""
    )
    (row,) = run_script(tmp_path, script, toy_dir, tmp_path / "out")
    assert row["world"] == 1 and row["backend"] == "vllm"
    assert row["gathered"] and row["sharded"]  # gathered after the no-grad forward, resharded before vLLM
    assert row["max_diff"] < 1e-6, row
    # the tied output embedding written once, as an unsharded export writes it (not a second copy)
    assert row["model"] == row["plain"] and "lm_head.weight" not in row["model"], (row["model"], row["plain"])


def test_each_rank_loads_only_its_shard(toy_dir, toy_rm_dir, tmp_path):
    """S2: under FSDP2 a checkpoint is read shard by shard after sharding (parameters built on the
    meta device): each rank's shard holds its rows of the checkpoint, and the policy's log-probs
    and the reward model's scores equal those of the whole model loaded by from_pretrained."""
    script = """
import gc, json, sys, torch
from transformers import AutoModelForCausalLM
import config, engine, losses
from reward import RewardModel

toy_dir, rm_dir = sys.argv[1], sys.argv[2]
cfg = config.parse_config([f"--model={toy_dir}", "--activation_checkpointing=false"])
rt = engine.setup_distributed(cfg)
files = engine.load_causal_lm(toy_dir, cfg, rt)[2]
policy, tokenizer = engine.load_logprob_model(toy_dir, cfg, rt, trainable=False)
whole = AutoModelForCausalLM.from_pretrained(toy_dir)
ids = torch.tensor([[5, 6, 7, 8, 9, 10], [7, 7, 8, 9, 0, 0]])
attention, response = (ids > 0).long(), torch.zeros_like(ids, dtype=torch.bool)
response[:, 3:] = ids[:, 3:] > 0
with torch.no_grad():
    same_logps = torch.equal(policy(ids, attention, response), losses.LogprobModel(whole)(ids, attention, response))
embedding = policy.lm.get_input_embeddings().weight  # a frozen root reshards after its forward: a shard again
rows = -(-embedding.shape[0] // rt.world)
mine = whole.get_input_embeddings().weight[rt.rank * rows : (rt.rank + 1) * rows]
reward = engine.load_reward_model(rm_dir, cfg, rt)
prompts, answers = [[{"role": "user", "content": "ascending : b a"}]] * 2, ["a b", "b a"]
whole_reward = RewardModel.from_pretrained(rm_dir, device="cpu")
same_rewards = reward.score(prompts, answers) == whole_reward.score(prompts, answers)
report({"rank": rt.rank, "files": len(files), "logps": same_logps, "rewards": same_rewards,
        "shard": torch.equal(embedding.to_local(), mine), "shard_rows": embedding.to_local().shape[0]})
del policy, reward, embedding
gc.collect()  # FSDP's objects go while the process group exists (as train.main does)
engine.dist.destroy_process_group()
"""
    rows = run_script(tmp_path, script, toy_dir, toy_rm_dir, torchrun=2)
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        assert row["files"] == 1 and row["logps"] and row["rewards"] and row["shard"], row
    assert sum(row["shard_rows"] for row in rows) == json.loads((toy_dir / "config.json").read_text())["vocab_size"]


def test_pieces_made_and_removed_at_once_on_two_ranks(tmp_path):
    """PPO opens a rollout's pieces only to remove them: rank 0 may not delete the directory while
    rank 1 still lists it (rank 1 made slow here; it failed the suite once with FileNotFoundError)."""
    script = """
import time, sys
from pathlib import Path
import torch.distributed as dist
import config, engine

rt = engine.setup_distributed(config.parse_config([]))
directory = Path(sys.argv[1]) / "rollout2"
if rt.main:
    directory.mkdir()
    (directory / "generate-00000.pt").write_bytes(b"")
if rt.rank == 1:
    listing = Path.glob
    Path.glob = lambda self, pattern: (time.sleep(1.0), listing(self, pattern))[1]
pieces = engine.Pieces(directory, rt, "stopped")
pieces.remove()
report({"rank": rt.rank, "done": sorted(pieces.done), "gone": not directory.exists()})
dist.destroy_process_group()
"""
    rows = run_script(tmp_path, script, tmp_path, torchrun=2)
    assert [(row["done"], row["gone"]) for row in rows] == [(["generate-00000"], True)] * 2


def test_a_gpu_without_torchrun_gets_a_group_of_one(monkeypatch):
    """C1's decision: on a GPU (faked here) without torchrun's variables the models are sharded, so
    a process group is started; on the CPU without torchrun there is none."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started = []
    monkeypatch.setattr(engine, "start_process_group", lambda rt, minutes: started.append((rt.device, minutes)))
    rt = engine.setup_distributed(config.parse_config([]))
    assert not rt.fsdp and started == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    rt = engine.setup_distributed(config.parse_config(["--dist_timeout_minutes=45"]))
    assert rt.fsdp and rt.device == torch.device("cuda", 0) and started == [(torch.device("cuda", 0), 45.0)]


def test_process_group_timeout_device_and_object_group(monkeypatch):
    """C5: NCCL bound to the rank's GPU with the configured timeout (not NCCL's 10 minutes), and a
    gloo group with the same timeout for pickled objects; without torchrun, a group of one."""
    calls = []
    monkeypatch.setattr(engine.dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(engine.dist, "new_group", lambda **kw: calls.append(("group", kw)) or "gloo-group")
    for name, value in {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(name, value)
    rt = engine.Runtime(rank=3, world=8, local_rank=3, device=torch.device("cuda", 3), fsdp=True)
    engine.start_process_group(rt, 120.0)
    assert calls == [
        ("init", "nccl", {"timeout": timedelta(hours=2), "device_id": torch.device("cuda", 3)}),
        ("group", {"backend": "gloo", "timeout": timedelta(hours=2)}),
    ]
    assert rt.distributed and rt.objects == "gloo-group"
    calls.clear()
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    rt = engine.Runtime(device=torch.device("cuda", 0), fsdp=True)
    engine.start_process_group(rt, 30.0)
    (_, backend, kwargs), _ = calls
    assert backend == "nccl" and kwargs["rank"] == 0 and kwargs["world_size"] == 1 and "store" in kwargs
    assert kwargs["device_id"] == torch.device("cuda", 0) and kwargs["timeout"] == timedelta(minutes=30)


def test_deterministic_sets_the_cublas_workspace(monkeypatch):
    """C2: --deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG before the first matmul, or cuBLAS
    refuses; the run sets it (a value the user chose is kept)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        engine.setup_distributed(config.parse_config(["--deterministic"]))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        engine.setup_distributed(config.parse_config(["--deterministic"]))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_suite_hides_a_gpu_from_unmarked_tests(monkeypatch):
    """C8: on a GPU host a test not marked `cuda` runs on the CPU, and so do the processes it starts
    (the 2-process tests would otherwise call set_device(1) on a machine with one GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    run_on_cpu(monkeypatch)
    assert not torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"],
        capture_output=True,
        text=True,
    )
    assert child.stdout.strip() == "''"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_marked_test_sees_the_gpu():
    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1


def test_ranks_agree_on_the_online_forward_and_match_one_process(toy_dir, tmp_path):
    """N1: one tuple per micro-batch (micro_batch_size=1, the real presets), three tuples on two
    ranks. In the first micro-batch rank 0's tuple has long offline answers and a short online pair
    (a forward of its own would save tokens) and rank 1's has four answers of one length (it would
    not); in the second, rank 0 has a tuple whose K rewards tied (online pair (y, y)) and rank 1
    none (its share is empty: padding, masked out). The ranks must still run the same number of
    forwards, or their FSDP2 collectives stop matching (gloo: a size mismatch; NCCL: a hang until
    the timeout, kept short here). One MetaAPO step on the 2 ranks gives the weights one process
    gets on the same global batch."""
    script = """
import dataclasses, gc, sys, types
import torch
import config, dpo, engine, train
from meta import MetaController

toy_dir = sys.argv[1]
cfg = config.parse_config([f"--model={toy_dir}", "--activation_checkpointing=false", "--micro_batch_size=1",
                           "--batch_size=3", "--dist_timeout_minutes=0.5"])

def tuple_(index, offline, online, tied=False):
    chosen = [10] * online
    return dpo.PolicyPair(prompt_ids=[5, 6, 7], chosen_ids=[8 + index] * offline, rejected_ids=[9] * (offline - 1),
                          index=index, online_chosen_ids=chosen, online_rejected_ids=chosen if tied else [11] * online)

# strided shares: rank 0 gets the first and third, rank 1 the second
batch = [tuple_(0, 30, 4), tuple_(1, 8, 8), tuple_(2, 12, 3, tied=True)]

def one_step(rt):
    policy, _ = engine.load_logprob_model(toy_dir, cfg, rt, trainable=True)
    ref, _ = engine.load_logprob_model(toy_dir, cfg, rt, trainable=False)
    forward, forwards = policy.forward, []
    policy.forward = lambda *args: forwards.append(args[0].shape[0]) or forward(*args)
    optimizer = engine.make_optimizer(policy, 1e-2, cfg)
    loss_fn = train.metaapo_loss(cfg, policy, ref, MetaController(), rt)
    engine.accumulate_gradients(types.SimpleNamespace(cfg=cfg, rt=rt), policy, batch, loss_fn, len(batch))
    optimizer.step()
    return engine.full_state_dict(policy, rt), forwards

expected, _ = one_step(engine.Runtime())  # one process, no sharding: the three tuples in three micro-batches
rt = engine.setup_distributed(cfg)
alone = dpo.online_split([batch[rt.rank]], engine.Runtime())  # this rank's tuple on its own
state, forwards = one_step(rt)
# the whole state reaches rank 0 only; a tied weight is in it once
diff = max((state[k] - expected[k]).abs().max().item() for k in state) if state else None
report({"rank": rt.rank, "alone": alone, "forwards": len(forwards), "max_diff": diff, "tensors": len(state)})
del state
gc.collect()
engine.dist.barrier()
engine.dist.destroy_process_group()
"""
    rows = run_script(tmp_path, script, toy_dir, torchrun=2)
    assert [row["alone"] for row in rows] == [True, False]  # each rank alone would decide otherwise
    assert rows[0]["forwards"] == rows[1]["forwards"], rows
    assert rows[0]["max_diff"] < 1e-5 and rows[0]["tensors"] > 10, rows


def test_a_gpu_run_from_a_fresh_checkout_plans_after_building_the_toy(tmp_path, monkeypatch):
    """N3: on a GPU, grad_accumulation=auto reads the model's config (plan.sharded_gradients); the
    toy's model exists only once its assets are built, so `python train.py` from a fresh checkout
    must build them first. A fake GPU (its device properties: 80 GiB, then 2 GiB, which the toy's
    plan with its 3 GiB allowance does not fit unsharded) in a directory without out/."""
    import checkpoint
    import train

    monkeypatch.chdir(tmp_path)
    gpu = {"total_memory": 80 * 2**30}
    monkeypatch.setattr(
        checkpoint, "setup_distributed", lambda cfg: engine.Runtime(device=torch.device("cuda", 0), fsdp=True)
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(**gpu))
    planned = []
    monkeypatch.setattr(train, "run_pipeline", lambda cfg, rt: planned.append(rt.sharded_gradients))
    train.main([])
    gpu["total_memory"] = 2 * 2**30
    train.main([])
    assert planned == [False, True] and (tmp_path / "out" / "toy" / "seed0" / "base" / "config.json").exists()


@contextlib.contextmanager
def saved_as_on_a_gpu():
    """What torch.save records of the tensors a GPU run holds: each storage tagged 'cuda:0' (CPU
    tensors here, tagged so by a tagger registered ahead of torch's own while the block runs)."""
    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    torch.serialization.register_package(*entry)
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)


def test_a_checkpoint_written_on_a_gpu_is_read_onto_the_cpu(tmp_path):
    """N4: torch.load puts each tensor back on the device that saved it. A GPU run's MetaAPO state
    (the meta-learner's weights and AdamW state on cuda:0, saved by rank 0) would give every rank a
    CUDA context on GPU 0 at a resume, and a machine without CUDA could not read the checkpoint
    (checkpoint_problem called it unreadable). Checkpoint pickles and phase-1 pieces are read onto
    the CPU; the meta-learner copies its state onto its own device."""
    import checkpoint
    from meta import MetaController, meta_features

    rt, meta = engine.Runtime(), MetaController()
    for _ in range(meta.interval):
        scores = -torch.rand(4) * 3
        meta.buffer.append(scores, scores + 0.5, meta_features(scores))
    meta.update()  # AdamW state exists
    stage = checkpoint.Stage(config.parse_config([f"--out_dir={tmp_path}"]), rt, "metaapo")
    with saved_as_on_a_gpu():
        stage.save_checkpoint(3, None, None, None, {"iteration_state": {"meta": meta.state_dict()}, "rank_local": {}})
        engine.Pieces(tmp_path / "pieces", rt, "").run("scores", 1, lambda k: torch.ones(2))
    path = stage.latest_checkpoint()
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load of it does on a CPU machine
        torch.load(path / "state.pt", weights_only=False)
    assert checkpoint.checkpoint_problem(path) is None
    restored = MetaController()
    restored.load_state_dict(stage.load_checkpoint(path, None, None, None)["iteration_state"]["meta"])
    assert restored.curve() == meta.curve() and restored.updates == 1
    assert restored.optimizer.state_dict()["state"][0]["exp_avg"].device.type == "cpu"
    (piece,) = engine.Pieces(tmp_path / "pieces", rt, "").run("scores", 1, None)
    assert torch.equal(piece, torch.ones(2))


def test_the_gate_is_decided_once_for_every_rank(tmp_path):
    """N7: every rank runs h_phi, but rank 0's gating decision is the one all ranks use (h_phi
    on two GPUs need not agree to the last bit, and ranks that sent different prompts to
    generation would run different rounds of it); every rank's generator stays in step. Rank 1's
    h is shifted here so that alone it would send almost nothing."""
    script = """
import torch
import config, engine, train
from dpo import PairScores
from meta import MetaController, meta_features

cfg = config.parse_config([])
rt = engine.setup_distributed(cfg)
scores = [PairScores(-3.0 + 0.1 * i, -3.0 + 0.1 * i, 0.0, 0.0) for i in range(40)]
meta = MetaController(seed=0)
if rt.rank == 1:
    with torch.no_grad():
        meta.learner.net[-2].bias += 8.0  # h near 1: u > w almost never
l_off = torch.tensor([s.score for s in scores])
alone = MetaController(seed=0).gate(l_off, meta_features(l_off)).selected.tolist()  # rank 0's h, on its own
selected, w = train.meta_gate(meta, scores, cfg, rt)
next_draw = torch.rand(1, generator=meta.generator).item()
report({"rank": rt.rank, "selected": selected, "w": w, "alone": alone, "next_draw": next_draw})
engine.dist.barrier()  # no rank tears its group down while the other is still inside the gather
engine.dist.destroy_process_group()
"""
    rows = run_script(tmp_path, script, torchrun=2)
    assert rows[0]["selected"] == rows[1]["selected"] == rows[0]["alone"] and rows[0]["w"] == rows[1]["w"]
    assert 5 < sum(rows[0]["selected"]) < 40 and rows[0]["next_draw"] == rows[1]["next_draw"]


def test_the_reward_model_stage_loads_only_its_shard_with_a_new_head(toy_dir, tmp_path):
    """S2 / N9: the rm stage starts from the SFT model with a new score head the checkpoint lacks;
    each rank reads only its shard (from_pretrained, which loads the whole model on every rank's
    host, is refused here) and the head gets the values a single process's from_pretrained gives
    it, so the 2-rank model scores as the 1-process one."""
    script = """
import gc, sys
import transformers
import config, engine

toy_dir = sys.argv[1]
cfg = config.parse_config([f"--model={toy_dir}", "--activation_checkpointing=false", "--seed=3"])
prompts, answers = [[{"role": "user", "content": "ascending : b a"}]] * 3, ["a b", "b a", "a a"]
whole = engine.load_reward_model(toy_dir, cfg, engine.Runtime(), trainable=True, init_head=True)  # from_pretrained
expected = whole.score(prompts, answers)

def whole_model(*args, **kwargs):
    raise AssertionError("the whole model was loaded on a rank's host")

transformers.AutoModelForSequenceClassification.from_pretrained = whole_model
rt = engine.setup_distributed(cfg)
rt.objects = engine.dist.new_group(backend="gloo")  # as on CUDA: scores travel over it, not over NCCL
sharded = engine.load_reward_model(toy_dir, cfg, rt, trainable=True, init_head=True)
got = sharded.score(prompts, answers)
diff = max(abs(a - b) for a, b in zip(got, expected))
report({"rank": rt.rank, "diff": diff, "scores": got, "group": sharded.group is rt.objects})
del sharded
gc.collect()
engine.dist.barrier()
engine.dist.destroy_process_group()
"""
    rows = run_script(tmp_path, script, toy_dir, torchrun=2)
    assert all(row["diff"] < 1e-5 and row["group"] for row in rows), rows
    assert len(set(rows[0]["scores"])) == 3  # a head that is not zero
