"""Typed recipe schema: YAML recipe + dotted overrides -> validated `Config`.

Everything that can be checked without starting a process group is checked here, so a bad
recipe stops the program with one line per problem before any work starts.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# Where `megatron-power data` (and `make data`) builds the default corpus: inside the repository,
# so that a run started from any folder finds it.
DEFAULT_DATA_DIR = RECIPES_DIR.parent / "data" / "stdlib"
FINISHED = "finished.json"  # in a run directory once the run has reached its token budget


class ConfigError(ValueError):
    """A recipe or override is wrong; each line of the message names one problem."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: as many as heads (no GQA)
    ffn_hidden_size: int = 1024
    seq_length: int = 256
    # None: the tokenizer's. Larger than the tokenizer's keeps a model's published shape (the
    # paper's 49152) while it trains on a smaller tokenizer.
    vocab_size: Optional[int] = None
    rotary_base: int = 10000
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-6
    init_std: float = 0.02
    # Mixture of experts as GraniteMoe defines it: top-k of the router logits, softmax over the
    # chosen k, load-balancing aux loss, dropless, no biases. None: a dense model.
    num_experts: Optional[int] = None
    moe_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # per expert
    moe_aux_loss_coeff: float = 0.001  # GraniteMoe's router_aux_loss_coef (Hugging Face's default)


@dataclass
class MupConfig:
    """muP (see mup.py); off gives standard parametrization for comparison."""

    enabled: bool = False
    base_width: Optional[int] = None  # d_base; m_width = hidden_size / base_width
    width_mult: Optional[float] = None  # or m_width directly
    emb_mult: float = 12.0
    residual_mult: float = 0.22


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallelism (MoE); experts are also split over TP
    sequence_parallel: bool = False  # required with TP for MoE
    distributed_optimizer: bool = False


@dataclass
class PrecisionConfig:
    """GPU settings (CPU runs in fp32 with the local spec and ignores fp8)."""

    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine layers only)
    fp8_recipe: str = "tensorwise"  # tensorwise | delayed | blockwise | mxfp8
    fp8_bf16_first_last: bool = True  # keep the first and last layer in bf16
    recompute: str = "none"  # none | selective (attention scores) | full (each layer)


@dataclass
class DataConfig:
    # Blends: [weight, path prefix, weight, path prefix, ...] as Megatron-LM writes them,
    # or just [path prefix].
    train: List[str] = field(default_factory=lambda: [str(DEFAULT_DATA_DIR / "train")])
    valid: List[str] = field(default_factory=lambda: [str(DEFAULT_DATA_DIR / "valid")])
    tokenizer: str = str(DEFAULT_DATA_DIR / "tokenizer.model")
    cache_dir: Optional[str] = None  # Megatron's index cache; default: <run dir>/data_cache


@dataclass
class TrainConfig:
    # Token budget, counted from the start of stage 1: a stage-2 run's budget includes stage 1's.
    tokens: int = 20_000_000
    stage: int = 1  # 2: continue from checkpoint.init_from (a stage-1 run) on its own data blend
    global_batch_size: int = 32  # sequences
    micro_batch_size: int = 8
    seed: int = 1234
    clip_grad: float = 1.0  # Megatron-LM's default; the paper gives none
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    max_nonfinite_steps: int = 3  # consecutive NaN/Inf steps that stop the run
    # Steps between measurements of the gradient noise scale B_simple (noise.py); 0: off.
    noise_scale_interval: int = 0
    # On GPUs, refuse a layout that the planner (plan.py) says does not fit in a GPU's memory.
    check_memory: bool = True


