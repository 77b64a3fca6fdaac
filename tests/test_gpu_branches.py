"""Every line only a GPU run takes (CUDA, NCCL, more than one rank, vLLM), and the CPU test that
takes it. GPU_ONLY lists, per function, how many such lines it has and which tests run them on
the CPU (a fake device, gloo with 2 ranks, the vLLM stand-in); a test scans the code, so a new GPU-
only line, or one a listed test no longer names, fails the suite until it is listed with a test.
The tests of the lines no other test takes follow."""

import ast
import contextlib
import io
import json
import re
import sys
import tokenize
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

import checkpoint
import config
import engine
import losses
import reward
import sample
import train
from conftest import TINY, fresh_run, metrics, run_train

ROOT = Path(__file__).resolve().parent.parent

# What only a GPU run takes: a device test, the CUDA API, NCCL, a test of several ranks or of the
# sharded path, a vLLM branch or call (comments and docstrings do not count)
GPU_ONLY = re.compile(r'"cuda"|torch\.cuda\.|world [>=]=? 1|rt\.fsdp|== "vllm"|\bvllm\.|"nccl"|is_initialized\(\)')

D, E, G, R, S, T = (
    "tests/test_distributed.py",
    "tests/test_evaluate.py",
    "tests/test_gpu_branches.py",
    "tests/test_reward.py",
    "tests/test_sample.py",
    "tests/test_train.py",
)
SHARDED = f"{D}::test_each_rank_loads_only_its_shard"  # 2 gloo ranks: FSDP2 loading and a sharded forward
TWO_RANK_METAAPO = f"{T}::test_two_process_run_matches_one_process_first_step"  # generation on 2 ranks
FAKE_VLLM = f"{S}::test_vllm_worker_arguments_and_results"  # the vLLM stand-in in a child process

# (file, function): (GPU-only lines in it, the tests that take them on the CPU)
GPU_ONLY_LINES = {
    ("baselines/ppo.py", "collect_rollout"): (1, [f"{G}::test_ppo_generates_with_vllm_from_the_exported_actor"]),
    ("checkpoint.py", "capture_rng"): (2, [f"{G}::test_rng_states_include_the_gpus"]),
    ("checkpoint.py", "restore_rng"): (2, [f"{G}::test_rng_states_include_the_gpus"]),
    ("evaluate.py", "load_generator"): (
        1,
        [f"{E}::test_vllm_generator_loads_no_policy_and_answers_through_the_workers"],
    ),
    ("engine.py", "setup_distributed"): (5, [f"{D}::test_a_gpu_without_torchrun_gets_a_group_of_one", SHARDED]),
    ("engine.py", "start_process_group"): (2, [f"{D}::test_process_group_timeout_device_and_object_group"]),
    ("engine.py", "shard_model"): (1, [SHARDED]),
    ("engine.py", "mixed_precision"): (1, [f"{G}::test_precision_and_memory_choices_on_a_gpu"]),
    ("engine.py", "weights_dtype"): (1, [f"{G}::test_precision_and_memory_choices_on_a_gpu"]),
    ("engine.py", "load_pretrained"): (
        1,
        [SHARDED, f"{D}::test_the_reward_model_stage_loads_only_its_shard_with_a_new_head"],
    ),
    ("engine.py", "load_logprob_model"): (1, [SHARDED]),
    ("engine.py", "release_memory"): (2, [f"{G}::test_precision_and_memory_choices_on_a_gpu"]),
    ("engine.py", "full_state_dict"): (1, [f"{D}::test_ranks_agree_on_the_online_forward_and_match_one_process"]),
    ("engine.py", "export_hf"): (1, [f"{G}::test_precision_and_memory_choices_on_a_gpu"]),
    ("engine.py", "accumulate_gradients"): (1, [f"{D}::test_ranks_agree_on_the_online_forward_and_match_one_process"]),
    ("engine.py", "distributed_generate"): (
        3,
        [
            f"{E}::test_vllm_generator_loads_no_policy_and_answers_through_the_workers",
            f"{D}::test_single_process_shards_without_torchrun",
            TWO_RANK_METAAPO,
        ],
    ),
    ("engine.py", "distributed_generate.one_round"): (1, [TWO_RANK_METAAPO]),
    ("losses.py", "default_chunk_size"): (1, [f"{G}::test_precision_and_memory_choices_on_a_gpu"]),
    ("losses.py", "main"): (2, [f"{G}::test_the_kernel_self_check_covers_the_gpu"]),
    ("meta.py", "MetaController.update"): (1, ["tests/test_meta.py::test_two_process_gloo_update_keeps_phi_identical"]),
    ("plan.py", "sharded_gradients"): (
        2,
        [f"{D}::test_a_gpu_run_from_a_fresh_checkout_plans_after_building_the_toy"],
    ),
    ("plan.py", "dry_run"): (2, [f"{G}::test_the_dry_run_plans_for_this_gpu"]),
    ("plan.py", "export_bytes"): (1, [f"{G}::test_the_dry_run_plans_for_this_gpu"]),
    ("reward.py", "_distributed"): (1, [f"{R}::test_two_process_scoring_returns_every_score_in_order"]),
    ("reward.py", "RewardModel.from_pretrained"): (2, [f"{G}::test_the_scoring_cli_on_a_gpu_under_torchrun"]),
    ("reward.py", "RewardModel.score"): (1, [f"{R}::test_two_process_scoring_returns_every_score_in_order"]),
    ("reward.py", "main"): (4, [f"{G}::test_the_scoring_cli_on_a_gpu_under_torchrun"]),
    ("sample.py", "transformers_generate"): (1, [f"{G}::test_generation_forks_the_gpus_random_state"]),
    ("sample.py", "_distributed"): (1, [f"{S}::test_vllm_sharded_over_two_ranks"]),
    ("sample.py", "vllm_generate"): (1, [f"{S}::test_vllm_sharded_over_two_ranks"]),
    ("sample.py", "generate"): (1, [FAKE_VLLM]),
    ("sample.py", "_vllm_worker"): (2, [FAKE_VLLM]),
    ("sample.py", "main"): (3, [f"{G}::test_the_sampling_cli_on_a_gpu", FAKE_VLLM]),
}


