"""meta.py: the meta-learner's curve, its update, gating, the buffer, state round trips, and a
2-process gloo run that must keep phi identical on both ranks."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meta import CURVE_GRID, GateDecision, MetaBuffer, MetaController, MetaLearner, gate, meta_features

ROOT = Path(__file__).resolve().parent.parent


def fill(controller, offline_fn, online_fn, steps=None, batch=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps or controller.interval):
        offline = -torch.rand(batch, generator=generator) * 6
        controller.buffer.append(offline, online_fn(offline), meta_features(offline_fn(offline)))


def test_initial_curve():
    h = MetaLearner()
    scores = torch.linspace(-20, 3, 200)
    with torch.no_grad():
        weights = h(scores[:, None])
    assert h(torch.zeros(1, 1)).item() == 0.5
    torch.testing.assert_close(weights, torch.sigmoid(10 * torch.tanh(0.1 * scores)))
    assert (weights.diff() > 0).all()
    assert weights[0] < 1e-3 and h(torch.tensor([[-5.0]])).item() < 0.01
    assert sum(p.numel() for p in h.parameters()) == 100 + 100 + 100 + 1


def test_depth_and_multi_input_ablations():
    deep = MetaLearner(depth=5)
    assert sum(isinstance(m, torch.nn.Linear) for m in deep.modules()) == 5
    with torch.no_grad():
        weights = deep(torch.linspace(-10, 0, 50)[:, None])
    assert deep(torch.zeros(1, 1)).item() == pytest.approx(0.5) and (weights.diff() > -1e-6).all() and weights[0] < 0.01
    # the hidden layers' 1/width initialisation keeps it near the depth-2 curve, not a saturated step at 0
    shallow = MetaLearner()
    for score in (-0.1, -1.0, -3.0):
        x = torch.tensor([[score]])
        assert deep(x).item() == pytest.approx(shallow(x).item(), abs=0.05) and deep(x).item() > 1e-3
    multi = MetaLearner(inputs="multi")
    features = meta_features(
        torch.tensor([-0.3, -2.0]), torch.tensor([0.5, -1.0]), torch.tensor([0.1, 3.0]), inputs="multi"
    )
    assert features.shape == (2, 3) and multi(features).shape == (2,)
    assert multi(torch.zeros(1, 3)).item() == 0.5
    with pytest.raises(ValueError, match="needs the chosen and rejected log-ratios"):
        meta_features(torch.tensor([-0.3]), inputs="multi")
    with pytest.raises(ValueError, match="depth"):
        MetaLearner(depth=1)


@pytest.mark.parametrize("online_better", [True, False])
def test_update_moves_h_the_right_way(online_better):
    """Online pairs scoring higher lower h at those scores; offline ones scoring higher raise it."""
    controller = MetaController(seed=0)
    gap = 0.5 if online_better else -0.5
    fill(controller, lambda off: off, lambda off: torch.clamp(off + gap, max=0.0))
    grid = torch.linspace(-5, -0.5, 10)[:, None]
    before = controller.weights(grid)
    stats = controller.update()
    after = controller.weights(grid)
    assert (after < before).all() if online_better else (after > before).all()
    assert len(controller.buffer) == 0 and controller.buffer.steps == 0
    assert stats["meta_entries"] == 8 * 64 and stats["meta_loss"] >= 0
    initial = MetaController().curve()
    assert (sum(stats["h_curve"]) < sum(initial)) == online_better and stats["meta_updates"] == 1


def test_update_on_an_empty_buffer_changes_nothing():
    controller = MetaController()
    before = [p.clone() for p in controller.learner.parameters()]
    assert controller.update()["meta_entries"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, controller.learner.parameters()))


def test_update_is_one_adamw_step_on_the_clipped_mean_gradient():
    """docs/algorithm.md#meta-update: one AdamW step (lr 5e-3, weight decay 1e-4) on the mean Eq. 6 gradient over
    the whole buffer, clipped to norm 1.0; not one step per mini-batch."""
    controller = MetaController(interval=4)
    fill(controller, lambda off: off, lambda off: off + 0.1)
    manual = MetaLearner()
    manual.load_state_dict(controller.learner.state_dict())
    features = torch.tensor(controller.buffer.features)
    offline, online = torch.tensor(controller.buffer.offline_scores), torch.tensor(controller.buffer.online_scores)
    optimizer = torch.optim.AdamW(manual.parameters(), lr=5e-3, weight_decay=1e-4)
    (-(manual(features) * offline + (1 - manual(features)) * online)).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
    optimizer.step()
    stats = controller.update()
    assert controller.optimizer.state[controller.learner.net[0].weight]["step"].item() == 1 and controller.updates == 1
    assert stats["meta_grad_norm"] == pytest.approx(norm.item(), rel=1e-5) and stats["meta_updates"] == 1
    for a, b in zip(controller.learner.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b)
    assert len(stats["h_curve"]) == len(CURVE_GRID) and stats["h_curve"] == controller.curve()


def test_gradient_clipping_bounds_the_step():
    controller = MetaController(grad_clip=1e-3)
    fill(controller, lambda off: off, lambda off: off + 3.0)  # a large gradient
    before = controller.curve()
    stats = controller.update()
    assert stats["meta_grad_norm"] > 1e-3  # the norm before clipping is reported
    assert [p.grad.norm() for p in controller.learner.parameters()]  # clipped in place
    total = torch.sqrt(sum(p.grad.norm() ** 2 for p in controller.learner.parameters()))
    assert total.item() == pytest.approx(1e-3, rel=1e-3) and controller.curve() != before


def test_meta_steps_after_n_policy_steps_is_n_floor_t_meta():
    """Algorithm 1's loop: a policy step appends to the buffer, every T_meta steps one update."""
    for steps, interval in ((8, 8), (23, 8), (7, 8), (40, 16), (5, 1)):
        controller = MetaController(interval=interval)
        generator = torch.Generator().manual_seed(steps)
        for _ in range(steps):
            offline = -torch.rand(16, generator=generator) * 4
            controller.buffer.append(offline, offline + 0.3, meta_features(offline))
            if controller.ready():
                controller.update()
        state = controller.optimizer.state[controller.learner.net[0].weight]
        assert controller.updates == steps // interval == (state["step"].item() if state else 0)
        assert controller.buffer.steps == steps % interval  # the leftover that train.py drops at the iteration's end