@dataclass
class OptimizerConfig:
    """AdamW as IBM's training configs set it (the paper gives none of these)."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-10


@dataclass
class ScheduleConfig:
    """Learning rate as a function of tokens seen (see scheduler.py)."""

    kind: str = "power"  # power | wsd | cosine | constant
    a: float = 4.0
    b: float = -0.51
    # The Power formula counts the batch in sequences of this many tokens: beta = batch tokens / it.
    # 4096 is the paper's, so its a and b hold at any model.seq_length.
    reference_seq_length: int = 4096
    lr_max: float = 0.02  # Power: the cap; wsd/cosine/constant: the peak
    min_lr: float = 0.0
    # Lengths in tokens ("200M", 2e8), or below 1 as fractions of the budget train.tokens.
    warmup: float = 0.0
    decay: float = 0.0
    decay_shape: str = "exp_ibm"


@dataclass
class CheckpointConfig:
    interval: int = 200  # steps; the last step always saves
    save: bool = True  # false only for throughput benchmarks: nothing is saved, not even on a stop
    keep: int = 2  # complete checkpoints kept on disk (the newest ones)
    dir: Optional[str] = None  # default: <run dir>/checkpoints
    # A checkpoint to start from (a checkpoints directory, whose "latest" is used, or one iter_*
    # directory). Stage 2: a stage-1 run's; model, optimizer and tokens seen carry over.
    # Stage 1: any checkpoint of the same model, e.g. one imported by `convert from-hf`; only
    # the weights carry over. A run with checkpoints of its own resumes from those instead.
    init_from: Optional[str] = None


@dataclass
class Config:
    name: str = "proxy"
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.model.seq_length

    @property
    def train_steps(self) -> int:
        return self.train.tokens // self.tokens_per_step


# Fields holding token counts accept "250B", "1.5T", "1e12" as well as plain integers.
TOKEN_FIELDS = {"train.tokens", "schedule.warmup", "schedule.decay"}
_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text):
    """'250B' -> 250_000_000_000; '1e12' -> 10**12; 42 -> 42; fractions below 1 stay as they are."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and (text < 1 or text == int(text)):
        return text if text < 1 else int(text)
    s = str(text).strip().replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)([KMBGT]?)", s, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"'{text}' is not a count (expected e.g. 2000000, 2e6, 250B, 1.5T)")
    value = float(m.group(1)) * _SUFFIX.get(m.group(2).upper(), 1)
    if value < 1 and not m.group(2):
        return value
    if value != int(value):
        raise ValueError(f"'{text}' is not a whole number")
    return int(value)


def recipe_path(recipe: str) -> Path:
    """A recipe is a name in recipes/ or a path to a YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(recipe, known, n=1)
        hint = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(f"unknown recipe '{recipe}'{hint}; known recipes: {', '.join(known)}")
    return path


def _all_keys(node, prefix=""):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if OmegaConf.is_dict(value):
            yield from _all_keys(value, dotted + ".")


def load_yaml(path: Path, what: str):
    """A YAML file as an OmegaConf node; a syntax error, or a file that is not a mapping, becomes
    one line naming the file and the line."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{what} {path}: YAML syntax error{where}: {getattr(e, 'problem', None) or e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{what} {path}: {omegaconf_message(e)}") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{what} {path}: expected a mapping of keys to values, found a {type(node).__name__}")
    return node


def omegaconf_message(err: OmegaConfBaseException) -> str:
    """The first line of an OmegaConf error (some carry their text only in str())."""
    return (err.msg or str(err) or err.__class__.__name__).splitlines()[0]


def _unknown_key_message(err: OmegaConfBaseException, schema, source: str) -> str:
    key = getattr(err, "full_key", None) or str(err).split("'")[1]
    known = list(_all_keys(schema))
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{hint[0]}'?" if hint else ""
    return f"{source}: unknown key '{key}'{hint}"


def _normalize_counts(node, source: str) -> None:
    for dotted in TOKEN_FIELDS:
        value = OmegaConf.select(node, dotted, default=None)
        if value is not None:
            try:
                OmegaConf.update(node, dotted, parse_count(value), merge=False)
            except ValueError as e:
                raise ConfigError(f"{source}: {dotted}: {e}") from None


def _recipe_layers(recipe: str, seen=()) -> list:
    """A recipe and the recipes it builds on (`base: name`), the most general first."""
    path = recipe_path(recipe)
    if path in seen:
        raise ConfigError(f"recipe {path.name}: 'base' makes a cycle ({' -> '.join(p.stem for p in seen)})")
    layer = load_yaml(path, "recipe")
    base = layer.pop("base", None)
    own = [(layer, f"recipe {path.name}")]
    return (_recipe_layers(str(base), seen + (path,)) if base else []) + own


def _parse_overrides(overrides: List[str]):
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.tokens=2e6)")
    return OmegaConf.from_dotlist(list(overrides))


