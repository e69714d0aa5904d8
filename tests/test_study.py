"""`megatron-power study`: a real tiny study (both stages, interrupted and resumed, its table fitted by
`fit`), its analysis on a loss surface with known answers (which cells the fit uses, the transfer
gaps), and its SLURM arrays."""

import csv
import math
import signal
import subprocess
import time

import pytest

from helpers import ROOT, TINY, command
from megatron_power.science import fit, study


def write_study(path, out_dir, moe=False):
    overrides = [o for o in TINY if not o.startswith(("schedule.kind", "train.tokens", "train.global_batch_size"))]
    lines = ["name: tiny", "recipe: proxy", f"out_dir: {out_dir}", "jobs: 2", "eval_sequences: 32",
             "lrs: [0.005, 0.02]", "seeds: [1, 2]", "fit: {tokens: [4K, 8K], batch: [8]}",
             "compare: {tokens: [16K], batch: [8]}", "best_batches: 1", "overrides:"]
    lines += [f"  - {o}" for o in overrides]
    if moe:
        lines += ["moe:", "  overrides: [model.num_experts=4, model.moe_ffn_hidden_size=64]",
                  "  widths: [64, 128]", "  lrs: [0.005, 0.02]", "  tokens: 4K", "  batch: 8"]
    path.write_text("\n".join(lines) + "\n")
    return path


