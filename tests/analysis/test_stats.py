"""Seed statistics of the comparison (issue 15): hand-computed means, stds and paired t-intervals; n/a columns; runs
of different lengths and missing seeds."""

from pathlib import Path

import pytest

from mhc_train.analysis import (
    CompareError,
    disambiguate,
    mean_std,
    paired_difference,
    seed_statistics,
    stats_markdown,
    summary_rows,
    verdict,
)


def test_mean_and_sample_std_by_hand():
    assert mean_std([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, (14 / 3) ** 0.5))  # squares 4 + 1 + 0 + 9 = 14
    assert mean_std([4.5]) == (4.5, None)


def test_paired_t_interval_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.975, df=2) = 4.302653 (any t-table) -> half width 2.484138
    d = paired_difference({0: 6.0, 1: 7.0, 2: 8.0}, {0: 5.0, 1: 5.0, 2: 5.0})
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0) and d["n"] == 3
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert d["significant"] is False
    # d = 1.0, 1.1, 0.9, 1.0: mean 1, sd sqrt(0.02/3); t(0.975, df=3) = 3.182446 -> half width 0.129923
    d = paired_difference({1: 2.0, 2: 2.1, 3: 1.9, 4: 2.0}, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((1 - 0.129923, 1 + 0.129923), abs=1e-5)
    assert d["significant"] is True
    assert "significantly worse" in verdict("mhc", d) and "[+0.8701, +1.1299]" in verdict("mhc", d)
    one = paired_difference({0: 1.0, 5: 3.0}, {0: 2.0, 1: 2.0})  # only seed 0 is in both
    assert one["seeds"] == [0] and one["mean"] == -1.0 and one["ci_low"] is None
    assert "no interval, no verdict" in verdict("hc", one)


def _run(arm, seed, lr, vals, diag=None, connection=None):
    recs = {"val": [{"step": s, "loss": v} for s, v in vals], "meta": [{"n_params": 1}], "diag": diag or []}
    conn = connection or arm.split("_")[0]
    return {"dir": Path(f"/r/{arm}/{seed}"), "recs": recs, "summary": {}, "connection": conn, "arm": arm,
            "seed": seed, "lr": lr, "eval": {}}  # fmt: skip


def test_missing_seeds_and_different_lengths_are_said_not_hidden():
    runs = [
        _run("residual", 0, 1e-3, [(10, 5.0), (20, 4.0)]),
        _run("residual", 1, 1e-3, [(10, 5.2), (20, 4.2)]),
        _run("residual", 2, 1e-3, [(10, 5.1), (20, 4.1)]),
        _run("mhc", 0, 1e-3, [(10, 4.9), (20, 3.9)]),
        _run("mhc", 1, 1e-3, [(10, 5.0)]),  # stopped early: everything is compared at step 10
    ]
    stats = seed_statistics(runs)
    assert stats["step"] == 10
    (mhc,) = [r for r in stats["per_lr"] if r["arm"] == "mhc"]
    assert mhc["vs_residual"]["seeds"] == [0, 1]
    assert mhc["vs_residual"]["mean"] == pytest.approx(-0.15)  # (4.9 - 5.0 + 5.0 - 5.2) / 2 at step 10
    text = "\n".join(stats_markdown(stats))
    assert "taken at step 10" in text and "residual has [0, 1, 2]: paired over [0, 1] only" in text
    with pytest.raises(CompareError, match="two runs of arm mhc at lr 0.001 with seed 0"):
        seed_statistics([*runs, _run("mhc", 0, 1e-3, [(10, 4.0)])])


def test_best_lr_and_shared_lr():
    runs = [_run("residual", s, lr, [(10, v + s * 0.01)]) for s in (0, 1) for lr, v in ((1e-3, 5.0), (3e-3, 4.8))]
    runs += [_run("mhc", s, lr, [(10, v + s * 0.02)]) for s in (0, 1) for lr, v in ((1e-3, 4.7), (3e-3, 4.9))]
    stats = seed_statistics(runs)
    best = {r["arm"]: r for r in stats["best_lr"]}
    assert best["residual"]["lr"] == 3e-3 and best["mhc"]["lr"] == 1e-3 and stats["shared_lr"] == 3e-3
    assert best["mhc"]["vs_residual"]["mean"] == pytest.approx(-0.095)  # seed 0: 4.7 - 4.8, seed 1: 4.72 - 4.81
    (shared_mhc,) = [r for r in stats["shared"] if r["arm"] == "mhc"]
    assert shared_mhc["vs_residual"]["mean"] == pytest.approx(0.105)  # (4.9 - 4.8 + 4.92 - 4.81) / 2


def test_columns_without_meaning_say_n_a():
    diag = [{"composite_bwd_gain_max": 1.0, "sinkhorn_col_err_max": None, "sites": {}}]
    rows = summary_rows(
        [
            _run("residual", 0, 1e-3, [(10, 5.0)], diag),
            _run("hc", 0, 1e-3, [(10, 5.0)], [{**diag[0], "sinkhorn_col_err_max": 0.93}]),  # an old HC log
            _run("mhc", 0, 1e-3, [(10, 5.0)], [{**diag[0], "sinkhorn_col_err_max": 1e-7}]),
            _run("mhc_identity", 0, 1e-3, [(10, 5.0)], diag, connection="mhc"),
        ]
    )
    res, hc, mhc, ident = rows
    assert res["sinkhorn_col_err_max"] == res["h_res_dist_uniform"] == "n/a"
    assert hc["sinkhorn_col_err_max"] == "n/a" and ident["sinkhorn_col_err_max"] == "n/a"
    assert mhc["sinkhorn_col_err_max"] == 1e-7 and hc["h_res_dist_uniform"] is None  # not logged: "-"
    (no_diag,) = summary_rows([_run("hc", 0, 1e-3, [(10, 5.0)])])
    assert no_diag["sinkhorn_col_err_max"] == "n/a" and no_diag["composite_bwd_gain_max"] is None


def test_runs_of_one_arm_and_seed_that_differ_otherwise_become_separate_arms():
    runs = [_run("mhc", 0, 1e-3, [(10, 5.0)]), _run("mhc", 0, 1e-3, [(10, 4.0)])]
    runs[1]["dir"] = Path("/r/other/0")
    (note,) = disambiguate(runs)
    assert [r["arm"] for r in runs] == ["mhc:mhc/0", "mhc:other/0"] and "compared as separate arms" in note
    assert len(seed_statistics(runs)["per_lr"]) == 2


@pytest.mark.parametrize(
    "overrides,arm",
    [
        ([], "mhc"),
        (["connection=residual"], "residual"),
        (["connection=hc"], "hc"),
        (["connection=hc_static"], "hc_static"),
        (["connection=hc", "connection.hc_dynamic=false"], "hc_static"),
        (["connection=mhc_hclike"], "mhc_hclike"),
        (["connection=mhc_identity"], "mhc_identity"),
        (["connection.read_init=one_hot"], "mhc_onehot"),
        (["connection.b_res_init=identity"], "mhc_idres"),
        (["connection=mhc_hclike", "connection.b_res_init=uniform"], "mhc_onehot"),
        (["optim.connection_lr_mult=0.1"], "mhc+clr0.1"),
        (["connection=hc", "optim.connection_lr_mult=0", "optim.connection_weight_decay=false"], "hc+clr0+nowd"),
        (["connection.name=mhc_v4"], "mhc_v4"),  # a new preset's name is used as it is
        (["connection.name=mhc_v4", "optim.connection_weight_decay=false"], "mhc_v4+nowd"),
    ],
)
def test_arm_name_is_the_preset_name_plus_override_suffixes(overrides, arm):
    from mhc_train.config import arm_name, load_config, to_dict

    cfg = load_config(overrides)
    assert arm_name(cfg) == arm
    old = to_dict(cfg)
    del old["connection"]["name"]  # a config.yaml written before presets carried a name: the arm from its values
    if not arm.startswith("mhc_v4"):
        assert arm_name(old) == arm


def test_the_recorded_arm_wins_over_the_config(tmp_path):
    import json

    from mhc_train.analysis import load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("connection: {type: mhc}\ntrain: {seed: 1}\noptim: {lr: 0.01}\n")
    (run / "metrics.jsonl").write_text("")
    assert load_run(run)["arm"] == "mhc"  # nothing recorded (a run from before): computed from config.yaml
    (run / "summary.json").write_text(json.dumps({"arm": "mhc_v4"}))
    assert load_run(run)["arm"] == "mhc_v4"
