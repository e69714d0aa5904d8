"""`megatron-power eval`: the validation loss of a checkpoint's weights, in a recipe's layout and
precision, on its validation set, as training measures it (`train.eval_batches` global batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from megatron_power.config.schema import Config, from_yaml, model_vocab_size
from megatron_power.errors import ConfigError
from megatron_power.training import checkpoint, runtime
from megatron_power.training.data import TokenizerInfo, build_datasets
from megatron_power.training.loop import check_same_model
from megatron_power.training.model import build_model
from megatron_power.training.optim import wrap_model
from megatron_power.training.step import evaluate


def evaluate_checkpoint(config: Config) -> Tuple[float, Path]:
    """The validation loss of the weights of `checkpoint.init_from` (any layout wrote them), and
    the checkpoint it named."""
    if config.checkpoint.init_from is None:
        raise ConfigError("eval needs checkpoint.init_from=PATH (a run folder, its checkpoints directory or one "
                          "iter_* checkpoint)")
    source = checkpoint.resolve(Path(config.checkpoint.init_from))
    tokenizer = TokenizerInfo.from_sentencepiece(config.data.tokenizer)
    vocab_size = model_vocab_size(config, tokenizer.vocab_size)
    check_same_model(f"checkpoint.init_from {source}", from_yaml(checkpoint.saved_state(source)["config"]),
                     config, vocab_size)
    rt = runtime.initialize(config)
    try:
        gpt_model = build_model(config, vocab_size)
        checkpoint.load(source, gpt_model, None)
        _, valid_data = build_datasets(config, tokenizer)
        return evaluate(config, wrap_model(config, gpt_model), valid_data, rt), source
    finally:
        runtime.shutdown()
