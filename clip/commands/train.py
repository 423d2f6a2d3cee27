"""`clip train`: contrastive training from the command line (also `torchrun -m clip train` for DDP).

Each flag maps to one field of the `TrainConfig` groups (same name, dashes for underscores); the table below is
the only place the mapping lives. The resolved config is written to OUT/config.json.
"""

from __future__ import annotations

import argparse
import math
import sys

from clip.train.config import LOSSES, PRECISIONS


def finite(text: str) -> float:
    """argparse type: a finite float (inf and nan are refused here, before anything runs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def weights(text: str) -> tuple[float, ...]:
    """argparse type: '1::2' -> (1.0, 2.0), each finite and positive."""
    return tuple(positive(w) for w in text.split("::"))


# (flag, group, field, argparse keyword arguments)
FLAGS: tuple[tuple[str, str, str, dict], ...] = (
    ("--train-data", "data", "train_data",
     dict(help="CSV/TSV file, folder of images + .txt, or WebDataset shards ('s/{000000..000099}.tar'); "
               "several sources joined with '::'")),
    ("--train-data-weights", "data", "train_data_weights",
     dict(type=weights, help="mixing weights, e.g. '1::2'")),
    ("--csv-img-key", "data", "csv_img_key", dict(default="filepath", help="image-path column (default filepath)")),
    ("--csv-caption-key", "data", "csv_caption_key", dict(default="caption", help="caption column (default caption)")),
    ("--csv-separator", "data", "csv_separator", dict(help="column separator (default: tab for .tsv, else comma)")),
    ("--batch-size", "data", "batch_size", dict(type=int, default=64, help="samples per process per step")),
    ("--workers", "data", "workers", dict(type=int, default=4, help="DataLoader processes per rank (0 = main)")),
    ("--train-num-samples", "data", "train_num_samples", dict(type=int, help="samples per epoch")),
    ("--dataset-resampled", "data", "dataset_resampled",
     dict(action="store_true", help="WebDataset: draw shards with replacement")),
    ("--shuffle-buffer", "data", "shuffle_buffer", dict(type=int, default=1000, help="WebDataset shuffle buffer")),
    ("--crop-scale", "data", "crop_scale",
     dict(type=positive, nargs=2, default=(0.9, 1.0), metavar=("LO", "HI"), help="random-resized-crop area range")),
    ("--val-data", "data", "val_data", dict(help="held-out pairs (CSV or folder) for retrieval recall")),
    ("--val-every", "data", "val_every", dict(type=int, default=0, help="validate every N steps (0 = never)")),
    ("--val-num-samples", "data", "val_num_samples", dict(type=int, default=1000, help="held-out pairs to use")),
    ("--model", "model", "name", dict(default="ViT-B/32", help="registry model name (default ViT-B/32)")),
    ("--model-config", "model", "config_path",
     dict(help="JSON of openai/CLIP constructor arguments (embed_dim, image_resolution, ...; quick_gelu)")),
    ("--pretrained", "model", "pretrained", dict(help="fine-tune weights `clip.load` reads (name or path)")),
    ("--context-length", "model", "context_length",
     dict(type=int, help="stretch --pretrained text positions to N (Long-CLIP: 248 from 77)")),
    ("--lock-image", "model", "lock_image", dict(action="store_true", help="freeze the image tower (LiT)")),
    ("--lock-text", "model", "lock_text", dict(action="store_true", help="freeze the text tower")),
    ("--grad-checkpointing", "model", "grad_checkpointing",
     dict(action="store_true", help="recompute activations in backward (less memory)")),
    ("--compile", "model", "compile", dict(action="store_true", help="torch.compile the model")),
    ("--loss", "optim", "loss", dict(choices=LOSSES, help="clip (InfoNCE) or siglip (sigmoid); default: the model's "
                                                           "own (siglip for a SigLIP model, else clip)")),
    ("--lr", "optim", "lr", dict(type=positive, default=5e-4, help="peak learning rate")),
    ("--wd", "optim", "wd", dict(type=non_negative, default=0.2, help="AdamW weight decay (matrices only)")),
    ("--warmup", "optim", "warmup", dict(type=int, default=1000, help="linear warmup steps")),
    ("--min-lr", "optim", "min_lr", dict(type=non_negative, default=0.0, help="learning rate at the end of the cosine")),
    ("--beta1", "optim", "beta1", dict(type=finite, help="AdamW beta1 (default 0.9)")),
    ("--beta2", "optim", "beta2", dict(type=finite, help="AdamW beta2 (default 0.98 ViT, 0.999 ResNet)")),
    ("--eps", "optim", "eps", dict(type=positive, help="AdamW eps (default 1e-6 ViT, 1e-8 ResNet)")),
    ("--grad-clip-norm", "optim", "grad_clip_norm", dict(type=positive, help="clip the gradient norm to this")),
    ("--label-smoothing", "optim", "label_smoothing",
     dict(type=non_negative, default=0.0, help="the clip loss's label smoothing (default 0: CLIP's loss)")),
    ("--precision", "optim", "precision",
     dict(choices=PRECISIONS, default="auto", help="auto = amp_bf16 on GPU, fp32 on CPU")),
    ("--fused-adamw", "optim", "fused", dict(action=argparse.BooleanOptionalAction, default=None,
                                               help="AdamW's fused kernel (default: on CUDA only; on CPU it is "
                                                    "faster and equal up to float rounding)")),
    ("--accum-freq", "optim", "accum_freq",
     dict(type=int, default=1, help="micro-batches per step, keeping all their negatives")),
    ("--output-dir", "run", "output_dir", dict(required=True, help="run folder (checkpoints, metrics, curves)")),
    ("--steps", "run", "steps", dict(type=int, help="optimizer steps")),
    ("--epochs", "run", "epochs", dict(type=int, help="epochs (instead of --steps)")),
    ("--seed", "run", "seed", dict(type=int, default=0, help="seed of weights, data order and augmentation")),
    ("--save-every", "run", "save_every", dict(type=int, default=1000, help="checkpoint every N steps")),
    ("--keep", "run", "keep", dict(type=int, default=3, help="step checkpoints to keep")),
    ("--resume", "run", "resume", dict(help="'latest' or a checkpoint path")),
    ("--max-seconds", "run", "max_seconds", dict(type=positive, help="stop cleanly after this wall-clock time")),
    ("--log-every", "run", "log_every", dict(type=int, default=10, help="flush metrics every N steps")),
    ("--tensorboard", "run", "tensorboard", dict(action="store_true", help="also log to OUT/tensorboard")),
    ("--no-progress", "run", "progress", dict(action="store_false", help="no progress bar")),
    ("--device", "run", "device", dict(choices=("auto", "cpu", "cuda"), default="auto", help="training device")),
)  # fmt: skip

GROUP_TITLES = {"data": "data", "model": "model", "optim": "loss and optimisation", "run": "run"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="contrastive training on image-text pairs (one CPU to many GPUs with torchrun)",
        description=(
            "Train CLIP with the symmetric InfoNCE (or sigmoid) loss. Under `torchrun --nproc_per_node N -m clip "
            "train ...` features are all-gathered so every sample sees the whole global batch as negatives."
        ),
    )
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for flag, group, name, kwargs in FLAGS:
        if kwargs.get("action") not in ("store_true", "store_false", argparse.BooleanOptionalAction) and (
            "choices" not in kwargs
        ):
            kwargs = {"metavar": flag[2:].upper().replace("-", "_"), **kwargs}
        groups[group].add_argument(flag, dest=f"{group}__{name}", **kwargs)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of parsed flags (each `group__field` destination fills that field)."""
    from clip.train.config import TrainConfig

    values: dict[str, dict] = {g: {} for g in GROUP_TITLES}
    for key, value in vars(args).items():
        group, sep, name = key.partition("__")
        if sep and group in values:
            values[group][name] = tuple(value) if isinstance(value, list) else value
    return TrainConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from clip.commands.common import CLIError
    from clip.train.loop import train

    try:
        result = train(config_from_args(args))
    except OSError as err:  # a write or read the library did not expect to fail: one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        raise CLIError(f"{where}{err.strerror or err}") from err
    for note in result.notes:
        print(note, file=sys.stderr)
    if result.checkpoint is not None:  # rank 0 reports
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items())) or "none"
        loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
        how = "stopped at the time budget" if result.stopped_early else "done"
        print(f"{how}: step {result.step}, epoch {result.epoch}, loss {loss}, {result.elapsed_s:.1f} s; "
              f"skipped samples: {skipped}", file=sys.stderr)  # fmt: skip
        print(result.checkpoint)
    return 0
