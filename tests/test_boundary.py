"""The on-policy/static boundary method (train.py --method=boundary): the boundary score by
hand (ties, both directions), the choice it makes and the fixed schedules, DPO and SLiC-HF, on one
and two processes; its old name (--method=stage) still accepted."""

import json

import pytest

import config
from baselines.boundary import boundary_score
from config import ConfigError, parse_config
from conftest import TINY, fresh_run, metrics, run_train
from experiments import boundary_grid

BOUNDARY = [
    "--method=boundary",
    "--probe_ratio=0.25",
    "--probe_samples=2",
] + TINY  # 2 iterations of 96 prompts: 24 probe prompts each


@pytest.mark.parametrize(
    "own, static, expected",
    [
        ([[3.0, 4.0]], [[1.0, 2.0]], (1.0, 4, 0, 4)),  # on-policy answers win every comparison
        ([[0.0, -1.0]], [[1.0, 2.0]], (0.0, 0, 0, 4)),  # and lose every one
        ([[1.0]], [[1.0, 1.0]], (0.5, 0, 2, 2)),  # ties count half
        (
            [[2.0, 0.0], [5.0]],
            [[1.0, 3.0], [4.0, 6.0]],
            ((1 + 0 + 1) / 6, 2, 0, 6),
        ),  # prompts compared only within themselves
        ([[1.0, 2.0, 3.0]], [[2.0, 2.5]], ((0 + 0.5 + 0 + 0 + 1 + 1) / 6, 2, 1, 6)),
    ],
)
def test_boundary_score_by_hand(own, static, expected):
    score, wins, ties, comparisons = boundary_score(own, static)
    assert (round(score, 6), wins, ties, comparisons) == (round(expected[0], 6), *expected[1:])


def test_boundary_config_refusals_and_its_old_names(capsys):
    with pytest.raises(ConfigError, match="--schedule: one of on or off per iteration"):
        parse_config(["--method=boundary", "--iterations=2", "--schedule=off"])
    with pytest.raises(ConfigError, match="--schedule: one of on or off"):
        parse_config(["--method=boundary", "--iterations=2", "--schedule=off,maybe"])
    with pytest.raises(ConfigError, match="--objective=slic: only --method=online_dpo or boundary"):
        parse_config(["--method=metaapo", "--objective=slic"])
    assert (
        config.stage_name(
            parse_config(["--method=boundary", "--objective=slic", "--iterations=2", "--schedule=off,on"]), "boundary"
        )
        == "boundary-objective_slic-schedule_off-on"
    )
    capsys.readouterr()
    old = parse_config(["--method=stage", "--stage_threshold=0.7"])  # the names before the rename
    assert (old.method, old.boundary_threshold) == ("boundary", 0.7)
    notes = capsys.readouterr().err
    assert (
        "--stage_threshold is now --boundary_threshold" in notes and "--method=stage is now --method=boundary" in notes
    )


def boundary(path):
    return [r for r in metrics(path) if r.get("phase") == "boundary"]


@pytest.mark.parametrize("objective", ["dpo", "slic"])
def test_a_fixed_schedule_trains_on_static_then_on_policy_data(base_run, tmp_path, objective):
    out = fresh_run(base_run, tmp_path)
    run_train(BOUNDARY + [f"--out_dir={out}", "--schedule=off,on", f"--objective={objective}"])
    stage = out / config.stage_name(
        parse_config(BOUNDARY + ["--schedule=off,on", f"--objective={objective}"]), "boundary"
    )
    records = boundary(stage / "metrics.jsonl")
    assert [r["choice"] for r in records] == ["static", "on-policy"] and all(r["by"] == "schedule" for r in records)
    for r in records:  # measured and logged even when the schedule decides
        assert (
            0 <= r["boundary_score"] <= 1
            and r["wins"] + r["ties"] + r["losses"] == r["probe_prompts"] * 2 * 2 == 24 * 4
        )
        assert r["boundary_score"] == pytest.approx(
            (r["wins"] + 0.5 * r["ties"]) / (r["wins"] + r["ties"] + r["losses"])
        )
    phases = [r for r in metrics(stage / "metrics.jsonl") if r.get("phase") == "generate"]
    assert [p["selected"] for p in phases] == [0, 96]  # generation only where on-policy data is used
    assert phases[0]["augmented"] == 96  # the static iteration trains on D_t's offline pairs
    assert phases[1]["augmented"] == phases[1]["pairs"] <= 96
    probe_share = 24 * (2 + 2) / (96 * 8)
    assert phases[0]["annotation_ratio"] == pytest.approx(probe_share) and phases[1][
        "annotation_ratio"
    ] == pytest.approx(1 + probe_share)
    assert (stage / "done.json").exists() and (stage / "iter2" / "model" / "model.safetensors").exists()


