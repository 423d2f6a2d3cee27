"""Training options and helpers: schedule, parameter groups, config and CLI mapping, checkpoints on disk,
tower locking, validation recall, mixed precision, gradient checkpointing, SigLIP, fine-tuning, sources."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.train import DataConfig, ModelSpec, OptimConfig, RunConfig, TrainConfig, train
from clip.train.checkpoint import resolve_resume, save_checkpoint, step_files
from clip.train.optim import CosineSchedule, adam_hparams, clamp_logit_scale, no_decay_names, param_groups
from clip.train.validate import retrieval_recall

TINY = {
    "embed_dim": 16,
    "vision": {"kind": "vit", "image_size": 16, "width": 16, "layers": 1, "heads": 2, "patch_size": 8},
    "text": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_schedule_with_warmup():
    s = CosineSchedule(lr=1.0, warmup=4, total_steps=14, min_lr=0.1)
    assert [s.lr_at(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.lr_at(4) == pytest.approx(1.0)
    assert s.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s.lr_at(14) == pytest.approx(0.1) and s.lr_at(100) == pytest.approx(0.1)


def test_parameter_groups_and_adam_defaults():
    from clip.config import get_config
    from clip.model import CLIP
    from clip.train.step import ContrastiveModel

    model = ContrastiveModel(CLIP(get_config("RN-Tiny@32px")), "siglip")
    skip = no_decay_names(model)
    for name in ("clip.logit_scale", "logit_bias", "clip.token_embedding.weight", "clip.positional_embedding",
                 "clip.visual.attnpool.positional_embedding", "clip.ln_final.weight", "clip.visual.bn1.bias"):  # fmt: skip
        assert name in skip, name
    for name in (
        "clip.text_projection",
        "clip.visual.conv1.weight",
        "clip.transformer.resblocks.0.attn.in_proj_weight",
    ):
        assert name not in skip, name
    model.clip.visual.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert adam_hparams("vit", None, None, None) == {"betas": (0.9, 0.98), "eps": 1e-6}
    assert adam_hparams("resnet", None, None, 1e-5) == {"betas": (0.9, 0.999), "eps": 1e-5}


def test_logit_scale_clamp():
    from clip.config import get_config
    from clip.model import CLIP

    model = CLIP(get_config("ViT-Tiny/8@32px"))
    model.logit_scale.data.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_retrieval_recall_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.2], [0.0, 0.1, 0.3]])
    r = retrieval_recall(sim, ks=(1, 2))
    # image->text: row 1's own text (0.5) is beaten by 0.8 -> rank 1
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3) and r["image_to_text_R@2"] == 1.0
    # text->image: in every column the matching image scores highest
    assert r["text_to_image_R@1"] == 1.0


def test_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(data=DataConfig(train_data="a.csv::b.csv", train_data_weights=[1, 2]),
                      run=RunConfig(epochs=2))  # fmt: skip
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.data.train_data_weights == (1.0, 2.0)
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"optim": {"learning_rate": 1.0}})
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        RunConfig(steps=3, epochs=1)
    with pytest.raises(ValueError, match="one weight per"):
        DataConfig(train_data="a.csv", train_data_weights=(1.0, 2.0))


def test_cli_flags_map_to_the_config():
    from clip.cli import build_parser
    from clip.commands.train import config_from_args

    args = build_parser().parse_args(
        ["train", "--train-data", "x.csv", "--output-dir", "o", "--steps", "5", "--lr", "0.1", "--loss", "siglip",
         "--lock-image", "--crop-scale", "0.5", "1", "--train-data-weights", "1", "--no-progress", "--accum-freq", "2", "--fused-adamw"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.optim.lr == 0.1 and cfg.optim.loss == "siglip" and cfg.optim.accum_freq == 2
    assert cfg.optim.fused is True and cfg.optim.label_smoothing == 0.0
    smooth = build_parser().parse_args(["train", "--train-data", "x.csv", "--output-dir", "o", "--steps", "5",
                                        "--label-smoothing", "0.1"])  # fmt: skip
    assert config_from_args(smooth).optim.label_smoothing == 0.1
    assert cfg.model.lock_image and not cfg.run.progress and cfg.run.steps == 5
    assert cfg.data.crop_scale == (0.5, 1.0) and cfg.data.train_data_weights == (1.0,)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--output-dir", "o", "--learning-rate", "1"])


def test_checkpoint_keep_latest_and_resume_lookup(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint({"step": step, "x": torch.ones(2)}, tmp_path, step, keep=2)
    assert [p.name for p in step_files(tmp_path)] == ["step_000006.pt", "step_000008.pt"]
    latest = resolve_resume("latest", tmp_path)
    assert latest.name == "step_000008.pt"
    assert torch.load(latest, weights_only=True)["step"] == 8
    with pytest.raises(FileNotFoundError, match="drop --resume"):
        resolve_resume("latest", tmp_path / "empty")


# ------------------------------------------------------------------------------------- short real runs


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 images with .txt captions in a folder (the image-folder source), plus the tiny model config."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"picture number {i}")
    (root.parent / "tiny.json").write_text(json.dumps(TINY))
    return root


def _cfg(folder: Path, out: Path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        data=DataConfig(train_data=str(folder), batch_size=8, workers=0),
        model=ModelSpec(name=None, config_path=str(folder.parent / "tiny.json")),
        optim=OptimConfig(lr=1e-3, warmup=1),
        run=RunConfig(output_dir=str(out), steps=3, save_every=100, log_every=1, progress=False),
    )
    for group, values in changes.items():
        cfg = dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **values)})
    return cfg


def _initial(seed: int = 0):
    from clip.config import CLIPConfig
    from clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(TINY))


def test_lock_image_keeps_the_image_tower(folder, tmp_path):
    result = train(_cfg(folder, tmp_path, model={"lock_image": True}))
    before = _initial().state_dict()
    after = result.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(after["text_projection"], before["text_projection"])


def test_validation_recall_is_logged(folder, tmp_path):
    result = train(
        _cfg(folder, tmp_path, data={"val_data": str(folder), "val_every": 2, "val_num_samples": 10})
    )
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert "val_image_to_text_R@1" in records[1] and "val_text_to_image_R@5" in records[1]
    assert 0.0 <= records[1]["val_image_to_text_R@5"] <= 1.0 and "val_image_to_text_R@1" not in records[0]


def test_grad_checkpointing_gives_the_same_weights(folder, tmp_path):
    plain = train(_cfg(folder, tmp_path / "a")).model.state_dict()
    ckpt = train(_cfg(folder, tmp_path / "b", model={"grad_checkpointing": True})).model.state_dict()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-6)


def test_fused_adamw_on_cpu_equals_the_default_up_to_rounding(folder, tmp_path, monkeypatch):
    """--fused-adamw takes AdamW's fused kernel on CPU (the default there is the per-tensor loop, as open_clip)."""
    made = []
    real = torch.optim.AdamW

    def spy(*args, **kwargs):
        made.append(kwargs.get("fused"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    plain = train(_cfg(folder, tmp_path / "a")).model.state_dict()
    fused = train(_cfg(folder, tmp_path / "b", optim={"fused": True})).model.state_dict()
    assert made == [False, True]
    start = _initial().state_dict()
    moved = max(float((plain[k] - start[k]).abs().max()) for k in plain)
    assert moved > 2e-3  # 3 steps of lr 1e-3 moved the weights: the comparison below means something
    for k in plain:  # Adam divides by sqrt(v): rounding in tiny gradients shows as a small part of one step
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fused must be"):
        OptimConfig(fused="yes")


def test_label_smoothing_trains_and_is_recorded(folder, tmp_path):
    plain = train(_cfg(folder, tmp_path / "a", run={"steps": 1}))
    smooth = train(_cfg(folder, tmp_path / "b", run={"steps": 1}, optim={"label_smoothing": 0.1}))
    assert smooth.loss > plain.loss  # the same first batch and weights: smoothing raises the loss
    assert (
        json.loads((tmp_path / "b" / "config.json").read_text())["train"]["optim"]["label_smoothing"] == 0.1
    )
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        OptimConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="siglip loss has none"):
        OptimConfig(loss="siglip", label_smoothing=0.1)


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_runs(folder, tmp_path, precision):
    result = train(_cfg(folder, tmp_path, optim={"precision": precision}))
    assert result.step == 3 and math.isfinite(result.loss)
    saved = torch.load(result.checkpoint, weights_only=True)
    assert bool(saved["scaler"]) == (precision == "amp_fp16")  # fp16 keeps a GradScaler state
    assert all(t.dtype == torch.float32 for t in saved["state_dict"].values() if t.is_floating_point())


def test_siglip_and_accumulation_run_and_resume(folder, tmp_path):
    cfg = _cfg(folder, tmp_path, optim={"loss": "siglip", "accum_freq": 2}, data={"batch_size": 4},
               run={"save_every": 2, "steps": 4})  # fmt: skip
    full = train(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "step_000002.pt", weights_only=True)
    assert saved["loss_state"]["logit_bias"].item() != -10.0  # the bias trains
    resumed = train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=str(
        tmp_path / "checkpoints" / "step_000002.pt"), output_dir=str(tmp_path / "again"))))  # fmt: skip
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_fine_tune_from_pretrained_and_mixed_sources(folder, tmp_path):
    first = train(_cfg(folder, tmp_path / "a"))
    csv = folder.parent / "pairs.csv"
    csv.write_text("filepath,caption\n" + "".join(f"{folder.name}/{i:02d}.png,image {i}\n" for i in range(8)))
    cfg = _cfg(folder, tmp_path / "b", model={"pretrained": str(first.checkpoint)},
               data={"train_data": f"{folder}::{csv}", "train_data_weights": (1.0, 1.0)})  # fmt: skip
    tuned = train(cfg)
    assert tuned.step == 3 and tuned.skipped == {}
    start = first.model.state_dict()
    moved = max((tuned.model.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert 0 < moved < 0.1  # started from the pretrained weights and moved a little
    with pytest.raises(ValueError, match="differs"):
        train(_cfg(folder, tmp_path / "c", model={"name": "ViT-Tiny/8@32px", "config_path": None},
                   run={"resume": str(first.checkpoint)}))  # fmt: skip


def test_fresh_run_over_an_earlier_run_keeps_its_own_checkpoints(tmp_path):
    for step in (10, 20):  # an earlier, longer run in the same folder
        save_checkpoint({"step": step}, tmp_path, step, keep=5)
    for step in (2, 4, 6):
        save_checkpoint({"step": step}, tmp_path, step, keep=2)
    assert [p.name for p in step_files(tmp_path)] == ["step_000004.pt", "step_000006.pt", "step_000010.pt",
                                                     "step_000020.pt"]  # fmt: skip
    assert torch.load(resolve_resume("latest", tmp_path), weights_only=True)["step"] == 6


def test_training_data_goes_through_the_models_own_tokenizer(folder, tmp_path):
    """A model whose config names an HF tokenizer (SigLIP, CLIPA) trains on that tokenizer's ids.

    Its 400-id vocabulary would be indexed out of range by OpenAI's BPE ids; the validation set too.
    """
    from test_hf_tokenizer import bert_folder

    from clip.config import CLIPConfig
    from clip.model import CLIP

    tok_dir = bert_folder(tmp_path / "tok")
    cfg = CLIPConfig.from_dict(TINY).replace(
        text={"vocab_size": 400, "hf_tokenizer_name": "bert-base-uncased", "tokenizer_kwargs": {}}
    )
    torch.manual_seed(0)
    model = CLIP(cfg)
    model.tokenizer_dir = tok_dir
    run = _cfg(folder, tmp_path / "run", data={"val_data": str(folder), "val_every": 2, "val_num_samples": 8})
    result = train(run, model=model)
    assert result.step == 3 and math.isfinite(result.loss)
