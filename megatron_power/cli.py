"""`megatron-power <verb>`: parse, build the config, call one function."""

from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    from megatron_power.config import load_config, world_size_from_env

    config = load_config(args.recipe, args.overrides, world_size_from_env())
    from megatron_power.checkpoint import CheckpointError
    from megatron_power.train import NonFiniteError, train

    try:
        train(config)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _schedule(args) -> int:
    from megatron_power.config import load_config, parse_count
    from megatron_power.scheduler import schedule_table

    config = load_config(args.recipe, args.overrides, args.world_size, check_paths=False)
    try:
        points = [parse_count(a) for a in args.at]
    except ValueError as e:
        print(f"error: --at: {e}", file=sys.stderr)
        return 2
    for line in schedule_table(config, points):
        print(line)
    if args.plot:
        from megatron_power.plots import plot_schedule

        plot_schedule(config, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _data(args) -> int:
    from pathlib import Path

    from megatron_power.data import MANIFEST, build_default_data

    out = Path(args.out)
    existed = (out / MANIFEST).is_file()
    manifest = build_default_data(out, vocab_size=args.vocab_size)
    state = "present" if existed else "built"
    print(f"data {state} in {out}: {manifest['train']['tokens']:,} train / {manifest['valid']['tokens']:,} "
          f"validation tokens, unigram entropy {manifest['unigram_entropy_nats']:.3f} nats")
    return 0


def _config(args) -> int:
    from megatron_power.config import load_config, to_yaml

    print(to_yaml(load_config(args.recipe, args.overrides, args.world_size, check_paths=False)), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-power", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    train = verbs.add_parser("train", help="train a recipe (under torchrun for several processes)")
    train.add_argument("recipe", help="recipe name in recipes/ or a YAML path")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.tokens=2e6 parallel.tp=2")
    train.set_defaults(run=_train)

    data = verbs.add_parser("data", help="build the default corpus, tokenizer and indexed datasets")
    data.add_argument("--out", default="data/stdlib")
    data.add_argument("--vocab-size", type=int, default=8192)
    data.set_defaults(run=_data)

    schedule = verbs.add_parser("schedule", help="print and plot a recipe's learning rate against tokens")
    schedule.add_argument("recipe")
    schedule.add_argument("overrides", nargs="*")
    schedule.add_argument("--at", nargs="+", default=[], metavar="TOKENS",
                          help="token counts to print, e.g. 1e9 26B 1T")
    schedule.add_argument("--plot", metavar="FILE.png")
    schedule.add_argument("--world-size", type=int, default=1)
    schedule.set_defaults(run=_schedule)

    config = verbs.add_parser("config", help="print a recipe with overrides applied, after validation")
    config.add_argument("recipe")
    config.add_argument("overrides", nargs="*")
    config.add_argument("--world-size", type=int, default=1)
    config.set_defaults(run=_config)
    return p


def main(argv=None) -> int:
    from megatron_power.config import ConfigError

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as e:
        # Under torchrun every rank finds the same problem; one of them reports it.
        if int(os.environ.get("RANK", "0")) == 0:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