def test_the_boundary_score_chooses_on_one_and_two_processes(base_run, tmp_path):
    one, two = fresh_run(base_run, tmp_path, "one"), fresh_run(base_run, tmp_path, "two")
    for out, processes in ((one, 0), (two, 2)):
        # BS >= 0 always: on-policy
        run_train(BOUNDARY + [f"--out_dir={out}", "--boundary_threshold=0.0"], torchrun=processes)
    records = {out: boundary(out / "boundary" / "metrics.jsonl") for out in (one, two)}
    assert [r["choice"] for r in records[one]] == ["on-policy"] * 2 and all(
        r["by"] == "boundary score" for r in records[one]
    )
    for a, b in zip(records[one], records[two]):  # the same probes, answers, votes and choice on 2 processes
        assert (a["wins"], a["ties"], a["losses"], a["choice"]) == (b["wins"], b["ties"], b["losses"], b["choice"])
    first = {
        out: next(r["loss"] for r in metrics(out / "boundary" / "metrics.jsonl") if r.get("step") == 1)
        for out in (one, two)
    }
    assert first[two] == pytest.approx(first[one], rel=1e-4)
    out = fresh_run(base_run, tmp_path, "static")
    run_train(BOUNDARY + [f"--out_dir={out}", "--boundary_threshold=1.0"])  # BS < 1 here: static data
    assert [r["choice"] for r in boundary(out / "boundary" / "metrics.jsonl")] == ["static", "static"]
    assert json.loads((out / "boundary" / "done.json").read_text())["annotation_ratio"] < 0.2  # the probes only


def test_boundary_grid_findings_and_table():
    """evaluate.py's reading of the grid: gains per decision, which source was better, whether BS
    pointed at it, and the boundary method against the best fixed schedule."""

    def run(schedule, gold, bs, choice=("static", "static")):
        return {
            "start": "s",
            "objective": "dpo",
            "schedule": schedule,
            "gold": gold,
            "boundary_score": bs,
            "choice": list(choice),
            "time_s": 1.0,
            "probe_s": 0.5,
            "annotation_ratio": 1.0,
        }

    runs = [
        run("off,off", [5.0, 5.5, 5.6], [0.4, 0.3]),
        run("off,on", [5.0, 5.5, 6.5], [0.4, 0.3]),
        run("on,off", [5.0, 6.0, 6.2], [0.4, 0.6]),
        run("on,on", [5.0, 6.0, 6.1], [0.4, 0.6]),
        run("boundary", [5.0, 5.5, 5.6], [0.4, 0.3]),
    ]
    (finding,) = boundary_grid.boundary_findings(runs)
    first, after_static, after_on = finding["points"]
    assert (first["on_gain"], first["static_gain"]) == pytest.approx((1.0, 0.5)) and first["ratio"] == pytest.approx(
        2.0
    )
    assert first["better"] == "on-policy" and first["predicted"] == "static"  # BS 0.4 pointed the wrong way
    assert after_static["on_gain"] == pytest.approx(1.0) and after_static["static_gain"] == pytest.approx(0.1)
    assert after_on["better"] == "static" and after_on["predicted"] == "on-policy"  # 0.2 > 0.1, BS 0.6
    assert finding["best_fixed"] == "off,on" and finding["best_fixed_gold"] == 6.5 and finding["boundary_gold"] == 5.6
    table = boundary_grid.boundary_grid_markdown({"runs": runs, "findings": [finding], "minutes": 1.0}, None)
    assert "| s | dpo | iteration 1 | +1.000 | +0.500 | 2.00 | on-policy | 0.400 | static (wrong) |" in table


def test_a_part_of_the_grid_is_named_by_its_starts_and_objectives(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown --starts or --objectives \['medium'\]"):
        boundary_grid.main([f"--out={tmp_path}", "--starts=weak,medium", "--objectives=dpo"])
    assert not any(tmp_path.iterdir())  # refused before anything ran