def test_gating_frequency_matches_one_minus_h():
    generator = torch.Generator().manual_seed(1)
    n = 20000
    scores = -torch.rand(n, generator=generator) * 8
    weights = MetaLearner()(scores[:, None]).detach()
    decision = gate(scores, weights, "meta", torch.Generator().manual_seed(2))
    expected = (1 - weights).sum().item()
    std = math.sqrt((weights * (1 - weights)).sum().item())
    assert abs(decision.selected.sum().item() - expected) < 4 * std
    assert (decision.selected == (decision.draws > weights.double())).all()  # u > w, tuple by tuple
    for w in (0.1, 0.5, 0.9):  # binomial tolerance at constant weights
        selected = (
            gate(scores, torch.full((n,), w), "meta", torch.Generator().manual_seed(3)).selected.float().mean().item()
        )
        assert abs(selected - (1 - w)) < 4 * math.sqrt(w * (1 - w) / n)


def test_gating_ablation_modes():
    scores = torch.tensor([-3.0, -0.1, -0.8, -0.6, -5.0])
    weights = torch.full((5,), 0.3)
    assert gate(scores, weights, "all", torch.Generator().manual_seed(0)).selected.all()
    threshold = gate(scores, weights, "threshold", torch.Generator().manual_seed(0), threshold=-0.7)
    assert threshold.selected.tolist() == [True, False, True, False, True]
    random_ratio = (
        gate(torch.zeros(10000), torch.full((10000,), 0.99), "random", torch.Generator().manual_seed(0))
        .selected.float()
        .mean()
    )
    assert abs(random_ratio.item() - 0.5) < 4 * math.sqrt(0.25 / 10000)
    with pytest.raises(ValueError, match="sampling mode"):
        gate(scores, weights, "sometimes", torch.Generator())


def test_gating_is_deterministic_for_a_seed():
    scores = -torch.rand(500, generator=torch.Generator().manual_seed(0)) * 4
    a, b, c = (MetaController(seed=s).gate(scores, meta_features(scores)) for s in (7, 7, 8))
    assert isinstance(a, GateDecision)
    assert torch.equal(a.draws, b.draws) and torch.equal(a.selected, b.selected)
    assert not torch.equal(a.draws, c.draws)