def code_lines(source: str) -> dict[int, str]:
    """Each line's code without its comment; docstrings (a string standing as a statement) left out."""
    tree = ast.parse(source)
    docstrings = {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for line in range(node.lineno, node.end_lineno + 1)
    }
    lines = dict(enumerate(source.splitlines(), start=1))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines[token.start[0]] = lines[token.start[0]][: token.start[1]]
    return {number: code for number, code in lines.items() if number not in docstrings and code.strip()}


def functions(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, dotted name) of every function and class, nested ones inside."""
    spans = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                spans.append((child.lineno, child.end_lineno, prefix + child.name))
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return spans


def gpu_only_lines() -> dict[tuple[str, str], list[str]]:
    """{(file, innermost function): its GPU-only lines} over the project's modules (scripts/, the
    GPU check and the benchmarks, are the GPU side's own runners, and tests/ are tests)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("baselines/*.py")]):
        source = path.read_text()
        spans = functions(source)
        for number, code in code_lines(source).items():
            if GPU_ONLY.search(code):
                inner = min(
                    ((last - first, name) for first, last, name in spans if first <= number <= last), default=None
                )
                key = (str(path.relative_to(ROOT)), inner[1] if inner else "<module>")
                found.setdefault(key, []).append(f"{number}: {code.strip()}")
    return found


def test_every_gpu_only_line_is_listed_with_its_tests():
    found = gpu_only_lines()
    listed = {key: count for key, (count, _) in GPU_ONLY_LINES.items()}
    counted = {key: len(lines) for key, lines in found.items()}
    unlisted = {f"{f}:{name}": found[(f, name)] for f, name in counted.keys() - listed.keys()}
    assert not unlisted, f"GPU-only lines without a CPU test listed in GPU_ONLY_LINES: {unlisted}"
    changed = {
        f"{f}:{name}": (listed[(f, name)], found.get((f, name), []))
        for f, name in listed
        if listed[(f, name)] != counted.get((f, name), 0)
    }
    assert not changed, f"GPU-only lines changed since their tests were listed (listed count, lines now): {changed}"


