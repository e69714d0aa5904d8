"""Bad recipes and overrides are refused with one clear line each, before any work starts."""

import itertools
import re
import shutil
import subprocess

import pytest

from helpers import ROOT, SHAKESPEARE, command, megatron_power, truncate
from megatron_power import cli
from megatron_power.config import load_config, parse_count
from megatron_power.errors import ConfigError

BAD = [
    # (overrides, world size, what the message must say)
    (["model.num_attention_heads=6"], 1, "model.hidden_size (256) must be divisible by model.num_attention_heads (6)"),
    (["parallel.tp=8"], 8, "model.num_attention_heads (4) must be divisible by parallel.tp (8)"),
    (["parallel.pp=3"], 3, "model.num_layers (4) must be divisible by parallel.pp (3)"),
    (["train.global_batch_size=30"], 1, "train.global_batch_size (30) must be divisible by train.micro_batch_size x data-parallel size (8 x 1)"),
    (["parallel.tp=2"], 3, "world size 3 must be a multiple of parallel.tp x parallel.pp (2 x 1 = 2)"),
    (["model.hiden_size=64"], 1, "unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?"),
    (["trian.tokens=1M"], 1, "unknown key 'trian"),
    (["model.num_layers=four"], 1, "model.num_layers"),
    (["train.tokens=lots"], 1, "train.tokens: 'lots' is not a count"),
    # Said "is not a whole number" and "Incompatible value 'None' for field of type 'str'".
    (["schedule.decay=1.5"], 1, "schedule.decay: '1.5' is neither a whole count of tokens nor a fraction below 1"),
    (["out_dir="], 1, "override: out_dir: needs a value, got none"),
    (["data.train=[missing/prefix]"], 1, "data.train: missing/prefix.bin/.idx not found"),
    (["data.tokenizer=nowhere.model"], 1, "data.tokenizer: nowhere.model not found"),
    (["schedule.b=0.5"], 1, "schedule.b must be negative"),
    (["train.skip_steps=9-5"], 1, "train.skip_steps: '9-5' is not a step or a range of steps"),
    (["train.skip_steps=5-6", "profile.start_step=3"], 1, "profiles steps 3-6 (the last counts host "
     "synchronisations), which train.skip_steps (5-6) passes over"),
    (["schedule.a=0"], 1, "schedule.a must be positive"),
    (["schedule.reference_seq_length=0"], 1, "schedule.reference_seq_length must be a positive number of tokens"),
    (["schedule.kind=triangle"], 1, "schedule.kind 'triangle' is unknown"),
    # Accepted before: the run then failed at its first evaluation (a mean over no batches).
    (["train.eval_batches=0"], 1, "train.eval_batches must be positive, got 0"),
    # Accepted before, then a traceback at init (normal std < 0), at the optimizer (beta >= 1) or at
    # the experts' build (width 0); a NaN std would have trained NaNs.
    (["model.init_std=-1"], 1, "model.init_std must be positive, got -1.0"),
    (["model.init_std=nan"], 1, "model.init_std must be positive, got nan"),
    (["optim.beta1=1.5"], 1, "optim.beta1 must be in [0, 1), got 1.5"),
    (["optim.weight_decay=-0.1"], 1, "optim.weight_decay must be >= 0, got -0.1"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=0"], 1,
     "model.moe_ffn_hidden_size (0) must be set, positive and divisible by parallel.tp (1)"),
    (["schedule.decay_shape=cubic"], 1, "schedule.decay_shape 'cubic' is unknown"),
    (["schedule.warmup=3M", "schedule.decay=2M"], 1, "exceed the token budget train.tokens (4,000,000)"),
    (["train.tokens=100"], 1, "train.tokens (100) is less than one step"),
    (["name=a/b"], 1, "name 'a/b' must be letters"),
    (["model.num_query_groups=3"], 1, "model.num_attention_heads (4) must be divisible by model.num_query_groups (3)"),
    (["tokens"], 1, "override 'tokens' is not of the form key=value"),
    (["parallel.ep=2"], 2, "parallel.ep (2) needs a MoE model"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "parallel.ep=3"], 3, "model.num_experts (4) must be divisible by parallel.ep (3)"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "parallel.tp=2"], 2, "MoE with parallel.tp > 1 needs parallel.sequence_parallel=true"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=64", "model.moe_topk=5"], 1, "model.moe_topk (5) must be between 1 and model.num_experts (4)"),
    (["mup.width_mult=2"], 1, "mup.enabled needs exactly one of mup.base_width and mup.width_mult"),
    (["train.noise_scale_interval=10", "train.micro_batch_size=8", "train.global_batch_size=16"], 2,
     "train.noise_scale_interval needs at least parallel.pp + 1 = 2 micro-batches per data-parallel rank"),
    (["train.noise_scale_interval=10", "parallel.pp=2", "train.micro_batch_size=8", "train.global_batch_size=16"], 2,
     "train.noise_scale_interval needs at least parallel.pp + 1 = 3 micro-batches per data-parallel rank"),
    (["model=5"], 1, "override: model: expected a section of model.* settings, got 5"),
    (["schedule.lr_max=inf"], 1, "schedule.lr_max must be a finite number, got inf"),
    (["schedule.lr_max=nan"], 1, "schedule.lr_max must be a finite number, got nan"),
    (["profile.ranks=[0,2]"], 2, "profile.ranks [0, 2] must be ranks of this run (0 to 1)"),
    (["profile.start_step=5", "profile.steps=0"], 1, "profile.start_step must be >= 0 (0: off) and profile.steps >= 1"),
    (["logging.wandb.project=p", "logging.wandb.mode=disabled"], 1, "logging.wandb.mode must be online or offline, got 'disabled'"),
    (["precision.cuda_graphs=true", "precision.recompute=full"], 1, "precision.cuda_graphs=true cannot replay a fully recomputed layer"),
    (["model.num_experts=4", "precision.fp8_experts=delayed"], 1,
     "precision.fp8_experts 'delayed' is unknown; expected null, bf16, tensorwise, blockwise or mxfp8"),
    (["precision.fp8_experts=bf16"], 1, "precision.fp8_experts=bf16 sets the MoE experts' precision, and "
     "model.num_experts is not set"),
    (["precision.cuda_graph_warmup_steps=0"], 1, "precision.cuda_graph_warmup_steps must be >= 1 (eager steps before the capture), got 0"),
    (["precision.cuda_graphs=true", "parallel.pp=2", "train.batch_schedule=[[0,32],[1000000,64]]"], 2,
     "precision.cuda_graphs=true with parallel.pp > 1 needs a fixed batch"),
    (["checkpoint.merge.interval=150"], 1, "checkpoint.merge.interval (150) must be a multiple of checkpoint.interval (100): it merges saved checkpoints"),
    (["checkpoint.merge.interval=100", "checkpoint.merge.last=3"], 1, "checkpoint.merge.last (3) must be at least 2 and at most checkpoint.keep (2)"),
    (["checkpoint.merge.interval=100", "checkpoint.merge.last=2", "checkpoint.merge.weights=steep"], 1, "checkpoint.merge.weights: merge weights 'steep': expected one of uniform"),
]


