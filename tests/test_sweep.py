"""Sweeps and fits: a fit that recovers a known power law, and the SLURM array script that a sweep
renders. (A real grid interrupted and resumed through the same runner: test_study.py.)"""

import csv
import json
import math
import subprocess

import numpy as np
import pytest

from helpers import ROOT, command, write_spec
from megatron_power.science import fit


def sweep(*args, **popen):
    return subprocess.Popen(command("sweep", *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def synthetic_rows(a, b, noise, rng, seq_length=4096):
    """Final losses of a grid whose optimum follows lr_opt = beta * a * T**b (beta: the batch in
    4096-token sequences): a parabola in log lr around it, a floor that falls with T, and a penalty
    that makes batch 256 the worst."""
    rows = []
    lrs = [1e-4 * 2**k for k in range(11)]
    for tokens in (1e8, 4e8, 1.6e9, 6.4e9):
        for batch in (16, 32, 64, 256):
            optimum = batch * seq_length / 4096 * a * tokens**b
            for lr in lrs:
                loss = 3 + 20 * tokens**-0.2 + 0.04 * math.log(lr / optimum) ** 2 + 0.05 * (batch == 256)
                rows.append({"point": f"{tokens}-{batch}-{lr}", "status": "finished", "tokens": int(tokens),
                             "batch": batch, "lr": lr, "width": 256, "mup": True, "seq_length": seq_length,
                             "reference_seq_length": 4096,
                             "valid_loss": loss + rng.normal(0, noise), "b_simple": None})
    return rows


def test_fit_recovers_a_known_power_law(tmp_path):
    rng = np.random.default_rng(0)
    rows = synthetic_rows(4.6, -0.51, noise=0.003, rng=rng)
    law, chosen = fit.fit_gamma(fit.optima(rows), count=3)
    assert {o.batch for o in chosen} == {16, 32, 64}  # the paper's best-3 batch sizes
    assert law.b == pytest.approx(-0.51, abs=0.02)
    assert law.a == pytest.approx(4.6, rel=0.25)
    assert abs(law.b + 0.51) < 3 * law.sigma_b + 1e-3
    assert 0 < law.sigma_b < 0.02
    b_within, sigma_within = fit.slope_within_batches(fit.optima(rows))
    assert b_within == pytest.approx(-0.51, abs=0.02) and 0 < sigma_within < 0.02

    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = fit.run(path, tmp_path / "out")
    assert any(f"b = {law.b:.4f}" in line for line in lines)
    fragment = (tmp_path / "out" / "fit.yaml").read_text()
    assert f"b: {law.b:.6g}" in fragment
    from omegaconf import OmegaConf
    assert OmegaConf.create(fragment).schedule.a == pytest.approx(law.a, rel=1e-5)


def test_fit_recovers_the_optimal_batch_and_the_lr_sensitivity_against_tokens(tmp_path):
    """Time Transfer's two other laws on a surface that holds them exactly: B*(T) = 0.01 T**0.5
    (a parabola in log batch around it) and a curvature in log lr of 2 x 0.04 (T / 1e8)**-0.3."""
    rows = []
    for tokens in (1e8, 4e8, 1.6e9, 6.4e9):
        width = 0.04 * (tokens / 1e8) ** -0.3
        for batch in (16, 32, 64, 128, 256, 512, 1024, 2048):
            optimum = batch * 4.6 * tokens**-0.51
            for lr in [1e-5 * 2**k for k in range(18)]:  # every lr optimum inside the grid
                loss = 3 + width * math.log(lr / optimum) ** 2 + 0.02 * math.log(batch / (0.01 * tokens**0.5)) ** 2
                rows.append({"point": f"{tokens}-{batch}-{lr}", "status": "finished", "tokens": int(tokens),
                             "batch": batch, "lr": lr, "width": 256, "mup": True, "seq_length": 4096,
                             "reference_seq_length": 4096, "valid_loss": loss, "b_simple": None})
    opts = fit.optima(rows)
    b_star = fit.optimal_batches(opts)
    assert [b for _, b, _ in b_star] == pytest.approx([100, 200, 400, 800], rel=1e-6)
    law = fit.power_law([t for t, _, _ in b_star], [b for _, b, _ in b_star])
    assert law.b == pytest.approx(0.5, abs=1e-6) and law.a == pytest.approx(0.01, rel=1e-5)
    sensitivity = fit.lr_sensitivity(opts, 3)
    assert [k for _, k in sensitivity] == pytest.approx([0.08 * (t / 1e8) ** -0.3 for t, _ in sensitivity], rel=1e-6)

    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = "\n".join(fit.run(path, tmp_path / "out"))
    assert "optimal batch size B*(T) = 0.01 +- " in report and "T**0.500 +- " in report
    assert "lr sensitivity" in report and "T**-0.300 +- " in report


def test_a_fit_at_short_sequences_gives_the_scheduler_its_optima(tmp_path):
    """A sweep at 128-token sequences: the fitted (a, b), put into a recipe at that sequence length,
    make the Power scheduler return the optimum the fit found at each (T, batch) of the sweep."""
    from omegaconf import OmegaConf

    from megatron_power.config import load_config
    from megatron_power.training.schedule import learning_rate

    rows = synthetic_rows(100.0, -0.51, noise=0.0, rng=np.random.default_rng(0), seq_length=128)
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fit.run(path, tmp_path / "out")
    fitted = OmegaConf.create((tmp_path / "out" / "fit.yaml").read_text()).schedule
    optima = fit.best_batches(fit.optima(rows), 3)
    assert len(optima) == 12
    for o in optima:
        config = load_config("proxy", [f"schedule.a={fitted.a}", f"schedule.b={fitted.b}", "schedule.lr_max=1",
                                       "schedule.warmup=0", "schedule.decay=0", "model.seq_length=128",
                                       f"train.global_batch_size={o.batch}", "train.micro_batch_size=8",
                                       f"train.tokens={2 * o.tokens}"], check_paths=False)
        assert learning_rate(o.tokens, config.schedule, config.train.tokens, config.tokens_per_step) == \
            pytest.approx(o.lr, rel=1e-4), (o.tokens, o.batch)


def test_optimum_at_the_edge_is_flagged_and_divergence_counts_as_worst():
    lr, loss, at_edge, index = fit.optimal_lr([0.01, 0.02, 0.04], [3.0, 3.1, 3.2])
    assert (lr, at_edge, index) == (0.01, True, 0)
    lr, loss, at_edge, index = fit.optimal_lr([0.01, 0.02, 0.04, 0.08], [3.2, 3.0, 3.1, math.inf])
    assert not at_edge and index == 1 and 0.01 < lr < 0.04


def test_bad_results_table_is_refused(tmp_path):
    bad = tmp_path / "results.csv"
    bad.write_text("point,lr\nx,0.1\n")
    result = subprocess.run(command("fit", str(bad)), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing ['batch', 'mup', 'reference_seq_length', 'seq_length', 'tokens', 'valid_loss', 'width']" in result.stderr


def test_bad_spec_is_refused_before_any_run(default_data, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "sweeps", {"schedule.lr_maxx": [0.01, 0.02]})
    result = sweep(spec)
    out = result.communicate(timeout=120)[0]
    assert result.returncode == 2
    assert "error: override: unknown key 'schedule.lr_maxx'; did you mean 'schedule.lr_max'? (lr_maxx0.01 and 1 more points)" in out
    assert not (tmp_path / "sweeps").exists()


def test_slurm_array_skips_finished_points(default_data, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "sweeps", {"schedule.lr_max": [0.005, 0.01, 0.02, 0.04]})
    done = tmp_path / "sweeps" / "grid" / "lr0.005"
    done.mkdir(parents=True)
    (done / "finished.json").write_text(json.dumps({"step": 1}))
    result = sweep(spec, "--slurm", "--cpu", "--dry-run", "--max-running", "2", "--time", "10")
    script = result.communicate(timeout=120)[0]
    assert result.returncode == 0, script
    assert "#SBATCH --array=1-3%2" in script
    assert "#SBATCH --ntasks-per-node=1" in script
    points = (tmp_path / "sweeps" / "grid" / "points.txt").read_text().splitlines()
    assert points[1].startswith("lr0.01 ") and "schedule.lr_max=0.01" in points[1]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_transfer_shift_counts_grid_steps_across_width_and_depth():
    # muP: the optimum stays at 0.01 for every width; SP: it halves with each doubling of width.
    # One table also holds a depth sweep at width 512: with depth_alpha 1 the optimum stays, with 0
    # it halves per doubling of depth; neither analysis mixes in the other's runs.
    rows = []
    lrs = [0.0025 * 2**k for k in range(6)]

    def runs(optimum, **axes):
        return [{"tokens": 100, "batch": 16, "lr": lr, "valid_loss": 5 + math.log(lr / optimum) ** 2, **axes}
                for lr in lrs]

    for mup in (True, False):
        for i, width in enumerate((64, 128, 256)):
            rows += runs(0.01 if mup else 0.02 / 2**i, width=width, mup=mup, depth=2, depth_alpha=0.0)
    for alpha in (1.0, 0.0):
        for i, depth in enumerate((4, 8, 16)):
            rows += runs(0.01 if alpha else 0.04 / 2**i, width=512, mup=True, depth=depth, depth_alpha=alpha)

    def best(shifts):
        return {kind: {v: i for v, (i, _) in by_value.items()} for kind, by_value in shifts.items()}

    assert best(fit.transfer_shift(fit.transfer_rows(rows, fit.WIDTH), fit.WIDTH)) == {
        True: {64: 2, 128: 2, 256: 2}, False: {64: 3, 128: 2, 256: 1}}
    assert best(fit.transfer_shift(fit.transfer_rows(rows, fit.DEPTH), fit.DEPTH)) == {
        1.0: {4: 2, 8: 2, 16: 2}, 0.0: {4: 4, 8: 3, 16: 2}}
    assert fit.DEPTH.label(1.0) == "depth_alpha 1 (CompleteP)" and fit.WIDTH.label(False) == "SP"


def test_point_directory_of_another_config_is_refused(tmp_path, monkeypatch):
    from dataclasses import replace

    from megatron_power.config import to_yaml
    from megatron_power.errors import ConfigError
    from megatron_power.science import sweep

    monkeypatch.chdir(tmp_path)  # the spec's relative out_dir lands here
    spec = sweep.load_spec(str(write_spec(tmp_path / "spec.yaml", "runs/sweeps", {"schedule.lr_max": [0.01, 0.02]})))
    config = sweep.point_config(spec, sweep.points(spec)[0], check_paths=False)
    config.run_dir.mkdir(parents=True)
    # As a SLURM job writes it (an absolute out_dir): the same point.
    (config.run_dir / "config.yaml").write_text(to_yaml(replace(config, out_dir=str(spec.dir.parent.absolute()))))
    sweep.check(spec, check_paths=False)
    changed = replace(config, train=replace(config.train, eval_batches=7))
    (config.run_dir / "config.yaml").write_text(to_yaml(changed))
    with pytest.raises(ConfigError, match=r"was run with another config \(train.eval_batches: 7 -> 4\)"):
        sweep.check(spec, check_paths=False)


def test_plan_prints_runs_tokens_and_gpu_hours_before_anything_runs(tmp_path):
    from megatron_power.ops import plan
    from megatron_power.science import sweep

    grid = {"train.tokens": ["1B", "4B"], "train.global_batch_size": [16, 32], "width": [64, 128]}
    path = write_spec(tmp_path / "spec.yaml", tmp_path / "sweeps", grid)
    path.write_text(path.read_text().replace("overrides:\n", "overrides:\n  - model.vocab_size=49152\n"))
    out = subprocess.run(command("sweep", str(path), "--plan", "--mfu", "0.4"), cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    # GPU-hours = sum over runs of tokens x FLOPs per token / (peak x MFU): each width's own FLOPs.
    expected = 0.0
    for point in sweep.check(sweep.load_spec(str(path)), check_paths=False):
        c = point.config
        expected += c.train.tokens * plan.flops_per_token(c, plan.count_parameters(c, 49152))
    hours = expected / (989e12 * 0.4) / 3600
    assert out.startswith(f"grid: 8 runs, 20B tokens, {expected:.3g} FLOPs; {hours:,.1f} GPU-hours at 989 TFLOP/s "
                          f"x 40% MFU (assumed)")
    assert not (tmp_path / "sweeps").exists()  # nothing ran


@pytest.mark.parametrize("name,runs", [("paper_wsd_grid", 1152), ("paper_power_search", 525)])
def test_paper_sweeps_are_valid_specs(name, runs):
    from megatron_power.science import sweep

    spec = sweep.load_spec(name)
    grid = sweep.points(spec)
    assert len(grid) == runs
    for point in (grid[0], grid[-1]):  # the smallest and largest corner (checking all 1152 takes minutes)
        config = sweep.point_config(spec, point, check_paths=False)
        assert config.model.seq_length == 4096 and config.model.num_layers == 32 and config.mup.enabled


def test_spec_extends_another_adding_overrides_and_refuses_a_cycle(tmp_path):
    from megatron_power.errors import ConfigError
    from megatron_power.science import sweep

    deep, shallow = sweep.load_spec("paper_wsd_grid"), sweep.load_spec("paper_wsd_grid_shallow")
    assert shallow.name == "paper-wsd-grid-shallow" and shallow.grid == deep.grid
    assert shallow.overrides == deep.overrides + ["model.num_layers=8", "mup.depth_alpha=1", "mup.base_depth=8"]
    config = sweep.point_config(shallow, sweep.points(shallow)[0], check_paths=False)
    assert (config.model.num_layers, config.mup.depth_alpha, config.mup.base_depth) == (8, 1.0, 8)

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\ngrid:\n  schedule.lr_max: [0.01]\n")
    with pytest.raises(ConfigError, match=r"b.yaml: extends a.yaml, which extends it back"):
        sweep.load_spec(str(tmp_path / "a.yaml"))