def test_every_listed_test_exists():
    for _, tests in GPU_ONLY_LINES.values():
        for test in tests:
            path, name = test.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M), test


# ---------------------------------------------------------------------------------------------
# The lines no other test takes


@contextlib.contextmanager
def no_cuda_moves():
    """nn.Module.to / Tensor.to with a CUDA target do nothing (the CPU stands in for the GPU)."""
    module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to

    def cuda(args, kwargs):
        target = kwargs.get("device", args[0] if args else None)
        return str(target).startswith("cuda")

    torch.nn.Module.to = lambda self, *a, **k: self if cuda(a, k) else module_to(self, *a, **k)
    torch.Tensor.to = lambda self, *a, **k: self if cuda(a, k) else tensor_to(self, *a, **k)
    try:
        yield
    finally:
        torch.nn.Module.to, torch.Tensor.to = module_to, tensor_to


def test_rng_states_include_the_gpus(monkeypatch):
    """A checkpoint keeps the GPU's random state beside the CPU's and gives it back on resume."""
    gpu = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpu.update(state=state))
    saved = checkpoint.capture_rng()
    gpu["state"] = torch.tensor([9], dtype=torch.uint8)
    checkpoint.restore_rng(saved)
    assert torch.equal(gpu["state"], torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_precision_and_memory_choices_on_a_gpu(toy_dir, tmp_path, monkeypatch):
    """On a GPU: bf16 compute over fp32 master weights with fp32 gradient reductions; frozen models
    held in bf16; exports in bf16 unless told; the kernel's CUDA chunk; the allocator's cache given
    back when memory is released (before a vLLM child starts)."""
    gpu, cpu = engine.Runtime(device=torch.device("cuda", 0)), engine.Runtime()
    policy = engine.mixed_precision(gpu)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert engine.mixed_precision(cpu).param_dtype is None
    assert (
        engine.weights_dtype(gpu, trainable=False) == torch.bfloat16
        and engine.weights_dtype(gpu, True) == torch.float32
    )
    assert engine.weights_dtype(cpu, trainable=False) == torch.float32
    assert losses.default_chunk_size(gpu.device) == 256 and losses.default_chunk_size(cpu.device) == 512
    model, tokenizer = LlamaForCausalLM.from_pretrained(toy_dir), AutoTokenizer.from_pretrained(toy_dir)
    cfg = config.parse_config([f"--model={toy_dir}"])
    engine.export_hf(model, model, tokenizer, tmp_path / "export", cfg, gpu)
    assert {t.dtype for t in load_file(tmp_path / "export" / "model.safetensors").values()} == {torch.bfloat16}
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    engine.release_memory(None)
    assert emptied == [True]


def test_the_kernel_self_check_covers_the_gpu(monkeypatch):
    """`python losses.py` on a GPU machine checks the kernel on the CPU and on CUDA."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(losses, "_check_against_naive", lambda device: seen.append(device.type))
    monkeypatch.setattr(sys, "argv", ["losses.py"])
    losses.main()
    assert seen == ["cpu", "cuda"]


def test_the_dry_run_plans_for_this_gpu(monkeypatch, capsys):
    """--dry_run on a GPU without --gpu_memory_gb plans for that GPU's memory (an H200's 141 GiB
    here) and its disk for bf16 exports, and refuses a vLLM share too small for the engine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=141 * 2**30)
    )
    plan_8b = ["--model=tulu8b", f"--sft_model={ROOT / 'tests' / 'model_configs' / 'llama-3.1-tulu-3-8b-sft'}"]
    train.main([*plan_8b, "--dry_run", "--gpus=8"])
    printed = capsys.readouterr().out
    assert "plan for 8 GPU(s) of 141 GiB" in printed and "(bf16 exports)" in printed
    with pytest.raises(SystemExit, match="vLLM needs 16.5 GiB per GPU but gets 7.1"):
        train.main([*plan_8b, "--dry_run", "--gpus=8", "--gpu_memory_utilization=0.05"])