@pytest.mark.parametrize("overrides,world_size,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_override_is_refused_with_its_message(default_data, overrides, world_size, message):
    with pytest.raises(ConfigError) as err:
        load_config("proxy", overrides, world_size)
    assert message in str(err.value)


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown recipe 'proxi' \\(did you mean 'proxy'\\?\\)"):
        load_config("proxi")


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="recipe file nowhere.yaml does not exist"):
        load_config("nowhere.yaml")


def test_every_problem_is_reported_at_once(default_data):
    with pytest.raises(ConfigError) as err:
        load_config("proxy", ["schedule.a=-1", "schedule.b=1", "parallel.pp=3"], 3)
    assert len(str(err.value).splitlines()) == 3


def test_cli_refuses_before_any_work(default_data, tmp_path):
    result = subprocess.run(
        command("train", "proxy", f"out_dir={tmp_path}", "parallel.pp=3"),
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.num_layers (4) must be divisible by parallel.pp (3)",
        "error: world size 1 must be a multiple of parallel.tp x parallel.pp (1 x 3 = 3)"]
    assert list(tmp_path.iterdir()) == []  # no run directory, no process group, nothing written


@pytest.mark.parametrize("setting,where", [("out_dir", "proc"), ("out_dir", "file"), ("checkpoint.dir", "proc"),
                                           ("data.cache_dir", "file")])
