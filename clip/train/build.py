"""Turning a `TrainConfig` into the objects a run needs: the model, the data stream, the validation set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clip.config import CLIPConfig, get_config
from clip.model import CLIP
from clip.train.config import TrainConfig
from clip.train.data import (
    BatchPlan,
    MapStream,
    MixedDataset,
    Order,
    default_order,
    open_map_source,
    require_readable,
)
from clip.train.distributed import DistInfo
from clip.train.wds import WdsStream, WebDatasetEpoch, expand_sources, is_webdataset


def load_model_config(path: str) -> CLIPConfig:
    """A JSON model config: openai/CLIP constructor arguments, or our own `CLIPConfig.to_dict()` layout."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model config file not found: {path!r}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path!r} is not valid JSON: {err}") from err
    if not isinstance(d, dict):
        raise ValueError(f"model config {path!r} must be a JSON object")
    return CLIPConfig.from_dict(d) if "vision" in d or "text" in d else CLIPConfig.from_openai_args(d)


def build_model(cfg: TrainConfig) -> CLIP:
    """Fresh weights from a config file or registry name (seeded by the caller), or pretrained ones."""
    spec = cfg.model
    if spec.pretrained:
        import clip

        model = clip.load(spec.pretrained, device="cpu", context_length=spec.context_length)[0]
        return model.float()
    config = load_model_config(spec.config_path) if spec.config_path else get_config(spec.name)
    check_vocab_fits_tokenizer(config, spec.config_path or spec.name)
    return CLIP(config)


def check_vocab_fits_tokenizer(config: CLIPConfig, where: str | None) -> None:
    """Training tokenizes with OpenAI's BPE unless the config names another tokenizer: its ids must fit."""
    from clip.tokenizer import VOCAB_SIZE

    t = config.text
    if t.hf_tokenizer_name is None and t.vocab_size < VOCAB_SIZE:
        raise ValueError(
            f"model config {where}: text vocab_size {t.vocab_size} is smaller than the OpenAI tokenizer's "
            f"{VOCAB_SIZE} ids, so training would index past the embedding table; set vocab_size >= {VOCAB_SIZE}"
        )


def text_parameters(model: CLIP) -> list[torch.nn.Parameter]:
    return [
        p
        for name, p in model.named_parameters()
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")
    ]


def apply_locks(model: CLIP, lock_image: bool, lock_text: bool) -> None:
    """Freeze a tower (LiT: Zhai et al., 2022, trains the text tower against a locked image tower)."""
    if lock_image:
        model.visual.requires_grad_(False)
    if lock_text:
        for p in text_parameters(model):
            p.requires_grad_(False)


def data_kwargs(
    cfg: TrainConfig, config: CLIPConfig, augment: bool = True, tokenizer: Any = None
) -> dict[str, Any]:
    d = cfg.data
    return dict(resolution=config.vision.image_size, context_length=config.text.context_length,
                seed=cfg.run.seed, crop_scale=d.crop_scale, mean=config.mean, std=config.std,
                img_key=d.csv_img_key, caption_key=d.csv_caption_key, separator=d.csv_separator,
                augment=augment, tokenizer=tokenizer)  # fmt: skip


def model_tokenizer(model: CLIP) -> Any:
    """The tokenizer training data goes through: None for OpenAI's BPE (the data sets' own fast path),
    else the model's own (`clip.get_tokenizer`: SigLIP, CLIPA, -worldwide), built once and pickled to workers."""
    if not model.config.text.hf_tokenizer_name:
        return None
    from clip.loading import get_tokenizer

    return get_tokenizer(model)


def build_map_dataset(cfg: TrainConfig, config: CLIPConfig, tokenizer: Any = None) -> tuple[Any, Order]:
    """The CSV / folder source(s) of `train_data`, mixed by weight when there are several."""
    d = cfg.data
    parts = d.train_data.split("::")
    datasets = [open_map_source(p, **data_kwargs(cfg, config, tokenizer=tokenizer)) for p in parts]
    if len(datasets) == 1:
        return datasets[0], default_order(len(datasets[0]), cfg.run.seed, d.train_num_samples)
    mixed = MixedDataset(
        datasets, d.train_data_weights or [1.0] * len(datasets), cfg.run.seed, d.train_num_samples
    )
    return mixed, mixed.order