def load_config(recipe: str, overrides: List[str] = (), world_size: Optional[int] = None,
                check_paths: bool = True, smoke: bool = False) -> Config:
    """Load a recipe, apply dotted overrides, validate; raise ConfigError naming every problem.

    `check_paths=False` skips the data and checkpoint paths, for commands that only read the
    recipe (printing it, its schedule) on a machine without the data. `smoke=True` shrinks the
    recipe to a CPU-sized model of the same structure (see `shrink`)."""
    schema = OmegaConf.structured(Config)
    layers = _recipe_layers(recipe) + [(_parse_overrides(overrides), "override")]
    merged = schema
    for layer, source in layers:
        for key in layer:
            if OmegaConf.is_dict(schema.get(key)) and not OmegaConf.is_dict(layer[key]):
                raise ConfigError(f"{source}: {key}: expected a section of {key}.* settings, got {layer[key]!r}")
        _normalize_counts(layer, source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except (ConfigKeyError, ConfigAttributeError) as e:
            raise ConfigError(_unknown_key_message(e, schema, source)) from None
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            raise ConfigError(f"{source}: {key}: {omegaconf_message(e)}") from None
    config: Config = OmegaConf.to_object(merged)
    if smoke:
        config = shrink(config)
    errors = validate(config, world_size, check_paths)
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def shrink(c: Config) -> Config:
    """The same recipe at smoke-test size: 2 layers per pipeline stage, 64-wide heads keeping the
    query-group ratio, at most 8 experts and top-2, 128-token sequences, 10 steps of 8 sequences
    per data-parallel rank, and each parallel size capped at 2. muP, precision and schedule kinds
    are kept, so the code paths are those of the full recipe; stage 2 becomes a stage-1 run."""
    from dataclasses import replace

    p = replace(c.parallel, tp=min(c.parallel.tp, 2), pp=min(c.parallel.pp, 2), ep=min(c.parallel.ep, 2))
    heads, groups = c.model.num_attention_heads, c.model.num_query_groups or c.model.num_attention_heads
    per_group = heads // groups
    groups = max(p.tp, 2 if per_group == 1 else 1)
    heads = groups * per_group
    m = replace(c.model, num_layers=2 * p.pp, hidden_size=64 * heads, num_attention_heads=heads,
                num_query_groups=groups, ffn_hidden_size=128 * p.tp, seq_length=128, vocab_size=None)
    if c.model.num_experts:
        m = replace(m, num_experts=max(2 * p.ep, min(c.model.num_experts, 8)),
                    moe_topk=min(c.model.moe_topk, 2), moe_ffn_hidden_size=64 * p.tp)
    t = replace(c.train, global_batch_size=16, micro_batch_size=4, tokens=10 * 16 * 128, stage=1,
                log_interval=1, eval_interval=10, eval_batches=1)
    return replace(c, name=f"{c.name}-smoke", model=m, parallel=p, train=t,
                   checkpoint=replace(c.checkpoint, init_from=None, interval=10),
                   data=DataConfig(), schedule=replace(c.schedule, warmup=0.1, decay=0.2))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate(c: Config, world_size: Optional[int] = None, check_paths: bool = True) -> List[str]:
    """Every problem with a config, one line each; empty when the config is usable."""
    from megatron_power import scheduler

    errors = []
    m, p, t = c.model, c.parallel, c.train
    world_size = world_size or world_size_from_env()

    def need(ok: bool, message: str):
        if not ok:
            errors.append(message)

    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length"):
        need(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("tp", "pp", "ep"):
        need(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    for name in ("global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "tokens"):
        need(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    if errors:
        return errors

    groups = m.num_query_groups or m.num_attention_heads
    need(m.hidden_size % m.num_attention_heads == 0,
         f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
    need(m.num_attention_heads % groups == 0,
         f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by model.num_query_groups ({groups})")
    need(m.num_attention_heads % p.tp == 0,
         f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by parallel.tp ({p.tp})")
    need(groups % p.tp == 0, f"model.num_query_groups ({groups}) must be divisible by parallel.tp ({p.tp})")
    need(m.ffn_hidden_size % p.tp == 0,
         f"model.ffn_hidden_size ({m.ffn_hidden_size}) must be divisible by parallel.tp ({p.tp})")
    need(m.num_layers % p.pp == 0, f"model.num_layers ({m.num_layers}) must be divisible by parallel.pp ({p.pp})")

    if m.num_experts is None:
        need(p.ep == 1, f"parallel.ep ({p.ep}) needs a MoE model (model.num_experts)")
    else:
        need(m.num_experts >= 1 and m.num_experts % p.ep == 0,
             f"model.num_experts ({m.num_experts}) must be divisible by parallel.ep ({p.ep})")
        need(1 <= m.moe_topk <= m.num_experts,
             f"model.moe_topk ({m.moe_topk}) must be between 1 and model.num_experts ({m.num_experts})")
        need(m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size % p.tp == 0,
             f"model.moe_ffn_hidden_size ({m.moe_ffn_hidden_size}) must be set and divisible by parallel.tp ({p.tp})")
        need(p.tp == 1 or p.sequence_parallel,
             "MoE with parallel.tp > 1 needs parallel.sequence_parallel=true (Megatron-Core requires it)")
    need(not p.sequence_parallel or m.seq_length % p.tp == 0,
         f"model.seq_length ({m.seq_length}) must be divisible by parallel.tp ({p.tp}) for sequence parallelism")
    model_parallel = p.tp * p.pp
    if world_size % model_parallel:
        errors.append(f"world size {world_size} must be a multiple of parallel.tp x parallel.pp "
                      f"({p.tp} x {p.pp} = {model_parallel})")
    elif world_size % (model_parallel * p.ep):
        errors.append(f"world size {world_size} must be a multiple of parallel.tp x parallel.ep x parallel.pp "
                      f"({p.tp} x {p.ep} x {p.pp} = {model_parallel * p.ep})")
    else:
        dp = world_size // model_parallel
        need(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
             f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})")
        need(t.noise_scale_interval == 0 or t.global_batch_size >= (p.pp + 1) * t.micro_batch_size * dp,
             f"train.noise_scale_interval needs at least parallel.pp + 1 = {p.pp + 1} micro-batches per "
             f"data-parallel rank (it reads the first one's gradient before the last has run); got "
             f"train.global_batch_size {t.global_batch_size} = {t.micro_batch_size} x {dp} ranks x "
             f"{t.global_batch_size // max(t.micro_batch_size * dp, 1)}")
    need(c.train_steps >= 1, f"train.tokens ({t.tokens}) is less than one step "
         f"(global_batch_size x seq_length = {c.tokens_per_step} tokens)")
    need(c.checkpoint.interval > 0, f"checkpoint.interval must be positive, got {c.checkpoint.interval}")
    need(c.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {c.checkpoint.keep}")
    need(t.stage in (1, 2), f"train.stage must be 1 or 2, got {t.stage}")
    if t.stage == 2:
        need(c.checkpoint.init_from is not None,
             "train.stage 2 needs checkpoint.init_from (the stage-1 checkpoint to continue from)")
        need(c.schedule.decay > 0, "train.stage 2 needs schedule.decay (the tokens over which it decays)")
    if c.checkpoint.init_from is not None and check_paths:
        from megatron_power.checkpoint import CheckpointError, resolve

        try:
            resolve(Path(c.checkpoint.init_from))
        except CheckpointError as e:
            errors.append(f"checkpoint.init_from: {e}")
    need(t.noise_scale_interval >= 0, f"train.noise_scale_interval must be >= 0, got {t.noise_scale_interval}")
    need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    need(bool(re.fullmatch(r"[A-Za-z0-9._-]+", c.name)),
         f"name '{c.name}' must be letters, digits, '.', '_' or '-' (it names the run directory)")

    if c.mup.enabled:
        given = [f for f in ("base_width", "width_mult") if getattr(c.mup, f) is not None]
        need(len(given) == 1, f"mup.enabled needs exactly one of mup.base_width and mup.width_mult, got "
             f"{' and '.join(given) or 'neither'}")
        for name in ("base_width", "width_mult", "emb_mult", "residual_mult"):
            value = getattr(c.mup, name)
            need(value is None or value > 0, f"mup.{name} must be positive, got {value}")
    pr = c.precision
    need(pr.fp8 in (None, "hybrid", "e4m3"), f"precision.fp8 '{pr.fp8}' is unknown; expected null, hybrid or e4m3")
    need(pr.fp8_recipe in ("tensorwise", "delayed", "blockwise", "mxfp8"),
         f"precision.fp8_recipe '{pr.fp8_recipe}' is unknown; expected tensorwise, delayed, blockwise or mxfp8")
    need(pr.recompute in ("none", "selective", "full"),
         f"precision.recompute '{pr.recompute}' is unknown; expected none, selective or full")
    errors += scheduler.validate(c.schedule, t.tokens)
    if check_paths:
        errors += _validate_data(c.data, m.vocab_size)
    return errors


def parse_blend(entries: List[str], field_name: str):
    """['0.7', 'a', '0.3', 'b'] -> (['a', 'b'], [0.7, 0.3]); ['a'] -> (['a'], None)."""
    if len(entries) == 0:
        raise ConfigError(f"{field_name} is empty; expected [prefix] or [weight, prefix, ...]")
    if len(entries) == 1:
        return [entries[0]], None
    if len(entries) % 2:
        raise ConfigError(f"{field_name} must alternate weight and path prefix, got {len(entries)} entries")
    weights, prefixes = entries[0::2], entries[1::2]
    try:
        weights = [float(w) for w in weights]
    except ValueError:
        raise ConfigError(f"{field_name}: weights must be numbers, got {weights}") from None
    if any(w <= 0 for w in weights):
        raise ConfigError(f"{field_name}: weights must be positive, got {weights}")
    return list(prefixes), weights


def _validate_data(d: DataConfig, model_vocab: Optional[int]) -> List[str]:
    """The tokenizer is a sentencepiece model; each dataset's index is whole, its .bin as long as
    the index says, and its token ids inside the model's vocabulary."""
    from megatron_power.data import TokenizerInfo, indexed_dataset_problem

    errors = []
    vocab = None
    if not Path(d.tokenizer).is_file():
        errors.append(f"data.tokenizer: {d.tokenizer} not found (expected a sentencepiece .model file)")
    else:
        try:
            vocab = max(TokenizerInfo.from_sentencepiece(d.tokenizer).vocab_size, model_vocab or 0)
        except ValueError as e:
            errors.append(f"data.tokenizer: {e}")
    for name in ("train", "valid"):
        try:
            prefixes, _ = parse_blend(getattr(d, name), f"data.{name}")
        except ConfigError as e:
            errors.append(str(e))
            continue
        for prefix in prefixes:
            missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
            if missing:
                errors.append(f"data.{name}: {prefix}{'/'.join(missing)} not found (expected an indexed "
                              f"dataset prefix with .bin and .idx; `make data` builds the default one)")
            elif vocab is not None:
                problem = indexed_dataset_problem(prefix, vocab)
                if problem:
                    errors.append(f"data.{name}: {problem}")
    return errors


def model_vocab_size(c: Config, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the recipe's, which must hold the tokenizer's, or the tokenizer's."""
    if c.model.vocab_size is None:
        return tokenizer_vocab
    if c.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size ({c.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab}, {c.data.tokenizer})")
    return c.model.vocab_size


def to_yaml(c: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(c))


def from_yaml(text: str) -> Config:
    """A config saved by `to_yaml` (in a checkpoint), without validation of its paths."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))


# What a model's weights and its function depend on (not seq_length, init, aux-loss weight).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "tie_embeddings", "rotary_base", "norm_epsilon", "num_experts", "moe_topk", "moe_ffn_hidden_size")


def model_differences(expected: Config, found: Config) -> List[str]:
    """'field: expected X, found Y' for every shape field or muP multiplier in which two configs'
    models differ; empty when the same weights compute the same function in both."""
    from megatron_power import mup

    def shape(c: Config) -> dict:
        m = c.model
        values = {f"model.{f}": getattr(m, f) for f in SHAPE_FIELDS}
        values["model.num_query_groups"] = m.num_query_groups or m.num_attention_heads
        if m.num_experts:
            del values["model.ffn_hidden_size"]  # unused by MoE layers
        else:
            for f in ("moe_topk", "moe_ffn_hidden_size"):
                del values[f"model.{f}"]
        values.update({"muP width multiplier": mup.width_mult(c), "muP embedding multiplier": mup.emb_mult(c),
                       "muP residual multiplier": mup.residual_mult(c), "attention scale": mup.softmax_scale(c)})
        return values

    a, b = shape(expected), shape(found)
    return [f"{k}: expected {a[k]}, found {b.get(k)}" for k in a if a[k] != b.get(k) and not
            (isinstance(a[k], float) and isinstance(b.get(k), float) and abs(a[k] - b[k]) <= 1e-9 * abs(a[k]))]