def test_a_folder_a_run_writes_that_cannot_be_created_is_one_line_before_any_work(default_data, tmp_path, setting,
                                                                                   where):
    """/proc refuses new folders even to root, whatever its permission bits say; a file in the
    way is not a folder. (The probe the check writes into a writable folder is removed: the test
    above finds tmp_path empty.) checkpoint.dir and data.cache_dir were a traceback after the run
    folder had been made."""
    (tmp_path / "a-file").write_text("kept")
    folder, cause = {"proc": ("/proc/forbidden", "/proc is not writable (No such file or directory)"),
                     "file": (tmp_path / "a-file" / "runs", f"{tmp_path / 'a-file'} is not a directory")}[where]
    out_dir = folder if setting == "out_dir" else tmp_path / "runs"
    result = subprocess.run(command("train", "proxy", f"out_dir={out_dir}", f"{setting}={folder}"), cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    line = (f"out_dir: cannot create the run folder {out_dir}/proxy" if setting == "out_dir" else
            f"{setting}: cannot write to {folder}")
    assert result.stderr.strip().splitlines() == [f"error: {line}: {cause}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and (tmp_path / "a-file").read_text() == "kept"


@pytest.mark.parametrize("verb", ["data", "tokenizer", "preprocess", "coordcheck", "schedule", "fit", "submit"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(default_data, tmp_path, capsys, verb):
    """Each command checks where it will write before it reads, trains or renders, as `train` checks
    its run folder (`convert` and `merge`: tests/test_convert.py). /proc refuses new folders."""
    argv = {
        "data": ["data", "--out", "/proc/forbidden/data"],
        "tokenizer": ["tokenizer", SHAKESPEARE, "--out", "/proc/forbidden/tok", "--vocab-size", "300"],
        "preprocess": ["preprocess", SHAKESPEARE, "--tokenizer", default_data / "tokenizer.model",
                       "--out", "/proc/forbidden/train"],
        "coordcheck": ["coordcheck", "proxy", "--widths", "64,128", "--out", "/proc/forbidden/coordcheck"],
        "schedule": ["schedule", "proxy", "--plot", "/proc/forbidden/lr.png"],
        "fit": ["fit", tmp_path / "results.csv", "--out", "/proc/forbidden/fit"],
        "submit": ["submit", "proxy", "--cpu", "--nodes", "1", "--gpus-per-node", "1", "--dry-run",
                   "--log-dir", "/proc/forbidden/logs"],
    }[verb]
    assert cli.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    option = {"schedule": "--plot", "submit": "--log-dir"}.get(verb, "--out")
    assert line.startswith(f"error: {option}") and line.endswith("/proc is not writable (No such file or directory)")
    assert captured.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,line", [
    (["plan", "dense3b", "--gpus", "0"], "--gpus must be at least 1, got 0"),  # was a ZeroDivisionError
    (["plan", "dense3b", "--gpu-memory", "-1"], "--gpu-memory must be at least 1, got -1.0"),
    (["config", "proxy", "--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["coordcheck", "proxy", "--steps", "0"], "--steps must be at least 1, got 0"),  # was an IndexError
    (["sweep", "proxy_lr_batch", "--plan", "--mfu", "0"], "--mfu must be in (0, 1], got 0.0"),
    (["tokenizer", SHAKESPEARE, "--out", "OUT/tok", "--vocab-size", "0"],
     "--vocab-size 0 must be larger than the 260 pieces every tokenizer has (4 special ids, 256 bytes)"),
    (["tokenizer", SHAKESPEARE, "--out", "OUT/tok", "--vocab-size", "3", "--special-tokens", "<code>"],  # a traceback
     "--vocab-size 3 must be larger than the 261 pieces every tokenizer has (4 special ids, 256 bytes, 1 of "
     "--special-tokens)"),
    (["data", "--out", "OUT/data", "--vocab-size", "3"],
     "--vocab-size 3 must be larger than the 260 pieces every tokenizer has (4 special ids, 256 bytes)"),
    (["submit", "proxy", "--cpu", "--nodes", "1", "--gpu-memory", "0", "--dry-run"],
     "GPU_MEMORY must be positive (GiB per GPU), got 0"),
    (["coordcheck", "proxy", "--widths", "64,128", "--depths", "2,4"],  # --depths won silently
     "--widths and --depths: give one (a check against width, or against depth at the recipe's width)"),
    # Each of these ran the whole grid on this machine.
    (["sweep", "proxy_lr_batch", "--dry-run"], "--dry-run: for --slurm only (this machine's runs take none of "
     "SLURM's options): add --slurm to submit the points as a job array, or leave it out"),
    (["study", "proxy", "--partition", "p", "--time", "10"], "--partition, --time: for --slurm only (this machine's "
     "runs take none of SLURM's options): add --slurm to submit the points as a job array, or leave them out"),
    (["sweep", "proxy_lr_batch", "--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["sweep", "proxy_lr_batch", "--slurm", "--max-running", "0"], "--max-running must be at least 1, got 0"),
], ids=["plan-gpus", "plan-memory", "config-world", "coordcheck-steps", "sweep-mfu", "tokenizer-vocab",
        "tokenizer-special-vocab", "data-vocab", "submit-memory", "coordcheck-both", "sweep-dry-run",
        "study-partition", "sweep-jobs", "sweep-max-running"])
def test_an_option_out_of_range_or_in_conflict_is_one_line_before_any_work(tmp_path, capsys, argv, line):
    assert cli.main([str(a).replace("OUT", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"error: {line}"] and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_counts_accept_suffixes_and_scientific_notation():
    assert parse_count("250B") == 250 * 10**9
    assert parse_count("1.5T") == 15 * 10**11
    assert parse_count("1e12") == 10**12
    assert parse_count("4M") == 4 * 10**6
    assert parse_count(0.05) == 0.05
    with pytest.raises(ValueError):
        parse_count("1.5")  # neither a whole count nor a fraction below 1


@pytest.mark.parametrize("text,message", [
    ("name: x\nmodel:\n  num_layers: [1\n", "YAML syntax error at line 4, column 1"),
    ("name: x\nmodel: 5\n", "model: expected a section of model.* settings, got 5"),
    ("- just\n- a list\n", "expected a mapping of keys to values"),
], ids=["syntax", "model-not-a-mapping", "a-list"])
def test_unreadable_recipe_is_refused_in_one_line(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe), check_paths=False)
    assert len(str(err.value).splitlines()) == 1 and message in str(err.value), str(err.value)


@pytest.mark.parametrize("text,message", [
    ("name: x\ngrid: {a: [1, 2\n", "YAML syntax error at line"),
    ("name: x\ngrid: []\n", "grid: expected keys, each with a list of values (e.g. schedule.lr_max: [0.005, 0.01]), "
                            "got []"),  # was OmegaConf's TypeError
    ("name: x\neval_sequences: -8\ngrid: {schedule.lr_max: [0.01]}\n", "eval_sequences must be positive, got -8"),
], ids=["syntax", "grid-a-list", "eval-sequences"])
def test_unreadable_sweep_spec_is_refused_in_one_line(tmp_path, text, message):
    from megatron_power.science.sweep import load_spec

    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_spec(str(spec))
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"sweep spec {spec}: ") and message in line, line


def test_a_sweep_point_with_a_batch_of_zero_is_refused_in_one_line(tmp_path):
    """With eval_sequences set, the batch divides it for each point's eval_batches: a batch of 0
    was a ZeroDivisionError before the points were checked."""
    from megatron_power.science import sweep

    spec = tmp_path / "zero.yaml"
    spec.write_text(f"name: zero\nout_dir: {tmp_path}\neval_sequences: 64\ngrid: {{train.global_batch_size: [0, 16]}}\n")
    with pytest.raises(ConfigError) as err:
        sweep.check(sweep.load_spec(str(spec)), check_paths=False)
    assert str(err.value).splitlines() == ["train.global_batch_size must be positive, got 0 (bs0)"]


def _damaged_data(default_data, tmp_path, damage):
    """A copy of the default corpus with one thing wrong; the overrides that point a run at it."""
    data = tmp_path / "data"
    shutil.copytree(default_data, data)
    damage(data)
    return [f"data.train=[{data / 'train'}]", f"data.valid=[{data / 'valid'}]", f"data.tokenizer={data / 'tokenizer.model'}"]


def _small_tokenizer(data):
    """Ids of the default corpus (8192 pieces) beside a tokenizer of 1000."""
    from tokenizer import corpus, spm

    texts = [text for _, text in itertools.islice(corpus.read_documents(), 40)]
    small = spm.train(spm.paragraphs(texts), data / "small", 1000)
    shutil.copy(small, data / "tokenizer.model")


DATA_DAMAGE = {
    "tokenizer-too-small": (_small_tokenizer, "data.train:", "outside the model's vocabulary of 1000"),
    "tokenizer-not-spm": (lambda d: (d / "tokenizer.model").write_bytes(b"not a model"), "data.tokenizer:",
                          "is not a sentencepiece model"),
    "idx-empty": (lambda d: (d / "train.idx").write_bytes(b""), "data.train:", "is not a Megatron index (empty)"),
    "idx-garbage": (lambda d: (d / "train.idx").write_bytes(b"\x00" * 4096), "data.train:", "no MMIDIDX header"),
    "idx-truncated": (lambda d: truncate(d / "valid.idx"), "data.valid:", "is damaged"),
    "bin-truncated": (lambda d: truncate(d / "train.bin"), "data.train:", "shorter than the"),
}


@pytest.mark.parametrize("damage", sorted(DATA_DAMAGE))
def test_bad_data_is_refused_before_a_run_folder_exists(default_data, tmp_path, damage):
    make, field, message = DATA_DAMAGE[damage]
    overrides = _damaged_data(default_data, tmp_path, make)
    result = subprocess.run(command("train", "proxy", f"out_dir={tmp_path / 'runs'}", *overrides),
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    # One line per damaged file (a wrong tokenizer shows in both splits).
    assert errors and errors[0].startswith(f"error: {field}") and all(message in e for e in errors), result.stderr
    assert not (tmp_path / "runs").exists()


def test_config_help_lists_every_recipe_key_with_its_documentation():
    from dataclasses import asdict

    from megatron_power.config import Config

    def keys(node, prefix=""):
        for k, v in node.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    text = megatron_power("config", "--help").stdout
    listed = [line.split()[0] for line in text.splitlines() if re.match(r"  \S+  \(", line)]
    assert listed == list(keys(asdict(Config())))
    assert "schedule.reference_seq_length  (int = 4096)\n      The Power formula counts the batch in sequences" in text


def test_a_saved_config_with_a_setting_this_version_no_longer_has_still_reads():
    """A checkpoint outlives the code that wrote it (a SLURM job requeued after a `git pull`): its
    config is read without the settings since removed, which the resume note then names."""
    from megatron_power.config import from_yaml, setting_changes, to_yaml

    config = load_config("proxy", ["schedule.lr_max=0.03"], check_paths=False)
    saved = to_yaml(config).replace("\ntrain:\n", "\ntrain:\n  retired_knob: 3\n")
    assert from_yaml(saved) == config
    assert setting_changes(saved, to_yaml(config)) == ["train.retired_knob: 3 -> None"]


def test_config_smoke_prints_what_make_train_smoke_trains(capsys):
    """`make train SMOKE=1` checks this recipe before it builds data or starts torchrun."""
    assert cli.main(["config", "moe3b", "--smoke", "--world-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "name: moe3b-smoke" in printed and "  ep: 2\n" in printed and "  num_layers: 2\n" in printed
    assert cli.main(["config", "moe3b", "--smoke", "--world-size", "3"]) == 2  # EP 2 does not divide 3


def test_a_saved_config_from_before_a_setting_was_added_has_not_changed():
    """A run or sweep point saved by an older version (without train.skip_steps) resumes with no
    change named: a setting it did not have ran as its default. A value it did not have is named."""
    from dataclasses import replace

    from megatron_power.config import setting_changes, to_yaml

    config = load_config("proxy", check_paths=False)
    saved = to_yaml(config).replace("  skip_steps: ''\n", "")
    assert "skip_steps" not in saved
    assert setting_changes(saved, to_yaml(config)) == []
    skipping = replace(config, train=replace(config.train, skip_steps="5"))
    assert setting_changes(saved, to_yaml(skipping)) == ["train.skip_steps:  -> 5"]