def test_loss_weighting_modes():
    features = meta_features(torch.tensor([-4.0, -1.0, 0.0]))
    meta = MetaController(weighting="meta").loss_weights(features)
    torch.testing.assert_close(meta, torch.sigmoid(10 * torch.tanh(0.1 * features[:, 0])))
    assert not meta.requires_grad  # a constant in Eq. 5
    assert MetaController(weighting="uniform").loss_weights(features).tolist() == [0.5, 0.5, 0.5]
    fixed = MetaController(weighting="fixed")
    torch.testing.assert_close(fixed.loss_weights(features), torch.sigmoid(features[:, 0]))
    fill(fixed, lambda off: off, lambda off: off + 0.5)
    before = [p.clone() for p in fixed.learner.parameters()]
    assert fixed.update() == {}  # the fixed heuristic is never trained
    assert all(torch.equal(a, b) for a, b in zip(before, fixed.learner.parameters()))
    assert len(fixed.buffer) == 0


def test_buffer_appends_and_clears():
    buffer = MetaBuffer()
    buffer.append(torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -2.5]), meta_features(torch.tensor([-1.0, -2.0])))
    buffer.append(torch.tensor([-3.0]), torch.tensor([-1.0]), meta_features(torch.tensor([-3.0])))
    assert len(buffer) == 3 and buffer.steps == 2
    assert buffer.offline_scores == [-1.0, -2.0, -3.0] and buffer.features == [[-1.0], [-2.0], [-3.0]]
    buffer.clear()
    assert len(buffer) == 0 and buffer.steps == 0


def test_state_round_trip_continues_exactly():
    a = MetaController(seed=3)
    fill(a, lambda off: off, lambda off: off + 0.3)
    a.update()
    a.gate(-torch.rand(100), meta_features(-torch.rand(100)))
    fill(a, lambda off: off, lambda off: off - 0.2, steps=3, seed=1)  # a half-full buffer
    b = MetaController(seed=99)
    b.load_state_dict(a.state_dict())
    scores = meta_features(-torch.rand(300, generator=torch.Generator().manual_seed(5)) * 5)
    da, db = a.gate(scores[:, 0], scores), b.gate(scores[:, 0], scores)
    assert torch.equal(da.draws, db.draws) and torch.equal(da.selected, db.selected)
    for controller in (a, b):
        fill(controller, lambda off: off, lambda off: off + 0.4, steps=5, seed=2)
        controller.update()
    for pa, pb in zip(a.learner.parameters(), b.learner.parameters()):
        assert torch.equal(pa, pb)
    assert a.updates == b.updates == 2


def _distributed_update(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        controller = MetaController(seed=0)
        # each rank buffers its own, different share; rank 1 has an odd extra entry per step
        fill(
            controller,
            lambda off: off,
            lambda off: torch.clamp(off + 0.5 - rank, max=0.0),
            batch=32 + rank,
            seed=10 + rank,
        )
        stats = controller.update()
        torch.save(
            {"params": [p.detach() for p in controller.learner.parameters()], "stats": stats},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_update_keeps_phi_identical(tmp_path):
    mp.spawn(_distributed_update, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    assert rank0["stats"] == rank1["stats"] and rank0["stats"]["meta_entries"] == 8 * (32 + 33)
    # ... and equal to one process updating on the union of the two shares
    single = MetaController(seed=0)
    for rank in (0, 1):
        share = MetaController(seed=0)
        fill(
            share,
            lambda off: off,
            lambda off, rank=rank: torch.clamp(off + 0.5 - rank, max=0.0),
            batch=32 + rank,
            seed=10 + rank,
        )
        buffer = share.buffer
        single.buffer.append(
            torch.tensor(buffer.offline_scores), torch.tensor(buffer.online_scores), torch.tensor(buffer.features)
        )
    stats = single.update()
    assert stats["meta_entries"] == rank0["stats"]["meta_entries"] and stats["meta_loss"] == pytest.approx(
        rank0["stats"]["meta_loss"]
    )
    for a, b in zip(rank0["params"], single.learner.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_self_check_prints_a_learned_step():
    result = subprocess.run([sys.executable, "meta.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {
        float(line.split()[0]): (float(line.split()[1]), float(line.split()[2]))
        for line in result.stdout.splitlines()
        if line.strip() and line.split()[0].lstrip("-").replace(".", "").isdigit()
    }
    assert rows[-4.0][1] < 0.1 and rows[-0.5][1] > 0.9  # low below the crossover, high above
    assert rows[0.0][0] == 0.5
