"""Fixed against growing global batches on the proxy, at equal tokens, each with the Power lr.

Four runs of `megatron-power train proxy` on the same tokens: a fixed small batch, a fixed large
batch, a ramp stepped by tokens (small, then double at a quarter of the budget, then the large one
from half), and a batch grown with the measured noise scale from the small to the large one
(training/batch_schedule.py). Reported: final validation loss, optimizer steps, wall time; and one
figure with validation loss against tokens and against steps, and the batch against tokens. Runs
go two at a time with one thread each, so wall times compare only between runs of one script.

    .venv/bin/python bench/batch_ramp.py [--tokens 1048576] [--small 16] [--large 64] [--out runs/batch-ramp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_power.science.plots import _pyplot, _save  # noqa: E402

SEQ = 256  # the proxy's sequence length


def variants(tokens: int, small: int, large: int) -> dict:
    quarter = tokens // 4
    return {
        f"fixed {small}": [f"train.global_batch_size={small}"],
        f"fixed {large}": [f"train.global_batch_size={large}"],
        "token ramp": [f"train.global_batch_size={small}",
                       f"train.batch_schedule=[[0,{small}],[{quarter},{2 * small}],[{2 * quarter},{large}]]"],
        "noise-scale ramp": [f"train.global_batch_size={small}", "train.batch_schedule=noise_scale",
                             f"train.batch_growth.ceiling={large}", "train.noise_scale_interval=4",
                             f"train.batch_growth.min_interval={tokens // 16}"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2**20)
    p.add_argument("--small", type=int, default=16)
    p.add_argument("--large", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "batch-ramp")
    args = p.parse_args()
    runs = variants(args.tokens, args.small, args.large)
    # Every run evaluates on the same first 64 validation sequences (eval_batches x its starting batch).
    common = [f"out_dir={args.out}", f"train.tokens={args.tokens}", "train.eval_interval=16",
              "checkpoint.interval=100000", "train.log_interval=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    names = list(runs)
    for pair in (names[:2], names[2:]):
        procs = [subprocess.Popen([str(Path(sys.executable).parent / "megatron-power"), "train", "proxy",
                                   f"name={name.replace(' ', '-')}", *common, *runs[name],
                                   f"train.eval_batches={64 // int(runs[name][0].split('=')[1])}"], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL) for name in pair]
        if any(proc.wait() for proc in procs):
            sys.exit("a run failed; its output is above")
    table = {}
    for name in names:
        rows = [json.loads(line) for line in (args.out / name.replace(" ", "-") / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        valid = [r for r in rows if "valid_loss" in r]
        table[name] = {"final_valid_loss": round(valid[-1]["valid_loss"], 4), "steps": steps[-1]["step"],
                       "wall_s": round(steps[-1]["time"]), "tokens": steps[-1]["tokens"],
                       "valid": [(r["step"], r["tokens"], r["valid_loss"]) for r in valid],
                       "batch": [(r["tokens"], r["batch"]) for r in steps]}
    (args.out / "results.json").write_text(json.dumps(table, indent=1))
    plot(table, args.out / "batch_ramp.png", args.tokens)
    print(f"{'run':<18} {'final valid loss':>16} {'steps':>6} {'wall s':>7}")
    for name, r in table.items():
        print(f"{name:<18} {r['final_valid_loss']:>16.4f} {r['steps']:>6} {r['wall_s']:>7}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'batch_ramp.png'}")


def plot(table: dict, path: Path, tokens: int) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, r) in enumerate(table.items()):
        steps, seen, loss = zip(*r["valid"])
        axes[0].plot(seen, loss, color=f"C{i}", label=f"{name}: {r['final_valid_loss']:.3f}")
        axes[1].plot(steps, loss, color=f"C{i}", label=f"{name}: {r['steps']} steps")
        axes[2].plot(*zip(*r["batch"]), color=f"C{i}", drawstyle="steps-post", label=name)
    axes[0].set_xlabel("tokens seen")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes[:2]:
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
    axes[2].set_xlabel("tokens seen")
    axes[2].set_ylabel("global batch (sequences)")
    axes[2].set_yscale("log", base=2)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"proxy, {tokens:,} tokens, Power lr: fixed against growing batches")
    _save(fig, path)


if __name__ == "__main__":
    main()