def start(*args):
    return subprocess.Popen(command("study", *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_tiny_study_is_interrupted_resumed_and_reported(default_data, tmp_path):
    spec = write_study(tmp_path / "study.yaml", tmp_path / "studies")
    runs = tmp_path / "studies" / "tiny"
    first = start(spec)
    deadline = time.time() + 300
    while not list(runs.glob("*/finished.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 130, out
    assert "points of stage tune to go: `megatron-power study" in out
    finished_first = sorted(p.parent.name for p in runs.glob("*/finished.json"))
    assert 1 <= len(finished_first) < 8, out
    logs = {name: (runs / name / "train.log").read_text() for name in finished_first}

    second = start(spec)
    out = second.communicate(timeout=900)[0]
    assert second.returncode == 0, out
    # Stage 1: WSD's grid at 4K, 8K, 16K and cosine's at 16K (2 lrs, seed 1).
    assert f"8 points, {len(finished_first)} done, {8 - len(finished_first)} to run" in out
    # Stage 2: Power with both seeds; WSD and cosine at their best lr with seed 2.
    assert "4 points, 0 done, 4 to run" in out
    for name, log in logs.items():  # finished points were not run again
        assert (runs / name / "train.log").read_text() == log

    with open(runs / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "finished" and math.isfinite(float(r["valid_loss"])) for r in rows)
    power = [r for r in rows if r["kind"] == "power"]
    assert sorted((r["tokens"], r["seed"]) for r in power) == [("16000", "1"), ("16000", "2")]
    report = (runs / "study.md").read_text()
    table = fit.read_results(runs / "results.csv")
    loss = {(r["kind"], r["tokens"], r["lr"], r["seed"]): r["valid_loss"] for r in table}
    for lr in (0.005, 0.02):  # longer WSD runs reach a lower loss at every grid lr
        assert loss["wsd", 4000, lr, 1] > loss["wsd", 8000, lr, 1] > loss["wsd", 16000, lr, 1]
    # 4K tokens may end before the first noise-scale measurement; the compared runs have one.
    assert all(r["b_simple"] > 0 for r in table if r["tokens"] == 16000)
    for kind in ("wsd", "cosine"):  # the seed-2 rerun is at the grid lr that was best at seed 1
        best = min((0.005, 0.02), key=lambda lr: loss[kind, 16000, lr, 1])
        mean = (loss[kind, 16000, best, 1] + loss[kind, 16000, best, 2]) / 2
        assert f"{mean:.4f}" in report.split("| 16K | 8 |")[1].split("\n")[0]
    power_mean = (loss["power", 16000, 0.04, 1] + loss["power", 16000, 0.04, 2]) / 2  # at the default cap
    wsd_best = min((0.005, 0.02), key=lambda lr: loss["wsd", 16000, lr, 1])
    gap = power_mean - (loss["wsd", 16000, wsd_best, 1] + loss["wsd", 16000, wsd_best, 2]) / 2
    transfer = report.split("## Transfer")[1]
    assert f"| 16K | 8 | {gap:+.4f} |" in transfer
    for figure in ("head_to_head.png", "gamma_fit.png"):
        assert (runs / figure).stat().st_size > 10_000

    # The study's table is a sweep table: `fit` fits each schedule and seed as its own family.
    result = subprocess.run(command("fit", str(runs / "results.csv"), "--out", str(tmp_path / "fit")), cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[width 64, muP, schedule.kind=wsd, train.seed=1] gamma = lr_opt / beta = a * T**b" in result.stdout
    for figure in ("lr_sweep", "gamma_fit", "noise_scale"):
        assert (tmp_path / "fit" / f"{figure}-width64-muP-schedule.kind=wsd-train.seed=1.png").stat().st_size > 10_000
    assert "schedule:\n  kind: power\n  a: " in (tmp_path / "fit" / "fit-width64-muP-schedule.kind=wsd-train.seed=1.yaml").read_text()


def surface_rows(a=2.0, b=-0.4, seeds=(1, 2)):
    """A study's table where WSD's optimum follows lr_opt = beta a T**b in the fit region and sits
    3x higher outside it (a fit that used those cells would not return a and b), cosine is 0.02
    worse, and Power is WSD's tuned loss +0.01 outside the fit region and -0.005 inside."""
    lrs = [0.001 * 2**k for k in range(8)]
    fit_cells = {(t, bs) for t in (1e5, 2e5, 4e5) for bs in (8, 16)}
    rows = []

    def row(kind, tokens, batch, lr, seed, loss, **more):
        rows.append({"status": "finished", "tokens": int(tokens), "batch": batch, "lr": lr, "width": 128, "mup": True,
                     "seq_length": 128, "reference_seq_length": 4096, "valid_loss": loss, "b_simple": None,
                     "kind": kind, "seed": seed, "experts": None, **more})

    def offset(seed):
        return 0.003 * (seed - 1.5)

    for tokens in (1e5, 2e5, 4e5, 8e5):
        for batch in (8, 16, 32):
            optimum = batch * 128 / 4096 * a * tokens**b * (1 if (tokens, batch) in fit_cells else 3)
            floor = 3 + 10 * tokens**-0.2
            for seed in seeds:
                for lr in lrs:
                    wsd = floor + 0.05 * math.log(lr / optimum) ** 2 + offset(seed)
                    row("wsd", tokens, batch, lr, seed, wsd)
                    row("cosine", tokens, batch, lr, seed, wsd + 0.02)
                best = min(lrs, key=lambda lr: abs(math.log(lr / optimum)))
                tuned = floor + 0.05 * math.log(best / optimum) ** 2 + offset(seed)
                row("power", tokens, batch, 0.06, seed, tuned + (-0.005 if (tokens, batch) in fit_cells else 0.01))
    for mup in (True, False):  # MoE: muP's optimum stays at 0.008, SP's halves per doubling of width
        for width in (64, 128, 256):
            optimum = 0.008 if mup else 0.016 * 64 / width
            for lr in lrs:
                rows.append({**rows[0], "width": width, "mup": mup, "lr": lr, "experts": 4, "tokens": 100_000,
                             "batch": 16, "kind": "wsd", "seed": 1, "valid_loss": 5 + 0.1 * math.log(lr / optimum) ** 2})
    return rows


def test_analysis_fits_on_the_fit_region_only_and_measures_the_gap_outside(tmp_path):
    spec = study.StudySpec(name="surface", lrs=[0.001 * 2**k for k in range(8)], seeds=[1, 2], best_batches=2,
                           fit=study.Cells([100_000, 200_000, 400_000], [8, 16]),
                           compare=study.Cells([200_000, 400_000, 800_000], [16, 32]), moe=study.MoeArm())
    report = study.analyse(spec, surface_rows())
    assert report.tuned.law.a == pytest.approx(2.0, rel=1e-9)
    assert report.tuned.law.b == pytest.approx(-0.4, abs=1e-9)
    assert report.fit_cells == sorted((t, b) for t in (100_000, 200_000, 400_000) for b in (8, 16))
    outside = {(t, b) for t in (200_000, 400_000, 800_000) for b in (16, 32)} - set(report.fit_cells)
    assert set(report.transfer) == outside and not outside & set(report.fit_cells)
    assert all(gap == pytest.approx(0.01, abs=1e-12) for gap in report.transfer.values())
    for outcome in report.outcomes.values():
        assert outcome["cosine"].mean - outcome["wsd"].mean == pytest.approx(0.02, abs=1e-12)
        assert outcome["wsd"].spread == pytest.approx(0.0015, abs=1e-12)
    text = study.markdown(spec, report)
    assert "| 800K | 32 | +0.0100 |" in text
    assert "| 200K | 16 | " in text.split("## Transfer")[0] and "| 200K | 16 | " not in text.split("## Transfer")[1]
    assert "muP: the best lr moves 0 grid steps" in text and "SP: the best lr moves 2 grid steps" in text


def test_study_submits_its_first_stage_as_a_slurm_array(default_data, tmp_path):
    spec = write_study(tmp_path / "study.yaml", tmp_path / "studies", moe=True)
    result = start(spec, "--slurm", "--cpu", "--dry-run", "--time", "10")
    script = result.communicate(timeout=300)[0]
    assert result.returncode == 0, script
    assert "#SBATCH --array=0-15" in script  # 8 dense grid points and 8 MoE ones; stage 2 waits for them
    points = (tmp_path / "studies" / "tiny" / "points.txt").read_text().splitlines()
    assert len(points) == 16
    assert sum("schedule.kind=cosine" in p for p in points) == 2
    moe = [p for p in points if "model.num_experts=4" in p]
    assert len(moe) == 8 and all("train.tokens=4K" in p for p in moe)
    assert any("model.moe_ffn_hidden_size=128" in p and "model.hidden_size=128" in p for p in moe)  # scaled
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_bad_study_spec_is_refused_in_one_line_per_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lrs: [0.01]\nfit: {tokens: [8K], batch: [8]}\ncompare: {tokens: [8K], batch: [8]}\nbest_batches: 0\n")
    result = subprocess.run(command("study", str(path)), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "lrs: expected two learning rates or more" in result.stderr
    assert "fit.tokens: expected two token budgets or more to fit b on, got ['8K']" in result.stderr
    assert "compare: every cell is inside the fit region" in result.stderr
    assert "best_batches: expected at least 1 (the batch sizes per budget the fit of gamma keeps), got 0" in result.stderr
