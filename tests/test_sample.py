"""sample.py: transformers generation, the vLLM worker glue (through a stand-in vllm module), and
online pair construction."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import sample
from data import encode_prompt
from reward import RuleReward
from sample import Generation, generate, make_online_pairs, vllm_child_environment

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [
    [{"role": "user", "content": p}] for p in ["ascending : c a b", "descending : j e f g h i", "ascending : d b"]
]


@pytest.fixture
def policy(toy_dir):
    return LlamaForCausalLM.from_pretrained(toy_dir)


def prompts_for(tokenizer):
    return [encode_prompt(tokenizer, m) for m in MESSAGES]


def test_shapes_eos_and_finish_reasons(policy, toy_tokenizer):
    eos = toy_tokenizer.eos_token_id
    results = generate(
        prompts_for(toy_tokenizer),
        n=4,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=6,
        seed=0,
        model=policy,
        tokenizer=toy_tokenizer,
    )
    assert len(results) == 3 and all(len(r) == 4 for r in results)
    for generation in (g for r in results for g in r):
        if generation.finish_reason == "stop":
            assert generation.token_ids[-1] == eos and eos not in generation.token_ids[:-1]
            assert generation.text == toy_tokenizer.decode(generation.token_ids[:-1], skip_special_tokens=True)
        else:
            assert (
                generation.finish_reason == "length"
                and len(generation.token_ids) == 6
                and eos not in generation.token_ids
            )


def test_eos_stops_and_length_cuts(policy, toy_tokenizer):
    eos = toy_tokenizer.eos_token_id
    shift = torch.zeros(policy.config.vocab_size)
    hook = policy.lm_head.register_forward_hook(lambda module, inputs, logits: logits + shift)
    try:
        shift[eos] = 50.0  # EOS is certain: every answer is just EOS
        stops = generate(
            prompts_for(toy_tokenizer),
            n=2,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=5,
            seed=0,
            model=policy,
            tokenizer=toy_tokenizer,
        )
        shift[eos] = -50.0  # EOS is impossible: every answer runs to the limit
        cuts = generate(
            prompts_for(toy_tokenizer),
            n=2,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=5,
            seed=0,
            model=policy,
            tokenizer=toy_tokenizer,
        )
    finally:
        hook.remove()
    assert all(g == Generation([eos], "", "stop") for r in stops for g in r)
    assert all(
        g.finish_reason == "length" and len(g.token_ids) == 5 and eos not in g.token_ids for r in cuts for g in r
    )


def test_deterministic_for_a_seed_and_leaves_the_rng_alone(policy, toy_tokenizer):
    prompts = prompts_for(toy_tokenizer)

    def run(seed):
        return [
            [g.token_ids for g in r]
            for r in generate(prompts, 4, 1.0, 1.0, 8, seed, model=policy, tokenizer=toy_tokenizer)
        ]

    torch.manual_seed(123)
    first = run(7)
    after_generation = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_generation)  # the global RNG is untouched
    assert run(7) == first and run(8) != first


def test_train_mode_is_restored(policy, toy_tokenizer):
    for mode in (True, False):
        policy.train(mode)
        generate(prompts_for(toy_tokenizer)[:1], 1, 1.0, 1.0, 3, 0, model=policy, tokenizer=toy_tokenizer)
        assert policy.training is mode


def test_left_padding_matches_unbatched_greedy(policy, toy_tokenizer):
    prompts = prompts_for(toy_tokenizer)
    model = policy.double()
    together = generate(prompts, 1, 0.0, 1.0, 8, 0, model=model, tokenizer=toy_tokenizer, batch_size=3)
    alone = [generate([p], 1, 0.0, 1.0, 8, 0, model=model, tokenizer=toy_tokenizer)[0] for p in prompts]
    assert [r[0].token_ids for r in together] == [r[0].token_ids for r in alone]


def test_greedy_with_several_answers_repeats_one(policy, toy_tokenizer):
    """transformers refuses num_return_sequences > 1 without sampling; greedy answers are generated once."""
    prompts = prompts_for(toy_tokenizer)
    several = generate(prompts, 3, 0.0, 1.0, 8, 0, model=policy, tokenizer=toy_tokenizer)
    single = generate(prompts, 1, 0.0, 1.0, 8, 0, model=policy, tokenizer=toy_tokenizer)
    assert [len(r) for r in several] == [3, 3, 3]
    assert all(g == s[0] for r, s in zip(several, single) for g in r)


def test_the_checkpoints_own_generation_config_does_not_leak(policy, toy_tokenizer):
    """generate() fills unset fields from model.generation_config (e.g. Qwen's repetition_penalty 1.05)."""
    prompts = prompts_for(toy_tokenizer)
    for temperature in (1.0, 0.0):
        plain = generate(prompts, 2, temperature, 1.0, 8, 3, model=policy, tokenizer=toy_tokenizer)
        own = policy.generation_config
        own.repetition_penalty, own.no_repeat_ngram_size, own.min_new_tokens, own.suppress_tokens = (
            100.0,
            1,
            8,
            [toy_tokenizer.eos_token_id],
        )
        try:
            assert generate(prompts, 2, temperature, 1.0, 8, 3, model=policy, tokenizer=toy_tokenizer) == plain
            assert policy.generation_config is own  # put back after the call
        finally:
            own.repetition_penalty = own.no_repeat_ngram_size = own.min_new_tokens = own.suppress_tokens = None


def test_top_p_under_deterministic_algorithms(policy, toy_tokenizer, monkeypatch):
    """N8: torch raises on a floating-point cumsum on CUDA under use_deterministic_algorithms, and
    transformers' top-p takes one, so --deterministic with top_p < 1 stopped at the first sampled
    token. Under it top-p sums in integers (sample.deterministic_top_p): the same tokens kept as
    transformers' warper on random logits, and generation runs with CUDA's refusal emulated here."""
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(64, 1000, dtype=torch.float64) * 3
    for top_p in (0.5, 0.9, 0.95, 0.99):
        ours, theirs = sample.deterministic_top_p(top_p)(None, scores), TopPLogitsWarper(top_p)(None, scores)
        assert torch.equal(ours.isinf(), theirs.isinf()) and 0 < ours.isinf().float().mean() < 1

    cumsum = torch.Tensor.cumsum

    def cuda_cumsum(self, *args, **kwargs):  # what torch does on CUDA in deterministic mode
        if torch.are_deterministic_algorithms_enabled() and (self.is_floating_point() or self.is_complex()):
            raise RuntimeError("cumsum_cuda_kernel does not have a deterministic implementation")
        return cumsum(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cumsum", cuda_cumsum)
    prompts = prompts_for(toy_tokenizer)
    torch.use_deterministic_algorithms(True)
    try:
        first = generate(prompts, 4, 1.0, 0.9, 8, 7, model=policy, tokenizer=toy_tokenizer)
        again = generate(prompts, 4, 1.0, 0.9, 8, 7, model=policy, tokenizer=toy_tokenizer)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [[g.token_ids for g in r] for r in first] == [[g.token_ids for g in r] for r in again]


def test_no_top_k_filter():
    """transformers' default top_k=50 would cut a flat distribution over 200 tokens to 50."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(200)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w199", pad_token="w198")
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=200,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            eos_token_id=199,
            pad_token_id=198,
        )
    )
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution
    results = generate(
        [[1, 2, 3]], n=64, temperature=1.0, top_p=1.0, max_new_tokens=20, seed=0, model=model, tokenizer=tokenizer
    )
    distinct = {t for g in results[0] for t in g.token_ids}
    assert len(distinct) > 100


def test_unknown_backend_and_missing_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        generate([[1]], 1, 1.0, 1.0, 2, 0, backend="tgi")
    with pytest.raises(ValueError, match="needs the model and its tokenizer"):
        generate([[1]], 1, 1.0, 1.0, 2, 0)
    with pytest.raises(ValueError, match="needs model_path"):
        generate([[1]], 1, 1.0, 1.0, 2, 0, backend="vllm")


def test_sample_cli(toy_dir, tmp_path):
    rows = [{"prompt": "ascending : c a b", "id": "a"}, {"prompt_token_ids": [4, 6, 7, 15, 5]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run(
        [
            sys.executable,
            "sample.py",
            "--model",
            str(toy_dir),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--n",
            "2",
            "--max_new_tokens",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["id"] == "a" and all(len(r["responses"]) == 2 for r in out)
    assert {"token_ids", "text", "finish_reason"} == set(out[1]["responses"][0])


# ---------------------------------------------------------------------------------------------
# The vLLM glue, through a stand-in `vllm` package placed on the child's path


def expected_generation(prompt, j, max_tokens):
    token = 10 + (sum(prompt) + j) % 7
    if j % 3 == 2:
        return Generation([token] * max_tokens, f"t{token}", "length")
    return Generation([token, 2], f"t{token}", "stop")  # ends with its stop token


PROMPTS = [[3, 4, 5], [4, 9], [7, 7, 7, 8], [5], [6, 10, 11]]


def recorded(record_dir, gpu):
    """What the stand-in engine on one GPU was given, its generate calls joined:
    (llm kwargs, sampling, prompts, env, calls)."""
    calls = [json.loads(line) for line in (record_dir / f"gpu{gpu}.jsonl").read_text().splitlines()]
    return {
        "llm": calls[0]["llm"],
        "sampling": [s for c in calls for s in c["sampling"]],
        "prompts": [p for c in calls for p in c["prompts"]],
        "env": calls[0]["env"],
        "calls": len(calls),
    }


def test_vllm_worker_arguments_and_results(fake_vllm, toy_dir, tmp_path, monkeypatch):
    for name, value in {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "MASTER_ADDR": "10.0.0.1",
        "TORCHELASTIC_RUN_ID": "x",
        "LOCAL_RANK": "1",
        "CUDA_VISIBLE_DEVICES": "4,5",
        "VLLM_PORT": "12345",  # a user's: eight children would bind this one port
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # the training process's allocator, not vLLM's
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache"),
    }.items():
        monkeypatch.setenv(name, value)  # as torchrun would set them (no process group here)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # torch sets it once inductor ran in this process
    results = generate(
        PROMPTS,
        n=3,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=4,
        seed=11,
        backend="vllm",
        model_path=str(toy_dir),
        workdir=tmp_path / "work",
        gpu_memory_utilization=0.4,
    )
    assert results == [[expected_generation(p, j, 4) for j in range(3)] for p in PROMPTS]
    record = recorded(fake_vllm, 5)
    # CUDA graphs on, and a context of the longest prompt (4 tokens) + max_new_tokens
    assert record["llm"] == {
        "model": str(toy_dir),
        "dtype": "bfloat16",
        "tensor_parallel_size": 1,
        "enforce_eager": False,
        "gpu_memory_utilization": 0.4,
        "seed": 11,
        "max_model_len": 4 + 4,
    }
    # one SamplingParams per prompt: prompt i's n samples get seeds 11 + 3i, 11 + 3i + 1, ... (vLLM adds the sample's
    # number);
    # no top-k filter (0 in vLLM 0.33), the template's end of turn (the toy's <eos>, id 2) as a stop token
    assert record["sampling"] == [
        {
            "n": 3,
            "temperature": 0.8,
            "top_p": 0.95,
            "top_k": 0,
            "max_tokens": 4,
            "seed": 11 + 3 * i,
            "stop_token_ids": [2],
        }
        for i in range(len(PROMPTS))
    ]
    assert record["prompts"] == [{"prompt_token_ids": p} for p in PROMPTS]
    assert record["env"] == {
        "CUDA_VISIBLE_DEVICES": "5",
        "RANK": None,
        "WORLD_SIZE": None,
        "MASTER_ADDR": None,
        "LOCAL_RANK": None,
        "TORCHELASTIC_RUN_ID": None,
        "VLLM_PORT": None,
        "PYTORCH_CUDA_ALLOC_CONF": None,
        # compile caches of the rank's own: eight children never write one cache file together
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache" / "rank1"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "vllm_cache" / "inductor" / "rank1"),
        "FAKE_VLLM_INTERPRETER": None,  # this interpreter (--vllm_python unset)
    }


def test_vllm_generation_killed_mid_way_keeps_its_finished_chunks(fake_vllm, toy_dir, tmp_path, monkeypatch):
    prompts = [[i, i + 1] for i in range(10)]
    args = dict(
        n=2,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=4,
        seed=7,
        backend="vllm",
        model_path=str(toy_dir),
        workdir=tmp_path / "work",
    )
    monkeypatch.setenv("FAKE_VLLM_DIE_AT_CALL", "3")  # killed during its third chunk (of 4: 3, 3, 3, 1 prompts)
    with pytest.raises(RuntimeError, match="the vLLM worker exited with status 137"):
        generate(prompts, **args)
    assert recorded(fake_vllm, 0)["calls"] == 2
    monkeypatch.delenv("FAKE_VLLM_DIE_AT_CALL")
    (fake_vllm / "gpu0.jsonl").unlink()
    results = generate(prompts, **args)
    assert recorded(fake_vllm, 0)["prompts"] == [{"prompt_token_ids": p} for p in prompts[6:]]  # only what was lost
    assert results == [[expected_generation(p, j, 4) for j in range(2)] for p in prompts]  # as one uninterrupted call
    # another request (another seed) in the same directory starts afresh
    (fake_vllm / "gpu0.jsonl").unlink()
    generate(prompts, **{**args, "seed": 8})
    assert len(recorded(fake_vllm, 0)["prompts"]) == 10


def test_vllm_workers_stopped_by_a_signal_keep_their_finished_chunks(fake_vllm, toy_dir, tmp_path, monkeypatch):
    """should_stop() turning true (train.py: a SIGTERM or SIGINT) while the worker generates: it is
    terminated within a second, GenerationStopped is raised, and the chunks it finished stay for the
    next call of the same request, which generates only the rest."""
    prompts = [[i, i + 1] for i in range(10)]
    args = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=7, backend="vllm", model_path=str(toy_dir))
    work = tmp_path / "work"
    monkeypatch.setenv("FAKE_VLLM_SECONDS_PER_CALL", "2")  # each of the 4 chunks
    output = work / "vllm" / "rank0" / "generations.jsonl"

    def should_stop():  # once the first chunk is on disk
        return output.exists() and bool(output.read_text())

    with pytest.raises(sample.GenerationStopped, match="finished chunks are kept"):
        generate(prompts, **args, workdir=work / "vllm", should_stop=should_stop)
    assert recorded(fake_vllm, 0)["calls"] <= 2 and len(output.read_text().splitlines()) == 3
    monkeypatch.delenv("FAKE_VLLM_SECONDS_PER_CALL")
    (fake_vllm / "gpu0.jsonl").unlink()
    results = generate(prompts, **args, workdir=work / "vllm")
    assert recorded(fake_vllm, 0)["prompts"] == [{"prompt_token_ids": p} for p in prompts[3:]]  # only the rest
    assert results == [[expected_generation(p, j, 4) for j in range(2)] for p in prompts]


def test_vllm_greedy_with_several_answers_and_eager_mode(fake_vllm, toy_dir, tmp_path):
    """vLLM 0.33 refuses greedy sampling with n > 1: the worker asks for one answer and repeats it."""
    results = generate(
        PROMPTS[:2],
        n=3,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=4,
        seed=5,
        backend="vllm",
        model_path=str(toy_dir),
        workdir=tmp_path / "work",
        enforce_eager=True,
        max_model_len=64,
    )
    record = recorded(fake_vllm, 0)
    assert (
        [s["n"] for s in record["sampling"]] == [1, 1]
        and record["llm"]["enforce_eager"] is True
        and record["llm"]["max_model_len"] == 64
    )
    assert all(r == [expected_generation(p, 0, 4)] * 3 for r, p in zip(results, PROMPTS[:2]))


def test_child_environment_without_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    env = vllm_child_environment(3)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and "MASTER_PORT" not in env


def test_vllm_with_no_prompts_returns_nothing_and_starts_no_engine(fake_vllm, toy_dir, tmp_path):
    """A MetaAPO iteration whose gate selects nothing, or a static iteration of the boundary method:
    an empty list back, no worker, no engine (the context length of no prompt is undefined)."""
    assert generate([], 8, 1.0, 1.0, 4, 0, backend="vllm", model_path=str(toy_dir), workdir=tmp_path / "work") == []
    assert not list(fake_vllm.iterdir()) and not (tmp_path / "work").exists()


def test_vllm_child_runs_the_given_interpreter(fake_vllm, toy_dir, tmp_path):
    """--vllm_python: the child runs another environment's interpreter (here a wrapper that marks
    its environment), e.g. a venv whose vLLM pins another torch than training's."""
    python = tmp_path / "vllm-venv" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nFAKE_VLLM_INTERPRETER=vllm-venv exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    results = generate(
        PROMPTS[:2],
        2,
        1.0,
        1.0,
        4,
        3,
        backend="vllm",
        model_path=str(toy_dir),
        workdir=tmp_path / "w",
        vllm_python=str(python),
    )
    assert len(results) == 2 and recorded(fake_vllm, 0)["env"]["FAKE_VLLM_INTERPRETER"] == "vllm-venv"


def test_vllm_worker_failure_is_a_clear_error(fake_vllm, toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL_SEED", "11")
    with pytest.raises(
        RuntimeError,
        match="(?s)vLLM generation failed; no result is used.*rank 0: the vLLM worker exited with status 1.*CUDA out "
        "of memory",
    ):
        generate(PROMPTS, 3, 1.0, 1.0, 4, 11, backend="vllm", model_path=str(toy_dir), workdir=tmp_path / "work")


def test_vllm_incomplete_output_is_an_error(fake_vllm, toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_DROP", "1")
    with pytest.raises(RuntimeError, match="incomplete \\(3 prompts missing\\)"):  # the last of each of 3 chunks
        generate(PROMPTS, 3, 1.0, 1.0, 4, 11, backend="vllm", model_path=str(toy_dir), workdir=tmp_path / "work")


def test_vllm_not_installed(toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    with pytest.raises(RuntimeError, match="needs vLLM installed"):
        generate(PROMPTS, 1, 1.0, 1.0, 4, 0, backend="vllm", model_path=str(toy_dir), workdir=tmp_path / "work")


def _vllm_two_ranks(rank, world_size, init_file, toy_dir, workdir, out_dir, broken_rank=None):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    if rank == broken_rank:  # the glue itself fails on this rank, before the worker starts

        def unwritable(path, rows):
            raise PermissionError(f"[Errno 13] Permission denied: '{path}'")

        sample.write_jsonl = unwritable
    try:
        try:
            results = generate(PROMPTS, 3, 1.0, 1.0, 4, 20, backend="vllm", model_path=toy_dir, workdir=workdir)
            outcome = {"results": [[[g.token_ids, g.text, g.finish_reason] for g in r] for r in results]}
        except RuntimeError as err:
            outcome = {"error": str(err)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(outcome, f)
    finally:
        dist.destroy_process_group()


def test_vllm_sharded_over_two_ranks(fake_vllm, toy_dir, tmp_path):
    mp.spawn(
        _vllm_two_ranks,
        args=(2, str(tmp_path / "init"), str(toy_dir), str(tmp_path / "work"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    expected = [[[*vars(expected_generation(p, j, 4)).values()] for j in range(3)] for p in PROMPTS]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"results": expected}
    shares = {rank: recorded(fake_vllm, rank) for rank in (0, 1)}
    assert [p["prompt_token_ids"] for p in shares[0]["prompts"]] == PROMPTS[0::2]  # strided shares
    assert [p["prompt_token_ids"] for p in shares[1]["prompts"]] == PROMPTS[1::2]
    assert shares[0]["env"]["CUDA_VISIBLE_DEVICES"] == "0" and shares[1]["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    # the seeds follow the prompts' global positions, as in one process: nothing depends on the number of ranks
    assert [p["seed"] for p in shares[0]["sampling"]] == [20, 26, 32] and [
        p["seed"] for p in shares[1]["sampling"]
    ] == [23, 29]
    assert shares[0]["llm"]["seed"] == shares[1]["llm"]["seed"] == 20


def test_vllm_failure_on_one_rank_stops_both(fake_vllm, toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL_GPU", "1")  # rank 1's worker fails
    mp.spawn(
        _vllm_two_ranks,
        args=(2, str(tmp_path / "init"), str(toy_dir), str(tmp_path / "work"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "results" not in outcome and "rank 1: the vLLM worker exited" in outcome["error"]


def test_vllm_glue_failure_on_one_rank_stops_both(fake_vllm, toy_dir, tmp_path):
    """An exception on one rank before the collective must not leave the other rank waiting in it."""
    mp.spawn(
        _vllm_two_ranks,
        args=(2, str(tmp_path / "init"), str(toy_dir), str(tmp_path / "work"), str(tmp_path), 1),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "results" not in outcome and "no result is used" in outcome["error"]
        assert (
            "rank 1: PermissionError: [Errno 13] Permission denied" in outcome["error"]
            and "rank 0" not in outcome["error"]
        )


# ---------------------------------------------------------------------------------------------
# Online pairs

LENGTH_REWARD = RuleReward(lambda prompt, response: float(len(response.split())), "length")


def gen(text, finish="stop"):
    return Generation(list(range(len(text.split()))) + [2], text, finish)


def test_best_is_chosen_and_worst_is_rejected():
    generations = [
        [gen("a b"), gen("a b c d"), gen("a"), gen("a b c")],
        [gen("x y"), gen("x z")],  # all equal rewards: no pair
        [gen("p q r s t", "length"), gen("p")],
    ]
    pairs, stats = make_online_pairs(MESSAGES, generations, LENGTH_REWARD)
    assert (pairs[0].chosen.text, pairs[0].rejected.text) == ("a b c d", "a")
    assert (pairs[0].chosen_reward, pairs[0].rejected_reward) == (4.0, 1.0)
    assert pairs[1] is None and stats.all_equal == 1
    assert pairs[2].chosen.truncated and pairs[2].chosen.text == "p q r s t"  # cut answers stay candidates
    assert stats.truncated_candidates == 1 and stats.pairs == 2 and stats.prompts == 3
    assert len(stats.rewards) == 8 and stats.offline_chosen == 0


def test_pairs_made_in_pieces_are_those_made_at_once():
    """train.py annotates in pieces of prompts (kept as they finish): the pairs and the combined
    counts equal one call's."""
    generations = [
        [gen("a b"), gen("a b c d"), gen("a"), gen("a b c")],
        [gen("x y"), gen("x z")],
        [gen("p q r s t", "length"), gen("p")],
    ]
    whole = make_online_pairs(MESSAGES, generations, LENGTH_REWARD)
    parts = [make_online_pairs(MESSAGES[:2], generations[:2], LENGTH_REWARD)]
    parts.append(make_online_pairs(MESSAGES[2:], generations[2:], LENGTH_REWARD))
    assert [p for pairs, _ in parts for p in pairs] == whole[0]
    assert sample.PairStats.combined([stats for _, stats in parts]) == whole[1]


def test_candidates_cut_at_the_length_limit_are_scored_as_unfinished():
    seen = {}

    class Recording:
        def score(self, prompts, responses, complete=None):
            seen.update(zip(responses, complete))
            return [float(len(r)) for r in responses]

    generations = [[gen("a b"), gen("a b c d", "length")]]
    make_online_pairs(MESSAGES[:1], generations, Recording(), offline=[(("a b c", [1, 2, 2]), ("c", [3, 2]))])
    assert seen == {"a b": True, "a b c d": False, "a b c": True, "c": True}


def test_selm_pool_includes_the_offline_answers():
    generations = [[gen("a b"), gen("a b c")], [gen("x y z"), gen("x")]]
    offline = [
        (("a b c d e", [9, 9, 9, 9, 9, 2]), ("a", [9, 2])),  # both offline answers outrank the generations
        (("x y", [8, 8, 2]), ("x y", [8, 8, 2])),
    ]  # both between the generations
    pairs, stats = make_online_pairs(MESSAGES[:2], generations, LENGTH_REWARD, offline=offline)
    assert pairs[0].chosen.source == "offline" and pairs[0].chosen.token_ids == [9, 9, 9, 9, 9, 2]
    assert pairs[0].rejected.source == "offline" and pairs[0].rejected.text == "a"
    assert pairs[1].chosen.source == "online" and (pairs[1].chosen.text, pairs[1].rejected.text) == ("x y z", "x")
    assert stats.offline_chosen == 1 and stats.offline_rejected == 1
    assert len(stats.rewards) == 4  # online candidates only
