"""`megatron-power <verb>`: parse, build the config, call one function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

from megatron_power.errors import ConfigError, DataError, UserError
from megatron_power.writable import require_writable

# Megatron-Core warns at import that it uses its own kernels without Transformer Engine and Apex:
# the expected state on CPU machines and login nodes (a GPU run without TE says so in its log).
warnings.filterwarnings("ignore", message="(Transformer Engine and Apex are|Apex is) not installed")
# Megatron's and torch's notices about their own internals, printed on every run or every resume;
# nothing a user of a recipe can act on.
warnings.filterwarnings("ignore", message="full scope is deprecated")
warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.checkpoint")
warnings.filterwarnings("ignore", message="MimoModelConfig is experimental")
# torch's notice that its own `load` changed argument order, raised by Megatron's call into it.
warnings.filterwarnings("ignore", message="The argument order of load has been changed")
# Megatron reads a checkpoint's common state in one process, outside torch.distributed, by design.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# Engine notices logged (not warned) on every run, by the logger that emits them: a logger's
# filters see only its own records. GPTModel's deprecation: the README's "Engine" section says
# why this repository stays on it. The async-save notice is logged by every synchronous save too;
# load_common's by every read of a megatron-core 0.16 checkpoint. PyPI's torch for Python 3.12 is
# a CUDA build, which says so on a CPU machine.
_ENGINE_NOTICES = {
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
}
for _logger, _prefix in _ENGINE_NOTICES.items():
    logging.getLogger(_logger).addFilter(lambda record, prefix=_prefix: not record.getMessage().startswith(prefix))


# No argparse default, so that a --widths given beside --depths can be refused.
COORDCHECK_WIDTHS = "64,128,256,512"


def _at_least_one(args, *options: str) -> None:
    """One line for the first of these numeric options (e.g. "--gpus") given a value below 1."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and not value >= 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")


def _train(args) -> int:
    from megatron_power.training.signals import StopRequest

    stop = StopRequest()
    from megatron_power.config import load_config, world_size_from_env

    config = load_config(args.recipe, args.overrides, world_size_from_env(), smoke=args.smoke)
    from megatron_power.training.loop import train

    train(config, stop)
    return 0


def _eval(args) -> int:
    from megatron_power.config import load_config, world_size_from_env
    from megatron_power.training.evaluation import evaluate_checkpoint

    config = load_config(args.recipe, args.overrides, world_size_from_env())
    loss, source = evaluate_checkpoint(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"validation loss {loss:.6f} ({source}, {config.train.eval_batches} batches "
              f"of {config.train.global_batch_size} x {config.model.seq_length} tokens)")
    return 0


def _merge(args) -> int:
    from pathlib import Path

    # Merging reads and writes on the CPU in fp32 wherever it runs, as conversion does.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from megatron_power.training.merge import write_merged

    weights = write_merged([Path(p) for p in args.checkpoints], args.last, args.weights, Path(args.out),
                           args.overwrite)
    print(f"wrote {args.out}: {len(weights)} checkpoints merged, weights (oldest first) "
          f"{', '.join(f'{w:.4f}' for w in weights)}")
    return 0