def check_sources(cfg: TrainConfig) -> None:
    """Fail before any model is built when `train_data` cannot be opened at all (a missing file or folder, or
    shards without the webdataset package)."""
    spec = cfg.data.train_data
    if not spec:
        return
    if is_webdataset(spec):
        expand_sources(spec)  # names the extra to install when webdataset is missing
        return
    for part in spec.split("::"):
        if not Path(part).exists():
            raise FileNotFoundError(f"training data {part!r} is neither a file nor a folder")


def build_stream(
    cfg: TrainConfig, config: CLIPConfig, info: DistInfo, *, dataset: Any = None, order: Order | None = None,
    position: dict | None = None, tokenizer: Any = None,
) -> MapStream | WdsStream:  # fmt: skip
    """The data stream of this rank, starting at `position` (from a checkpoint) or at the beginning."""
    d = cfg.data
    plan = BatchPlan(d.batch_size, cfg.optim.accum_freq, info.rank, info.world_size)
    pin = info.device.type == "cuda"
    if dataset is None and d.train_data and is_webdataset(d.train_data):
        return _wds_stream(cfg, config, info, plan, pin, position, tokenizer)
    if dataset is None:
        if not d.train_data:
            raise ValueError("no training data: give --train-data (or pass a dataset to train())")
        dataset, default = build_map_dataset(cfg, config, tokenizer)
        order = order or default
    else:
        order = order or default_order(len(dataset), cfg.run.seed, d.train_num_samples)
    require_readable(dataset, d.train_data or type(dataset).__name__)
    return MapStream(dataset, order, plan, workers=d.workers, pin_memory=pin, position=position)


def _wds_stream(cfg: TrainConfig, config: CLIPConfig, info: DistInfo, plan: BatchPlan, pin: bool,
                position: dict | None, tokenizer: Any = None) -> WdsStream:  # fmt: skip
    d = cfg.data
    sources = expand_sources(d.train_data)
    weights = d.train_data_weights or (1.0,) * len(sources)
    if d.dataset_resampled and d.train_num_samples is None and cfg.run.steps is None:
        raise ValueError("resampled WebDataset streams never end: give --train-num-samples or --steps")
    if cfg.run.epochs is not None and d.train_num_samples is None:
        raise ValueError(
            "--epochs with WebDataset needs --train-num-samples (the epoch length); or use --steps"
        )
    steps = d.train_num_samples // plan.global_batch if d.train_num_samples else None
    if steps == 0:
        raise ValueError(
            f"--train-num-samples {d.train_num_samples} is less than one global batch ({plan.global_batch})"
        )

    def make_epoch(epoch: int, skip: tuple[int, ...], shift: int) -> WebDatasetEpoch:
        return WebDatasetEpoch(
            sources, weights, epoch=epoch, seed=cfg.run.seed, rank=info.rank, world=info.world_size,
            batch_size=d.batch_size, shuffle_buffer=d.shuffle_buffer, resampled=d.dataset_resampled,
            resolution=config.vision.image_size, context_length=config.text.context_length,
            crop_scale=d.crop_scale, mean=config.mean, std=config.std, skip=skip, shift=shift, tokenizer=tokenizer,
        )  # fmt: skip

    return WdsStream(make_epoch, accum=plan.accum, workers=d.workers, world=info.world_size, pin_memory=pin,
                     steps_per_epoch=steps, position=position)  # fmt: skip


def build_val_dataset(cfg: TrainConfig, config: CLIPConfig, tokenizer: Any = None) -> Any:
    """Held-out pairs (CSV or folder) with the evaluation transform, or None."""
    if not cfg.data.val_data:
        return None
    return open_map_source(cfg.data.val_data, **data_kwargs(cfg, config, augment=False, tokenizer=tokenizer))
