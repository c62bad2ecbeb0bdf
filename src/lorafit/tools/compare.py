"""`lorafit eval`: the base model and adapters scored side by side on a run config's validation split."""

from __future__ import annotations

from collections.abc import Callable

from ..core.adapter_io import load_adapter
from ..data import encode, label_set, load_splits
from ..inference.generate import adapter_name
from ..inference.scoring import pick_metric, score
from ..methods import is_method_folder, load_method
from ..models import load_model
from ..training.config import RunConfig
from ..training.loop import loss_of


def evaluate_adapters(cfg: RunConfig, adapters: list[str], with_base: bool,
                      log: Callable[[str], None] = print) -> list[dict]:
    """The run config's metric for the base model (optional) and each adapter, one row each."""
    train_rows, val_rows, fmt = load_splits(cfg.data, seed=cfg.train.seed, log=log)
    labels = label_set(train_rows, val_rows) if cfg.model.task == "classification" else None

    def load() -> tuple:  # the base as training loaded it (quantized the same way)
        return load_model(cfg.model.name, task=cfg.model.task, labels=labels, quantize=cfg.model.quantize,
                          quantize_head=cfg.model.quantize_head, quantize_embeddings=cfg.model.quantize_embeddings)

    model, tokenizer = load()
    rows = val_rows[:cfg.eval.limit]
    examples = encode(rows, fmt, tokenizer, cfg.data, labels)
    metric = pick_metric(cfg.eval.metric, cfg.model.task, fmt)

    def run(net) -> dict:
        return score(net, tokenizer, metric, rows, examples, fmt, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                     log, loss=loss_of)

    results = [{"name": "base", **run(model)}] if with_base else []  # before any adapter (heads load in place)
    names: list[str] = []
    for path in adapters:
        names.append(adapter_name(path, names))
        if is_method_folder(path):  # another method changes the model itself: score it on its own copy
            own, _ = load()
            load_method(own, path)
            results.append({"name": names[-1], **run(own)})
        else:
            load_adapter(model, path, name=names[-1])
            results.append({"name": names[-1], **run(model)})
    return results
