"""Checkpoint merging against a real decay, on the proxy: what a stage-1 Power run's merged
checkpoints say about the loss a decay would reach (WSM, training/merge.py).

Stage 1: `train proxy` with no decay for --steps steps, a checkpoint every --interval steps (all
kept), and checkpoint.merge in the run (the last 4, linear) every 4 intervals. Stage 2: the same
run from its checkpoint --decay-steps before the end, decayed over those steps to the same tokens
(the recipe's exp_ibm shape). At the end, the last checkpoint raw, merges of its newest N with each
weighting (`merge` + `eval`, in this process), and stage 2, all on the same validation batches.

    .venv/bin/python bench/merge_vs_decay.py [--steps 240] [--decay-steps 40] [--interval 10] [--out runs/merge-vs-decay]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_power import cli  # noqa: E402
from megatron_power.training import checkpoint  # noqa: E402

TOKENS_PER_STEP = 32 * 256  # the proxy's global batch x sequence length
MERGES = [(2, "linear"), (4, "linear"), (8, "linear"), (8, "uniform"), (8, "cosine"), (8, "1-sqrt")]


def train(name: str, out: Path, *overrides) -> list:
    subprocess.run([str(Path(sys.executable).parent / "megatron-power"), "train", "proxy", f"out_dir={out}",
                    f"name={name}", "train.log_interval=20", *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def quiet(*argv) -> str:
    """`megatron-power ARGV` in this process; its standard output."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if cli.main([str(a) for a in argv]) != 0:
            sys.exit(f"megatron-power {' '.join(map(str, argv))} failed")
    return printed.getvalue()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--decay-steps", type=int, default=40)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "merge-vs-decay")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    tokens = args.steps * TOKENS_PER_STEP
    stage1 = train("stage1", args.out, f"train.tokens={tokens}", "schedule.decay=0",
                   f"train.eval_interval={args.interval * 4}", f"checkpoint.interval={args.interval}",
                   "checkpoint.keep=1000", f"checkpoint.merge.interval={args.interval * 4}",
                   "checkpoint.merge.last=4", "checkpoint.merge.weights=linear")
    branch = checkpoint.path_of(args.out / "stage1" / "checkpoints", args.steps - args.decay_steps)
    stage2 = train("stage2", args.out, f"train.tokens={tokens}", "train.stage=2", f"checkpoint.init_from={branch}",
                   f"schedule.decay={args.decay_steps * TOKENS_PER_STEP}", f"train.eval_interval={args.interval * 4}")
    config = args.out / "stage1" / "config.yaml"
    rows = [{"model": f"stage 1, step {args.steps} (no decay)",
             "valid_loss": [r for r in stage1 if "valid_loss" in r][-1]["valid_loss"]},
            {"model": f"stage 2: decayed over the last {args.decay_steps} steps",
             "valid_loss": [r for r in stage2 if "valid_loss" in r][-1]["valid_loss"]}]
    for n, weights in MERGES:
        merged = args.out / f"merged-{n}-{weights}"
        quiet("merge", args.out / "stage1", "--last", n, "--weights", weights, merged, "--overwrite")
        loss = float(quiet("eval", config, f"checkpoint.init_from={merged}").split("validation loss")[1].split()[0])
        rows.append({"model": f"stage 1, last {n} checkpoints merged (a {(n - 1) * args.interval}-step window), {weights}",
                     "valid_loss": loss})
    in_run = [(r["step"], r["valid_loss_merged"]) for r in stage1 if "valid_loss_merged" in r]
    raw = {r["step"]: r["valid_loss"] for r in stage1 if "valid_loss" in r}
    result = {"steps": args.steps, "tokens": tokens, "interval": args.interval, "final": rows,
              "in_run": [{"step": s, "raw": raw[s], "merged_last4_linear": m} for s, m in in_run]}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"| model at {tokens:,} tokens | validation loss |\n|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['valid_loss']:.4f} |")
    print("\n| step | raw | last 4 merged (linear) |\n|---|---|---|")
    for r in result["in_run"]:
        print(f"| {r['step']} | {r['raw']:.4f} | {r['merged_last4_linear']:.4f} |")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
