"""The baselines as their authors and TRL define them: each loss against an independent
transcription of TRL's formula (DPO/cDPO, IPO, SimPO, KTO, SLiC via CPO's hinge) and SELM's,
train.py's wiring of KTO (z0 over the global batch from mismatched pairs, TRL's per-example
mean) and SELM (the optimism term), GAE by hand, Selective DPO's reference runs and curriculum,
and PPO on one and two processes and after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import config
import dpo
import engine
import losses
import train
from baselines import ppo
from conftest import TINY, fresh_run, metrics, run_train

ROOT = Path(__file__).resolve().parent.parent
torch.manual_seed(0)
B = 6
PC, PR, RC, RR = (-torch.rand(B, dtype=torch.float64) * 20 for _ in range(4))  # summed log-probs
LC, LR = torch.randint(3, 12, (B,)).double(), torch.randint(3, 12, (B,)).double()  # response lengths


# TRL's definitions, written out independently (trl 0.28 DPOTrainer / 1.16 CPOTrainer and KTOTrainer)
def trl_dpo(beta, ls):  # loss_type="sigmoid" with label_smoothing (cDPO)
    logits = (PC - PR) - (RC - RR)
    return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls


def trl_ipo(beta):  # loss_type="ipo": log-ratios averaged over each response's tokens
    return ((PC / LC - PR / LR) - (RC / LC - RR / LR) - 1 / (2 * beta)) ** 2


def trl_simpo(beta, gamma):  # CPOTrainer loss_type="simpo", cpo_alpha=0 (TRL's simpo_gamma is the margin itself)
    return -F.logsigmoid(beta * (PC / LC - PR / LR) - gamma)


def trl_cpo_hinge(
    beta, cpo_alpha
):  # CPOTrainer loss_type="hinge" + cpo_alpha * NLL (a token mean of the chosen answer)
    return torch.relu(1 - beta * (PC - PR)) + cpo_alpha * (-PC / LC)


def trl_kto(policy, ref, desirable, z0, beta, dw, uw):  # per example; the batch loss is their mean
    ratio = policy - ref
    return torch.where(
        desirable, dw * (1 - torch.sigmoid(beta * (ratio - z0))), uw * (1 - torch.sigmoid(beta * (z0 - ratio)))
    )


def test_losses_match_trl_definitions():
    torch.testing.assert_close(losses.dpo_loss(PC, PR, RC, RR, 0.1, 0.2).losses, trl_dpo(0.1, 0.2))
    torch.testing.assert_close(
        losses.ipo_loss(PC, PR, RC, RR, 0.1, LC, LR).losses, trl_ipo(0.1)
    )  # TRL's length-averaged form
    assert losses.ipo_loss(PC, PR, RC, RR, 0.1).losses[0].item() == pytest.approx(
        ((PC - PR - RC + RR)[0] - 5).item() ** 2
    )  # summed (default)
    torch.testing.assert_close(losses.simpo_loss(PC / LC, PR / LR, 2.5, 0.6).losses, trl_simpo(2.5, 0.6))
    # SLiC-HF's hinge with delta 1 is CPO's hinge with beta 1; its NLL as TRL takes it with slic_nll=mean
    torch.testing.assert_close(losses.slic_loss(PC, PR, 1.0, 0.1, LC).losses, trl_cpo_hinge(1.0, 0.1))
    torch.testing.assert_close(
        losses.slic_loss(PC, PR, 1.0, 0.1).losses, torch.relu(1 - (PC - PR)) - 0.1 * PC
    )  # SLiC-HF: summed NLL
    desirable = torch.tensor([True, False] * 3)
    torch.testing.assert_close(
        losses.kto_loss(PC, RC, desirable, torch.tensor(0.3, dtype=torch.float64), 0.1, 1.0, 1.5).losses,
        trl_kto(PC, RC, desirable, 0.3, 0.1, 1.0, 1.5),
    )
    # SELM (shenao-zhang/SELM optimistic_dpo_loss): -logsigmoid(beta * logits) + alpha * beta * (log pi(y) - log
    # pi_ref(y))
    own, ref_own = -torch.rand(B, dtype=torch.float64) * 20, -torch.rand(B, dtype=torch.float64) * 20
    selm = losses.dpo_loss(PC, PR, RC, RR, 0.1).losses + losses.selm_optimism(own, ref_own, 0.001, 0.1)
    torch.testing.assert_close(selm, -F.logsigmoid(0.1 * ((PC - PR) - (RC - RR))) + 0.001 * 0.1 * (own - ref_own))


# ---------------------------------------------------------------------------------------------
# train.py's wiring, with a stand-in model whose "log-prob" of a sequence is a known function


class Stand(nn.Module):
    """log pi(answer | prompt) := scale * (sum(answer) - 0.5 * sum(prompt)) / 10, recording what it read."""

    def __init__(self, scale):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.seen = []

    def value(self, prompt, answer):
        return self.scale * (sum(answer) - 0.5 * sum(prompt)) / 10

    def forward(self, input_ids, attention_mask, response_mask):
        out = []
        for ids, mask in zip(input_ids.tolist(), response_mask.tolist()):
            prompt = ids[: mask.index(True)]  # right-padded: the prompt, then the answer's positions
            answer = [t for t, m in zip(ids, mask) if m]
            self.seen.append((tuple(prompt), tuple(answer)))
            out.append(self.value(prompt, answer))
        return torch.stack(out)


def pair(i):
    return dpo.PolicyPair(
        prompt_ids=[1, i + 2], chosen_ids=[10 + i, 3], rejected_ids=[20 + i, 4, 5], index=i, own_ids=[30 + i, 3]
    )


def test_kto_reference_point_and_scaling_as_trl():
    cfg = config.parse_config(["--method=kto", "--beta=0.1"])
    rt = engine.Runtime()
    batch = [pair(i) for i in range(4)]
    policy, ref = Stand(1.0), Stand(0.7)
    z0 = dpo.kto_reference_point(batch, policy, ref, cfg, rt)
    examples = [(p.prompt_ids, p.chosen_ids) for p in batch] + [(p.prompt_ids, p.rejected_ids) for p in batch]
    mismatched = [(examples[j][0], examples[j - 1][1]) for j in range(8)]  # TRL: example i with completion i - 1
    expected = sum(policy.value(x, y) - ref.value(x, y) for x, y in mismatched) / 8
    assert z0.item() == pytest.approx(max(0.0, expected.item()), rel=1e-5)
    own = {(tuple(p.prompt_ids), tuple(a)) for p in batch for a in (p.chosen_ids, p.rejected_ids)}
    assert not own & set(policy.seen)  # never an answer with its own prompt
    # the batch loss is the mean over every answer (2 per pair), as TRL's
    loss_fn = dpo.make_preference_loss(cfg, "kto", policy, ref, rt, {"z0": z0})
    loss, _ = loss_fn(batch, torch.ones(4), 4, 1)
    pol = torch.stack(
        [policy.value(p.prompt_ids, a) for p in batch for a in (p.chosen_ids,)]
        + [policy.value(p.prompt_ids, p.rejected_ids) for p in batch]
    )
    rf = torch.stack(
        [ref.value(p.prompt_ids, p.chosen_ids) for p in batch]
        + [ref.value(p.prompt_ids, p.rejected_ids) for p in batch]
    )
    expected_loss = trl_kto(pol, rf, torch.arange(8) < 4, z0, 0.1, 1.0, 1.0).mean()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert dpo.kto_reference_point(batch[:1], policy, ref, cfg, rt).item() == 0.0  # one pair: no other prompt


def test_selm_optimism_wiring():
    cfg = config.parse_config(["--method=selm", "--beta=0.1", "--selm_alpha=0.001"])
    batch = [pair(i) for i in range(3)]
    policy, ref = Stand(1.0), Stand(0.5)
    loss_fn = dpo.make_preference_loss(cfg, "dpo", policy, ref, engine.Runtime(), optimism=0.001)
    loss, _ = loss_fn(batch, torch.ones(3), 3, 1)
    per_pair = [
        -F.logsigmoid(
            0.1
            * (
                (policy.value(p.prompt_ids, p.chosen_ids) - ref.value(p.prompt_ids, p.chosen_ids))
                - (policy.value(p.prompt_ids, p.rejected_ids) - ref.value(p.prompt_ids, p.rejected_ids))
            )
        )
        + 0.001 * 0.1 * (policy.value(p.prompt_ids, p.own_ids) - ref.value(p.prompt_ids, p.own_ids))
        for p in batch
    ]
    assert loss.item() == pytest.approx(torch.stack(per_pair).mean().item(), rel=1e-5)


def test_gae_by_hand():
    advantages, returns = ppo.gae([0.0, 0.0, 1.0], [0.5, 0.4, 0.2], gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.2
    d1 = 0.0 + 0.2 - 0.4
    d0 = 0.0 + 0.4 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    assert advantages == pytest.approx([d0 + 0.5 * a1, a1, a2])
    assert returns == pytest.approx([a + v for a, v in zip(advantages, [0.5, 0.4, 0.2])])


# ---------------------------------------------------------------------------------------------
# Selective DPO and PPO through train.py


def test_selective_dpo_as_the_original(base_run, tmp_path, monkeypatch):
    out = fresh_run(base_run, tmp_path)
    monkeypatch.chdir(ROOT)
    trained = {}
    real = engine.optimize

    def recording(stage, *args, **kwargs):
        trained[stage.name] = [[item.index for item in batch] for batch in args[3]]
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(dpo, "optimize", recording)  # what run_offline calls
    small = [a for a in TINY if not a.startswith("--max_train_pairs")] + ["--max_train_pairs=64"]
    train.main(
        ["--method=selective_dpo", f"--out_dir={out}", "--selective_seeds=2", "--selective_checkpoints=2"] + small
    )
    runs = [f"selective_dpo/seed{s}-half{k}" for s in (0, 1) for k in (0, 1)]
    assert set(trained) == set(runs) | {"selective_dpo/final"}
    difficulty = {}
    for run in runs:
        validation = json.loads((out / run / "validation.json").read_text())
        steps = len(trained[run])
        assert sorted(map(int, validation)) == [steps // 2, steps]  # two evenly spaced checkpoints
        seen = {i for batch in trained[run] for i in batch}
        for losses_at_step in validation.values():
            assert not seen & set(map(int, losses_at_step))  # scored by a model that did not see them
            for index, value in losses_at_step.items():
                difficulty.setdefault(int(index), []).append(value)
    assert all(len(values) == 2 * 2 for values in difficulty.values())  # 2 seeds x 2 checkpoints each
    mean = {i: sum(v) / len(v) for i, v in difficulty.items()}
    final = [i for batch in trained["selective_dpo/final"] for i in batch]
    assert final == sorted(mean, key=mean.get)[:32]  # the easiest half, easy to hard, in order
    assert json.loads((out / "selective_dpo" / "done.json").read_text())["kept"] == 32


PPO = (
    ["--method=ppo", "--rollout_batch_size=32", "--deterministic"]
    + [a for a in TINY if not a.startswith("--max_train_pairs")]
    + ["--max_train_pairs=64"]
)


def test_ppo_on_one_and_two_processes(base_run, tmp_path):
    one, two = fresh_run(base_run, tmp_path, "one"), fresh_run(base_run, tmp_path, "two")
    run_train(PPO + [f"--out_dir={one}"])
    run_train(PPO + [f"--out_dir={two}"], torchrun=2)
    first = {run: next(r for r in metrics(run / "ppo" / "metrics.jsonl") if r.get("step") == 1) for run in (one, two)}
    for key in ("loss", "policy_loss", "value_loss", "score"):
        assert first[two][key] == pytest.approx(first[one][key], rel=1e-4, abs=1e-6), key
    records = metrics(one / "ppo" / "metrics.jsonl")
    rollouts = [r for r in records if r.get("phase") == "generate"]
    assert [r["rollout"] for r in rollouts] == [1, 2] and rollouts[0]["mean_kl"] == pytest.approx(
        0.0, abs=1e-5
    )  # the actor starts as the SFT model
    done = json.loads((one / "ppo" / "done.json").read_text())
    assert done["annotation_ratio"] == pytest.approx(1 / 8) and done["steps"] == 4 and done["sampling_s"] > 0
    assert (one / "ppo" / "model" / "model.safetensors").exists()


def test_ppo_resumes_bit_exactly_after_a_kill(base_run, tmp_path):
    whole, killed = fresh_run(base_run, tmp_path, "whole"), fresh_run(base_run, tmp_path, "killed")
    args = PPO + ["--save_every=1"]
    run_train(args + [f"--out_dir={whole}"])
    process = subprocess.Popen(
        [sys.executable, "train.py", *args, f"--out_dir={killed}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = killed / "ppo" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.exists() and any(r.get("rollout") == 2 and "phase" not in r for r in metrics(log)):
            break  # a step of the second rollout is done
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    run_train(args + [f"--out_dir={killed}", "--resume"])
    a, b = (
        load_file(whole / "ppo" / "model" / "model.safetensors"),
        load_file(killed / "ppo" / "model" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = lambda path: [r["step"] for r in metrics(path) if "step" in r and "phase" not in r]  # noqa: E731
    assert steps(log) == steps(whole / "ppo" / "metrics.jsonl")
