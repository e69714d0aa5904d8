"""The recipe schema: one dataclass per section, every field with its default and a comment on
where the value comes from; count and blend fields parsed; configs to and from YAML."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, List, Optional, Tuple

from omegaconf import OmegaConf

from megatron_power.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


# Where `megatron-power data` (and `make data`) builds the default corpus: inside the repository,
# so that a run started from any folder finds it.
DEFAULT_DATA_DIR = RECIPES_DIR.parent / "data" / "stdlib"


FINISHED = "finished.json"  # in a run directory once the run has reached its token budget


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

    def at_width(self, width: int) -> "ModelConfig":
        """This model at hidden size `width` with its head size, query-group ratio and MLP ratios
        (the dense MLP's and each expert's): how a muP sweep or coordinate check varies width."""
        head = self.hidden_size // self.num_attention_heads
        if width <= 0 or width % head:
            raise ConfigError(f"width {width} is not a positive multiple of the recipe's head size {head}")
        heads = width // head
        groups = max(1, heads * (self.num_query_groups or self.num_attention_heads) // self.num_attention_heads)
        def scaled(size: Optional[int]) -> Optional[int]:
            return None if size is None else round(size * width / self.hidden_size)

        return replace(self, hidden_size=width, num_attention_heads=heads, num_query_groups=groups,
                       ffn_hidden_size=scaled(self.ffn_hidden_size), moe_ffn_hidden_size=scaled(self.moe_ffn_hidden_size))


@dataclass
class MupConfig:
    """muP (see training/mup.py); off gives standard parametrization for comparison."""

    enabled: bool = False
    base_width: Optional[int] = None  # d_base; m_width = hidden_size / base_width
    width_mult: Optional[float] = None  # or m_width directly
    emb_mult: float = 12.0
    residual_mult: float = 0.22
    # Depth (training/mup.py): 0 off, 0.5 depth-muP, 1 CompleteP (Dey et al. 2025), against a
    # model of base_depth layers whose hyperparameters were tuned.
    depth_alpha: float = 0.0
    base_depth: Optional[int] = None


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
    # The MoE experts' GEMMs in a precision of their own (null: as the rest): bf16, or another
    # scaling (tensorwise | blockwise | mxfp8), through Megatron-Core's per-module quantization
    # recipe (training/model.py, experts_quant_recipe). Ignored where precision.fp8 is.
    fp8_experts: Optional[str] = None
    recompute: str = "none"  # none | selective (attention scores) | full (each layer)
    # Replay each layer's static part from Transformer Engine's CUDA graphs (training/cuda_graphs.py),
    # captured after this many eager steps of each process (Megatron-LM's --cuda-graph-warmup-steps).
    cuda_graphs: bool = False
    cuda_graph_warmup_steps: int = 3


@dataclass
class DataConfig:
    # Blends: [weight, path prefix, weight, path prefix, ...] as Megatron-LM writes them,
    # or just [path prefix].
    train: List[str] = field(default_factory=lambda: [str(DEFAULT_DATA_DIR / "train")])
    valid: List[str] = field(default_factory=lambda: [str(DEFAULT_DATA_DIR / "valid")])
    tokenizer: str = str(DEFAULT_DATA_DIR / "tokenizer.model")
    cache_dir: Optional[str] = None  # Megatron's index cache; default: <run dir>/data_cache


@dataclass
class BatchGrowthConfig:
    """train.batch_schedule=noise_scale: the batch starts at train.global_batch_size (the floor)
    and doubles towards factor x the measured B_simple (training/batch_schedule.py)."""

    ceiling: int = 1024  # sequences: train.global_batch_size times a power of two
    factor: float = 1.0  # k: the batch aimed at is k x B_simple
    min_interval: int = 0  # tokens between two changes ("1B", 1e9)


@dataclass
class TrainConfig:
    # Token budget, counted from the start of stage 1: a stage-2 run's budget includes stage 1's.
    tokens: int = 20_000_000
    stage: int = 1  # 2: continue from checkpoint.init_from (a stage-1 run) on its own data blend
    global_batch_size: int = 32  # sequences; with a batch_schedule, the batch it starts from
    # null: global_batch_size throughout; [[tokens, batch], ...]: from each token count on, that
    # batch; noise_scale: grown with the measured critical batch (see batch_growth).
    batch_schedule: Any = None
    batch_growth: BatchGrowthConfig = field(default_factory=BatchGrowthConfig)
    micro_batch_size: int = 8
    seed: int = 1234
    clip_grad: float = 1.0  # Megatron-LM's default; the paper gives none
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    max_nonfinite_steps: int = 3  # consecutive NaN/Inf steps that stop the run
    # After a loss spike, with `rewind`: steps whose data is passed over, e.g. "1201-1500" or "5,9-10"
    # (PaLM's remedy: go back ~100 steps before the spike, skip 200-500 batches). Such a step updates
    # nothing, and counts toward train.tokens and the lr schedule as if trained, so the run ends where it
    # would have and each later step keeps its data and lr.
    skip_steps: str = ""
    # Steps between measurements of the gradient noise scale B_simple (training/probes/noise_scale.py); 0: off.
    noise_scale_interval: int = 0
    # On GPUs, refuse a layout that the planner (ops/plan.py) says does not fit in a GPU's memory.
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
    """Learning rate as a function of tokens seen (see training/schedule.py)."""

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
class MergeConfig:
    """Checkpoint merging while training (WSM, training/merge.py): at every `interval` steps the
    newest `last` checkpoints, averaged with `weights`, are evaluated on the validation set and
    logged as valid/merged_loss beside valid/loss: what a decay would reach, without one."""

    interval: int = 0  # steps, a multiple of checkpoint.interval (it merges saved checkpoints); 0: off
    last: int = 4  # at most checkpoint.keep
    weights: str = "uniform"  # uniform | linear | cosine | 1-sqrt, or `last` comma-separated numbers


@dataclass
class CheckpointConfig:
    interval: int = 200  # steps; the last step always saves
    save: bool = True  # false only for throughput benchmarks: nothing is saved, not even on a stop
    keep: int = 2  # complete checkpoints kept on disk (the newest ones)
    dir: Optional[str] = None  # default: <run dir>/checkpoints
    # A checkpoint to start from (a run folder or its checkpoints directory, whose latest is used,
    # or one iter_* directory). Stage 2: a stage-1 run's; model, optimizer and tokens seen carry over.
    # Stage 1: any checkpoint of the same model, e.g. one imported by `convert from-hf`; only
    # the weights carry over. A run with checkpoints of its own resumes from those instead.
    init_from: Optional[str] = None
    merge: MergeConfig = field(default_factory=MergeConfig)


@dataclass
class ProfileConfig:
    """torch.profiler around a few steps, then one step's host synchronisations counted
    (training/probes/profile.py): runs/<name>/profile/."""

    start_step: int = 0  # the first profiled step; 0: off
    steps: int = 3
    ranks: List[int] = field(default_factory=lambda: [0])


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard (`pip install wandb`): the same scalars, the recipe as
    the run's config; runs/<name>/wandb/ holds its files."""

    project: Optional[str] = None  # None: off
    entity: Optional[str] = None  # a team; None: the user's own
    mode: str = "online"  # online | offline (written under the run folder, `wandb sync` later)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    name: str = "proxy"  # the run's directory under out_dir: letters, digits, '.', '_', '-'
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
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

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
TOKEN_FIELDS = {"train.tokens", "schedule.warmup", "schedule.decay", "train.batch_growth.min_interval"}