def _schedule(args) -> int:
    from pathlib import Path

    from megatron_power.config import load_config, parse_count
    from megatron_power.training.schedule import power_law_note, schedule_table

    _at_least_one(args, "--world-size")
    config = load_config(args.recipe, args.overrides, args.world_size, check_paths=False)
    if args.plot:
        require_writable(Path(args.plot).parent, "--plot")
    try:
        points = [parse_count(a) for a in args.at]
    except ValueError as e:
        raise ConfigError(f"--at: {e}") from None
    note = power_law_note(config.schedule, config.train.tokens, config.tokens_per_step)
    if note:
        print(note)
    for line in schedule_table(config, points):
        print(line)
    if args.plot:
        from megatron_power.science.plots import plot_schedule

        plot_schedule(config, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _data(args) -> int:
    from pathlib import Path

    from megatron_power.training.data import MANIFEST, build_default_data

    out = Path(args.out)
    existed = (out / MANIFEST).is_file()
    if not existed:
        require_writable(out, "--out", DataError)
    manifest = build_default_data(out, vocab_size=args.vocab_size)
    state = "present" if existed else "built"
    print(f"data {state} in {out}: {manifest['train']['tokens']:,} train / {manifest['valid']['tokens']:,} "
          f"validation tokens, unigram entropy {manifest['unigram_entropy_nats']:.3f} nats")
    return 0


def _tokenizer(args) -> int:
    from pathlib import Path

    from tokenizer import sources, spm

    special = [t for t in args.special_tokens.split(",") if t]
    twice = sorted({t for t in special if special.count(t) > 1})
    if twice:
        raise ConfigError(f"--special-tokens: {', '.join(twice)} given more than once (each piece once)")
    spm.check_vocab_size(args.vocab_size, special)
    paths = sources.check_inputs(args.inputs)
    require_writable(Path(args.out).absolute().parent, "--out", DataError)
    existing = spm.model_path(Path(args.out))
    if existing.exists():
        raise DataError(f"--out {args.out}: {existing} exists (datasets encoded with it would no longer match its "
                        f"ids); give another prefix, or delete it first")
    problems = sources.Problems(args.on_error)
    texts = sources.documents(paths, args.field, problems)
    model = spm.train(spm.paragraphs(texts), Path(args.out), args.vocab_size, args.model_type,
                      args.max_sentences, special)
    print(f"wrote {model}")
    print("\n".join(problems.summary()))
    return 0


def _preprocess(args) -> int:
    from pathlib import Path

    from tokenizer import preprocess, sources, spm

    paths = sources.check_inputs(args.inputs)
    if not Path(args.tokenizer).is_file():
        raise DataError(f"--tokenizer {args.tokenizer}: no such file (expected a sentencepiece .model)")
    spm.load(args.tokenizer)  # one line naming the file when it is not a sentencepiece model
    _at_least_one(args, "--workers")
    if not 0 <= args.valid_fraction < 1:
        raise DataError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    out = Path(args.out)
    require_writable(out.absolute().parent, "--out", DataError)
    valid = out.with_name(out.name + "_valid") if args.valid_fraction > 0 else None
    if preprocess.is_complete(out) and (valid is None or preprocess.is_complete(valid)):
        print(f"{out}.bin/.idx already complete; nothing to do (delete them to rebuild)")
        return 0
    problems = sources.Problems(args.on_error)
    start = time.time()
    stats = preprocess.write_indexed_dataset(sources.documents(paths, args.field, problems), Path(args.tokenizer),
                                             out, args.workers, desc="preprocess", valid_prefix=valid,
                                             valid_fraction=args.valid_fraction)
    seconds = time.time() - start
    for split, counts in stats.items():
        print(f"{split}: {counts['documents']:,} documents, {counts['tokens']:,} tokens -> "
              f"{out if split == 'train' else valid}.bin/.idx")
    total = sum(c["tokens"] for c in stats.values())
    print(f"{seconds:.1f} s, {total / max(seconds, 1e-9):,.0f} tokens/s with {args.workers} worker(s)")
    print("\n".join(problems.summary()))
    return 0


def _coordcheck(args) -> int:
    from pathlib import Path

    from megatron_power.config import load_config
    from megatron_power.science import coordcheck

    _at_least_one(args, "--steps")
    if args.widths and args.depths:
        raise ConfigError("--widths and --depths: give one (a check against width, or against depth at the "
                          "recipe's width)")
    option, given = ("--depths", args.depths) if args.depths else ("--widths", args.widths or COORDCHECK_WIDTHS)
    try:
        sizes = sorted({int(w) for w in given.split(",")})
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated integers, got '{given}'") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(f"{option}: expected two or more positive sizes, got {sizes}")
    config = load_config(args.recipe, args.overrides)
    out = Path(args.out or config.run_dir / "coordcheck")
    require_writable(out, "--out")
    if args.depths:
        rows = coordcheck.run(config, args.steps, depths=sizes)
    else:
        for width in sizes:
            config.model.at_width(width)  # refuses a width that is not a multiple of the head size
        rows = coordcheck.run(config, args.steps, widths=sizes)
    coordcheck.write(rows, out)
    print("\n".join(coordcheck.summary(rows)))
    print(f"wrote {out / 'coordcheck.csv'} and {out / 'coordcheck.png'}")
    return 0


def _params(args) -> int:
    from megatron_power.config import load_config
    from megatron_power.science import params

    for line in params.table(load_config(args.recipe, args.overrides)):
        print(line)
    return 0


def _plan(args) -> int:
    from megatron_power.config import load_config
    from megatron_power.ops import plan

    _at_least_one(args, "--gpus", "--gpu-memory")
    config = load_config(args.recipe, args.overrides, args.gpus, check_paths=False)
    vocab = config.model.vocab_size
    if vocab is None:
        raise ConfigError("plan needs model.vocab_size (the recipe's vocabulary), e.g. model.vocab_size=49152")
    counts = plan.count_parameters(config, vocab)
    print("\n".join(plan.report(config, counts, args.gpus, args.gpu_memory)))
    return 0 if plan.fits(plan.memory_per_gpu(config, counts, args.gpus), args.gpu_memory) else 1


def _config(args) -> int:
    from megatron_power.config import load_config, to_yaml

    _at_least_one(args, "--world-size")
    print(to_yaml(load_config(args.recipe, args.overrides, args.world_size, check_paths=False, smoke=args.smoke)), end="")
    return 0


def _submit(args) -> int:
    from pathlib import Path

    from megatron_power.ops.submit import Submission, submit

    return submit(Submission(
        recipe=args.recipe, overrides=args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpu=args.cpu, cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
        time=args.time, container=args.container, container_mounts=args.container_mounts,
        signal_lead=args.signal_lead, job_name=args.job_name, array=args.array, log_dir=Path(args.log_dir).absolute(),
        gpu_memory=args.gpu_memory,
    ), dry_run=args.dry_run)


def _sweep(args) -> int:
    from megatron_power.science import sweep

    if args.plan:
        _at_least_one(args, "--peak-tflops")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    _check_points_options(args)
    spec = sweep.load_spec(args.spec)
    if args.jobs:
        spec.jobs = args.jobs
    processes = args.gpus_per_node if args.slurm else 1
    grid = sweep.check(spec, world_size=processes, check_paths=not (args.plan or args.check))
    if args.check:
        print(f"{spec.name}: the spec and its {len(grid)} points' configs are valid")
        return 0
    if args.plan:
        from megatron_power.config import format_count

        cost = sweep.compute_plan(grid, args.peak_tflops, args.mfu)
        print(f"{spec.name}: {cost.runs} runs, {format_count(cost.tokens, '.4g')} tokens, {cost.flops:.3g} FLOPs; "
              f"{cost.gpu_hours:,.1f} GPU-hours at {cost.peak_tflops:g} TFLOP/s x {cost.mfu:.0%} MFU (assumed)")
        return 0
    if args.collect:
        results = sweep.collect(spec, grid)
        print(f"wrote {results}")
        return _fit_when_complete(spec, grid, results)
    if args.slurm:
        todo = [p for p in grid if not sweep.status(spec.dir / p.name).done]
        if not todo:
            results = sweep.collect(spec, grid)
            print(f"every point of {spec.name} is done; wrote {results}")
            return _fit_when_complete(spec, grid, results)
        rc = _submit_array(spec, grid, todo, args, processes)
        if rc == 0 and not args.dry_run:
            print(f"{len(todo)} of {len(grid)} points submitted; when they are done: "
                  f"megatron-power sweep {args.spec} --collect")
        return rc
    outcomes = sweep.run_local(spec, grid, cpu_only=args.cpu)
    results = sweep.collect(spec, grid)
    counts = {}
    for outcome in outcomes.values():
        counts[outcome.split(" ")[0]] = counts.get(outcome.split(" ")[0], 0) + 1
    print(f"{', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'nothing to run'}; wrote {results}")
    if counts.get(sweep.Status.PENDING.value) or counts.get(sweep.Status.STARTED.value):
        print(f"interrupted: run `megatron-power sweep {args.spec}` again to continue where it stopped")
        return 130
    if counts.get("failed"):
        return 1
    return _fit_when_complete(spec, grid, results)


def _submit_array(spec, grid, todo, args, processes) -> int:
    """The `todo` points of `grid`, all in `spec`'s directory, as one SLURM job array."""
    from pathlib import Path

    from megatron_power.ops.submit import Submission, submit
    from megatron_power.science import sweep

    return submit(Submission(
        recipe=spec.recipe, overrides=spec.overrides + [f"out_dir={spec.dir}"], nodes=1,
        gpus_per_node=processes, cpu=args.cpu, cpus_per_task=args.cpus_per_task, partition=args.partition,
        account=args.account, time=args.time, container=args.container, container_mounts=args.container_mounts,
        signal_lead=args.signal_lead, job_name=spec.name, log_dir=Path(args.log_dir).absolute(),
        array=sweep.array_indices([p.index for p in todo]) + (f"%{args.max_running}" if args.max_running else ""),
        points_file=sweep.write_points_file(spec, grid)), dry_run=args.dry_run)


def _study(args) -> int:
    from megatron_power.science import fit, study, sweep

    _check_points_options(args)
    spec = study.load_spec(args.spec)
    if args.jobs:
        spec.jobs = args.jobs
    processes = args.gpus_per_node if args.slurm else 1
    base = spec.sweep()
    # Stage 2's configs, with placeholders for what stage 1 decides, are checked before anything runs.
    paths = not args.check
    sweep.check(base, processes, paths, grid=study.compare_points(spec, None), compare_saved=False)
    stages = [("tune", sweep.check(base, processes, paths, grid=study.tune_points(spec)))]
    if args.check:
        print(f"{spec.name}: the spec and the {len(stages[0][1])} points of its first stage are valid")
        return 0
    done = []
    while True:
        name, grid = stages[-1]
        todo = [p for p in grid if not sweep.status(spec.dir / p.name).done]
        if todo and not args.collect:
            if args.slurm:
                rc = _submit_array(spec, grid, todo, args, processes)
                if rc == 0 and not args.dry_run:
                    print(f"stage {name}: {len(todo)} of {len(grid)} points submitted; when they are done, "
                          f"`megatron-power study {args.spec} --slurm` again submits the next stage")
                return rc
            print(f"stage {name} of study {spec.name}:")
            outcomes = sweep.run_local(base, grid, cpu_only=args.cpu)
            # A point stopped by Ctrl-C before it could save also reads "failed": a rerun starts it over.
            print("".join(f"{p}: {o}\n" for p, o in outcomes.items() if o.startswith("failed")), end="")
            todo = [p for p in grid if not sweep.status(spec.dir / p.name).done]
        results = sweep.collect(base, done + grid)
        if todo:
            print(f"wrote {results}; {len(todo)} points of stage {name} to go: "
                  f"`megatron-power study {args.spec}` again continues where it stopped")
            return 130 if not args.collect else 0
        done += grid
        if name == "compare":
            break
        tuned = study.tune_results(spec, fit.read_results(results))
        stages.append(("compare", sweep.check(base, processes, grid=study.compare_points(spec, tuned))))
    report = study.write_report(spec, study.analyse(spec, fit.read_results(results)), spec.dir)
    print(report.read_text())
    print(f"table: {results}; report and figures: {spec.dir}")
    return 0


def _fit_when_complete(spec, grid, results) -> int:
    """Once every point is done, `fit` on the table (where matplotlib is installed)."""
    from megatron_power.science import fit, sweep

    if not all(sweep.status(spec.dir / p.name).done for p in grid):
        return 0
    try:
        import matplotlib  # noqa: F401  (the figures need it; `make sweep` installs it)
    except ImportError:
        print(f"every point is done: `megatron-power fit {results}` fits and plots them (needs matplotlib)")
        return 0
    print("\n".join(fit.run(results, results.parent)))
    return 0


def _fit(args) -> int:
    from pathlib import Path

    from megatron_power.science import fit

    results = Path(args.results)
    _at_least_one(args, "--best-batches")
    out = Path(args.out) if args.out else results.parent
    require_writable(out, "--out")
    print("\n".join(fit.run(results, out, args.best_batches)))
    return 0


def _convert(args) -> int:
    from pathlib import Path

    # Conversion reads and writes on the CPU in fp32 wherever it runs (a GPU would build a bf16
    # model, and --verify compares in fp32).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.direction == "to-hf":
        from megatron_power.convert import to_hf

        if not args.max_shard_gb > 0:
            raise ConfigError(f"--max-shard-gb {args.max_shard_gb:g} (expected a positive size in GiB)")
        to_hf.convert(Path(args.ckpt), Path(args.out), args.dtype, args.verify, args.overwrite,
                      Path(args.tokenizer) if args.tokenizer else None, int(args.max_shard_gb * 2**30))
    else:
        from megatron_power.convert import from_hf

        from_hf.convert(Path(args.hf_dir), Path(args.out), args.recipe, args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _rewind(args) -> int:
    from pathlib import Path

    from megatron_power.training import rewind

    run = Path(args.run_dir)
    if args.to is None:
        found = rewind.checkpoints(run)
        print(f"{run} has {len(found)} complete checkpoint{'s' * (len(found) != 1)}:")
        for saved in found:
            loss = f", loss {saved.loss:.4f}" if saved.loss is not None else ""
            print(f"  step {saved.step}: " + (f"damaged, {saved.problem}" if saved.problem else f"{saved.tokens:,} tokens{loss}"))
        print(f"`megatron-power rewind {run} --to STEP` makes the next train of this run go on from STEP")
        return 0
    moved, aside = rewind.rewind(run, args.to)
    if not moved:
        print(f"step {args.to} is already the newest checkpoint of {run}; nothing was moved")
        return 0
    print(f"{run} now resumes from step {args.to}: {', '.join(moved)} and a copy of metrics.jsonl were moved to "
          f"{aside} (remove it once it is no longer needed). Train the run again to go on from there, "
          f"with any override it needs (a lower schedule.lr_max; train.skip_steps=A-B to pass over the data of "
          f"the steps around a spike); the log names each one.")
    return 0


def _slurm_options(verb: argparse.ArgumentParser, gpus_per_node: int) -> None:
    verb.add_argument("--gpus-per-node", type=int, default=gpus_per_node, help="processes per node, one per GPU")
    verb.add_argument("--cpu", action="store_true", help="CPU only: request no GPUs (SLURM), use none (local sweep)")
    verb.add_argument("--cpus-per-task", type=int)
    verb.add_argument("--partition")
    verb.add_argument("--account")
    verb.add_argument("--time", help="SLURM time limit, e.g. 4:00:00 or 2-00:00:00")
    verb.add_argument("--container", help="pyxis/enroot image (--container-image)")
    verb.add_argument("--container-mounts", help="extra mounts; the repository is always mounted")
    verb.add_argument("--signal-lead", type=int, default=180,
                      help="seconds before the time limit to checkpoint and requeue")
    verb.add_argument("--log-dir", default="logs")
    verb.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")


def _points_verb(verbs, name: str, help: str, specs_dir: str, collect_help: str, slurm_help: str):
    """A verb that runs a spec's points like `sweep`: locally, `--collect`ed, or as a SLURM array."""
    verb = verbs.add_parser(name, help=help)
    verb.add_argument("spec", help=f"{name} spec name in {specs_dir} or a YAML path")
    verb.add_argument("--jobs", type=int, help="points at once on this machine (default: the spec's, else GPUs or cores)")
    verb.add_argument("--collect", action="store_true", help=collect_help)
    verb.add_argument("--check", action="store_true",
                      help="check the spec and every point's config (not its data), and run nothing")
    verb.add_argument("--slurm", action="store_true", help=slurm_help)
    verb.add_argument("--max-running", type=int, help="SLURM: array tasks running at once")
    _slurm_options(verb, gpus_per_node=1)
    verb.set_defaults(slurm_defaults={dest: verb.get_default(dest) for dest in SLURM_ONLY})
    return verb


# Options of a spec's SLURM job array, which a run of its points on this machine would ignore.
SLURM_ONLY = ("gpus_per_node", "cpus_per_task", "partition", "account", "time", "container", "container_mounts",
              "signal_lead", "log_dir", "dry_run", "max_running")


def _check_points_options(args) -> None:
    """One line for a count below 1, or for SLURM's options given to a run on this machine."""
    _at_least_one(args, "--jobs", "--max-running")
    given = [f"--{dest.replace('_', '-')}" for dest, default in args.slurm_defaults.items()
             if getattr(args, dest) != default]
    if given and not args.slurm:
        raise ConfigError(f"{', '.join(given)}: for --slurm only (this machine's runs take none of SLURM's options): "
                          f"add --slurm to submit the points as a job array, or leave {'it' if len(given) == 1 else 'them'} out")


def _recipe_fields() -> str:
    """Every recipe key with its type, default and documentation, for `config --help`."""
    import textwrap

    from megatron_power.config.schema import field_docs

    out = ["recipe keys (set in a recipe's YAML or as overrides, e.g. schedule.lr_max=0.01):"]
    for key, kind, doc in field_docs():
        out.append(f"  {key}  ({kind})")
        out += textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      ") if doc else []
    return "\n".join(out)


def _recipe_verb(verbs, name: str, run, help: str) -> argparse.ArgumentParser:
    """A verb that takes a recipe and dotted overrides."""
    verb = verbs.add_parser(name, help=help)
    verb.add_argument("recipe", help="recipe name in recipes/ or a YAML path")
    verb.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.tokens=2e6 parallel.tp=2")
    verb.set_defaults(run=run)
    return verb


def parser() -> argparse.ArgumentParser:
    from megatron_power.config import DEFAULT_DATA_DIR

    p = argparse.ArgumentParser(prog="megatron-power", description=__doc__)
    verbs = p.add_subparsers(dest="verb", required=True)

    train = _recipe_verb(verbs, "train", _train, "train a recipe (under torchrun for several processes)")
    smoke_help = "the recipe shrunk to CPU size, same structure and layout kinds (parallel sizes capped at 2)"
    train.add_argument("--smoke", action="store_true", help=smoke_help)

    _recipe_verb(verbs, "eval", _eval, "validation loss of the weights of checkpoint.init_from, in the "
                 "recipe's layout (under torchrun for several processes)")
    merge = verbs.add_parser("merge", help="average a run's last checkpoints (WSM) into a checkpoint of its own")
    merge.add_argument("checkpoints", nargs="+", metavar="RUN_OR_CHECKPOINT",
                       help="a run folder or checkpoints directory (with --last), or iter_* checkpoints, oldest first")
    merge.add_argument("out", help="the checkpoints directory to write (must not exist or be empty)")
    merge.add_argument("--last", type=int, default=0, help="merge the newest N checkpoints")
    merge.add_argument("--weights", default="uniform",
                       help="uniform | linear | cosine | 1-sqrt (a decay over the window, by WSM's duality), or N "
                            "comma-separated numbers")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    merge.set_defaults(run=_merge)

    rewind = verbs.add_parser("rewind", help="take a run back to an earlier checkpoint (after a loss spike): its "
                              "next train goes on from there; the newer checkpoints are moved aside, not deleted")
    rewind.add_argument("run_dir", metavar="RUN", help="a run folder, e.g. runs/proxy")
    rewind.add_argument("--to", type=int, metavar="STEP", help="the step of the checkpoint to go back to "
                        "(without it: list the run's checkpoints)")
    rewind.set_defaults(run=_rewind)

    data = verbs.add_parser("data", help="build the default corpus, tokenizer and indexed datasets")
    data.add_argument("--out", default=str(DEFAULT_DATA_DIR))
    data.add_argument("--vocab-size", type=int, help="pieces of its tokenizer (default: what --out holds, else "
                      "8192)")
    data.set_defaults(run=_data)

    tok = verbs.add_parser("tokenizer", help="train a sentencepiece tokenizer on corpus files")
    tok.add_argument("inputs", nargs="+", help=".txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
    tok.add_argument("--out", required=True, help="output prefix: writes PREFIX.model")
    tok.add_argument("--vocab-size", type=int, default=49152)
    tok.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tok.add_argument("--special-tokens", default="", help="comma-separated pieces never split")
    tok.add_argument("--max-sentences", type=int, default=2_000_000, help="sample size for training")
    tok.add_argument("--field", default="text", help="the text field of JSON lines and Parquet")
    tok.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="bad documents")
    tok.set_defaults(run=_tokenizer)

    pre = verbs.add_parser("preprocess", help="corpus files -> Megatron indexed dataset (.bin/.idx)")
    pre.add_argument("inputs", nargs="+", help=".txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
    pre.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    pre.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    pre.add_argument("--valid-fraction", type=float, default=0.0,
                     help="documents (chosen by a hash of their text) written to PREFIX_valid instead")
    pre.add_argument("--field", default="text", help="the text field of JSON lines and Parquet")
    pre.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="bad documents")
    pre.set_defaults(run=_preprocess)

    schedule = _recipe_verb(verbs, "schedule", _schedule, "print and plot a recipe's learning rate against tokens")
    schedule.add_argument("--at", nargs="+", default=[], metavar="TOKENS",
                          help="token counts to print, e.g. 1e9 26B 1T")
    schedule.add_argument("--plot", metavar="FILE.png")
    schedule.add_argument("--world-size", type=int, default=1)

    coord = _recipe_verb(verbs, "coordcheck", _coordcheck,
                         "muP coordinate check: activation RMS against width, or against depth (--depths)")
    coord.add_argument("--widths", help=f"against width (default {COORDCHECK_WIDTHS})")
    coord.add_argument("--depths", help="e.g. 2,4,8,16: against depth at the recipe's width, with and without "
                                        "mup.depth_alpha (default 1, CompleteP) on a base of the smallest")
    coord.add_argument("--steps", type=int, default=5)
    coord.add_argument("--out", help="output directory (default: runs/<name>/coordcheck)")

    _recipe_verb(verbs, "params", _params, "list every parameter with its lr, weight decay and initial std")

    plan = _recipe_verb(verbs, "plan", _plan, "parameters, FLOPs per token and memory per GPU of a recipe's layout")
    plan.add_argument("--gpus", type=int, default=8)
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (H100: 80)")

    sub = _recipe_verb(verbs, "submit", _submit, "render the SLURM script for a recipe, check it, and sbatch it")
    sub.add_argument("--nodes", type=int, default=1)
    sub.add_argument("--job-name")
    sub.add_argument("--array", help="job array indices, e.g. 0-15%%4")
    sub.add_argument("--gpu-memory", type=float, default=80.0,
                     help="GiB per GPU; the planner must fit the layout in 90%% of it (H100: 80)")
    _slurm_options(sub, gpus_per_node=8)

    sweep = _points_verb(verbs, "sweep", "run a grid of proxy runs (locally or as a SLURM array) into results.csv",
                         "recipes/sweeps/", "only write results.csv from the runs on disk",
                         "submit the unfinished points as a SLURM job array")
    sweep.add_argument("--plan", action="store_true",
                       help="print the runs, tokens and estimated GPU-hours; run nothing")
    sweep.add_argument("--peak-tflops", type=float, default=989.0, help="--plan: dense bf16 peak (H100 SXM: 989)")
    sweep.add_argument("--mfu", type=float, default=0.3,
                       help="--plan: assumed model FLOPs utilisation (dense3b measured 38%% on one H100; proxies run lower)")
    sweep.set_defaults(run=_sweep)

    study = _points_verb(verbs, "study", "Power vs tuned WSD and cosine, transfer to unseen cells, MoE muTransfer",
                         "recipes/studies/", "only write results.csv (and the report, once complete)",
                         "submit the unfinished points of the current stage as a SLURM array")
    study.set_defaults(run=_study)

    fit = verbs.add_parser("fit", help="fit a and b of the Power scheduler (and more) to a sweep's results.csv")
    fit.add_argument("results", help="a sweep's results.csv")
    fit.add_argument("--out", help="where figures and fit.yaml go (default: beside the results)")
    fit.add_argument("--best-batches", type=int, default=3, help="batch sizes per token budget in the fit")
    fit.set_defaults(run=_fit)

    convert = verbs.add_parser("convert", help="checkpoints to and from Hugging Face (Granite, GraniteMoe)")
    direction = convert.add_subparsers(dest="direction", required=True)
    to_hf = direction.add_parser("to-hf", help="a checkpoint of any layout -> a Hugging Face directory")
    to_hf.add_argument("ckpt", help="a run folder or its checkpoints directory (its latest), or one iter_* checkpoint")
    to_hf.add_argument("out", help="the Hugging Face directory to write (must not exist or be empty)")
    to_hf.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    to_hf.add_argument("--verify", action="store_true",
                       help="compare the logits of both models on the same tokens; fail over 1e-4 relative")
    to_hf.add_argument("--tokenizer", help="the run's sentencepiece model, if not where its config says")
    to_hf.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors file, GiB")
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    to_hf.set_defaults(run=_convert)
    from_hf = direction.add_parser("from-hf", help="Granite / GraniteMoe weights -> a checkpoint to train from")
    from_hf.add_argument("hf_dir", help="a Hugging Face model directory (config.json, safetensors)")
    from_hf.add_argument("out", help="the checkpoints directory to write; train with checkpoint.init_from=OUT")
    from_hf.add_argument("--recipe", help="the recipe that will train it; must have the weights' shape")
    from_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    from_hf.set_defaults(run=_convert)

    config = _recipe_verb(verbs, "config", _config, "print a recipe with overrides applied, after validation")
    config.add_argument("--world-size", type=int, default=1)
    config.add_argument("--smoke", action="store_true", help=smoke_help)
    config.formatter_class = argparse.RawDescriptionHelpFormatter
    config.epilog = _recipe_fields()
    return p


def main(argv=None) -> int:
    cli = parser()
    args, extra = cli.parse_known_args(argv)
    # Overrides may also follow the options (`coordcheck proxy --steps 3 model.num_layers=2`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        cli.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one elsewhere
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        if not e.same_on_every_rank or int(os.environ.get("RANK", "0")) == 0:
            for line in str(e).splitlines():
                print(f"error: {line}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