def test_the_scoring_cli_on_a_gpu_under_torchrun(toy_rm_dir, tmp_path, monkeypatch):
    """`torchrun reward.py` on GPUs: NCCL, the rank's own GPU, the reward model in bf16 there."""
    calls = []
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(reward.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(reward.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    loaded = reward.RewardModel.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        model = loaded(cls, path, *args, **kwargs)
        calls.append(("model", args[-1] if args else kwargs.get("device"), next(model.model.parameters()).dtype))
        return model

    monkeypatch.setattr(reward.RewardModel, "from_pretrained", classmethod(from_pretrained))
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "ascending : b a", "responses": ["a b", "b a"]}) + "\n")
    argv = ["reward.py", "--model", str(toy_rm_dir), "--input", str(tmp_path / "in.jsonl")]
    monkeypatch.setattr(sys, "argv", argv + ["--output", str(tmp_path / "out.jsonl")])
    with no_cuda_moves():
        reward.main()
        default = reward.RewardModel.from_pretrained(str(toy_rm_dir))  # no device given: the GPU
    assert calls[:3] == [("set_device", 1), ("init", "nccl"), ("model", "cuda:1", torch.bfloat16)]
    assert calls[3] == ("destroy",) and calls[4] == ("model", None, torch.bfloat16) and default is not None
    rewards = json.loads((tmp_path / "out.jsonl").read_text())["rewards"]
    assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)


def test_the_sampling_cli_on_a_gpu(toy_dir, tmp_path, monkeypatch):
    """`python sample.py` with the transformers backend on a GPU loads the model there in bf16."""
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "ascending : b a"}) + "\n")
    argv = ["sample.py", "--model", str(toy_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--n", "2"]
    monkeypatch.setattr(sys, "argv", argv + ["--max_new_tokens", "4", "--output", str(tmp_path / "out.jsonl")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dtypes = []
    generate = sample.transformers_generate
    monkeypatch.setattr(
        sample,
        "transformers_generate",
        lambda model, *args: dtypes.append(model.dtype) or generate(model, *args),
    )
    with no_cuda_moves():
        sample.main()
    assert dtypes == [torch.bfloat16]
    assert len(json.loads((tmp_path / "out.jsonl").read_text())["responses"]) == 2


def test_generation_forks_the_gpus_random_state(toy_dir, monkeypatch):
    """Generation seeds its own random streams on the model's GPU and gives the training's back:
    fork_rng gets that GPU (not every visible one: eight ranks would each start a context on
    every GPU of the node)."""
    forked = []

    @contextlib.contextmanager
    def fork_rng(devices, **kwargs):
        forked.append(list(devices))
        yield

    model = LlamaForCausalLM.from_pretrained(toy_dir)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 3)))
    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    tokenizer = AutoTokenizer.from_pretrained(toy_dir)
    with no_cuda_moves():
        out = sample.transformers_generate(model, tokenizer, [[5, 6, 7]], 2, 1.0, 1.0, 4, 0)
    assert forked == [[torch.device("cuda", 3)]] and len(out[0]) == 2


def test_ppo_generates_with_vllm_from_the_exported_actor(base_run, fake_vllm, tmp_path):
    """PPO with the vLLM generator exports the current actor before each rollout and the workers
    generate from that export (the vLLM stand-in here)."""
    out = fresh_run(base_run, tmp_path)
    ppo = ["--method=ppo", "--rollout_batch_size=32", "--generator=vllm", "--max_train_pairs=64"]
    run_train(ppo + [a for a in TINY if not a.startswith("--max_train_pairs")] + [f"--out_dir={out}"])
    calls = [json.loads(line) for line in (fake_vllm / "gpu0.jsonl").read_text().splitlines()]
    assert {c["llm"]["model"] for c in calls} == {str(out / "ppo" / "rollout_actor")}
    assert sum(len(c["prompts"]) for c in calls) == 64  # two rollouts of 32 prompts
    assert [r["rollout"] for r in metrics(out / "ppo" / "metrics.jsonl") if r.get("phase") == "generate"] == [1, 2]