_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


# A run or sweep name becomes a directory name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def as_name(text: str) -> str:
    """`text` with every character a name may not hold replaced by '-'."""
    return "".join(c if NAME_PATTERN.fullmatch(c) else "-" for c in text)


def format_count(n: float, spec: str = "g") -> str:
    """2_500_000 -> '2.5M' (the inverse of parse_count); `spec` formats the number before the unit."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:{spec}}{unit}"
    return f"{n:{spec}}"


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
        raise ValueError(f"'{text}' is neither a whole count of tokens nor a fraction below 1")
    return int(value)


def parse_steps(text: str) -> List[range]:
    """'5,9-10' -> [range(5, 6), range(9, 11)]; '' -> []."""
    ranges = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        first = int(m.group(1)) if m else 0
        last = int(m.group(2) or first) if m else 0
        if first < 1 or last < first:
            raise ValueError(f"'{part}' is not a step or a range of steps (expected e.g. 5 or 1201-1500, from 1 up)")
        ranges.append(range(first, last + 1))
    return ranges


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
    """A config saved by `to_yaml` (in a checkpoint), without validation of its paths. Settings this
    version no longer has are left out: a checkpoint outlives the code that wrote it."""
    def known(saved, schema):
        return {key: known(value, schema[key]) if OmegaConf.is_dict(value) and OmegaConf.is_dict(schema[key])
                else value for key, value in saved.items() if key in schema}

    schema = OmegaConf.structured(Config)
    return OmegaConf.to_object(OmegaConf.merge(schema, known(OmegaConf.create(text), schema)))


def setting_changes(old_yaml: str, new_yaml: str, ignore=()) -> List[str]:
    """'key: old -> new' for every setting of two recipes (as YAML) that differs, in the recipe's order."""
    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    old, new = (dict(flat(OmegaConf.to_container(OmegaConf.create(text)))) for text in (old_yaml, new_yaml))
    # A setting added since the old recipe was saved: that run had the behaviour of its default.
    old = {**dict(flat(OmegaConf.to_container(OmegaConf.structured(Config)))), **old}
    return [f"{key}: {old.get(key)} -> {new.get(key)}" for key in {**new, **old}
            if old.get(key) != new.get(key) and key not in ignore]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def field_docs() -> List[Tuple[str, str, str]]:
    """(dotted key, type and default, the comment that documents it) for every recipe field, read
    from the comments beside and above each field in this file: what `megatron-power config --help`
    lists."""
    source = Path(__file__).read_text()
    lines = source.splitlines()
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}

    def documented(cls_name: str, prefix: str) -> List[Tuple[str, str, str]]:
        defaults = {f.name: f for f in fields(globals()[cls_name])}
        rows = []
        for node in classes[cls_name].body:
            if not isinstance(node, ast.AnnAssign):
                continue
            name, kind = node.target.id, ast.unparse(node.annotation)
            if kind in classes:  # a section of Config
                rows += documented(kind, f"{prefix}{name}.")
                continue
            line = lines[node.lineno - 1]
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip()[1:].strip())
                i -= 1
            doc = " ".join(above + ([line.split("  # ", 1)[1]] if "  # " in line else []))
            f = defaults[name]
            default = f.default if f.default is not MISSING else f.default_factory()
            rows.append((prefix + name, f"{kind} = {default!r}", doc))
        return rows

    return documented("Config", "")
