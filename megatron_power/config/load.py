"""A recipe (and the recipes it builds on), then dotted overrides, merged onto the schema and
validated: every problem is a ConfigError line before any work starts."""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from megatron_power.config.schema import RECIPES_DIR, TOKEN_FIELDS, Config, DataConfig, parse_count
from megatron_power.config.validate import validate
from megatron_power.errors import ConfigError


def recipe_path(recipe: str) -> Path:
    """A recipe is a name in recipes/ or a path to a YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {recipe} does not exist")
        return path
    path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("_"))  # _: shared bases
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
    """The first line of an OmegaConf error (some carry their text only in str()). An empty
    override (`out_dir=`) reaches a required field as None, which OmegaConf calls an incompatible value."""
    if isinstance(err, ValidationError) and getattr(err, "value", 0) is None:
        return "needs a value, got none"
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
    t = replace(c.train, global_batch_size=16, batch_schedule=None, micro_batch_size=4, tokens=10 * 16 * 128, stage=1,
                log_interval=1, eval_interval=10, eval_batches=1)
    return replace(c, name=f"{c.name}-smoke", model=m, parallel=p, train=t,
                   checkpoint=replace(c.checkpoint, init_from=None, interval=10),
                   data=DataConfig(), schedule=replace(c.schedule, warmup=0.1, decay=0.2))
