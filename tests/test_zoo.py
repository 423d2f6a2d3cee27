"""OpenCLIP's model zoo against open_clip itself (issue 9), with nothing downloaded.

1. Every OpenCLIP architecture in the registry (all of clip/data/open_clip_archs.json) builds, on the
   meta device, with exactly open_clip's parameter names and shapes, head counts, LayerNorm eps,
   activation, pooling and causal mask.
2. Tiny random open_clip models, one per tower option, saved in each layout OpenCLIP users have
   (state dict beside open_clip_config.json, Hub folder with .bin or .safetensors, training
   checkpoint, `hf-hub:` through a 127.0.0.1 mirror), load through `clip.load` with the same
   image and text features.
3. What shapes cannot decide is an error naming the fix (`arch=`, `quick_gelu=`), never a guess.
"""

from __future__ import annotations

import argparse
import copy
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from open_clip.model import CLIP as OpenCLIP
from open_clip.model import CustomTextCLIP
from safetensors.torch import save_file
from torch import nn

import clip
from clip.commands import models as models_command
from clip.convert import infer_config
from clip.loading import model_from_state_dict, read_checkpoint, resolve
from clip.model import CLIP
from clip.registry import OPENAI_NAMES, from_open_clip, get, open_clip_raw_configs, small_configs

OPEN_CLIP_NAMES = sorted(open_clip_raw_configs())
# OpenAI's release names win these: same shapes as OpenCLIP's, but QuickGELU (OpenAI's weights).
COLLIDING = {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"}
INIT_FUNCTIONS = ("normal_", "trunc_normal_", "uniform_", "zeros_", "ones_", "constant_",
                  "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")  # fmt: skip


# --------------------------------------------------------------------------- 1. every architecture, on meta


def _keep(*args: Any, **kwargs: Any) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@pytest.fixture
def no_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta tensors hold no values, so initialisation is skipped: it is most of a meta build's time."""
    for fn in INIT_FUNCTIONS:
        monkeypatch.setattr(nn.init, fn, _keep)


def _structure(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[Any, ...]]]:
    """(tensor name -> shape, module name -> what decides its numbers beyond shapes)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    options: dict[str, tuple[Any, ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            options[name] = ("LayerNorm", m.eps)
        elif isinstance(m, nn.GELU):
            options[name] = ("GELU", m.approximate)
        elif type(m).__name__ == "QuickGELU":
            options[name] = ("QuickGELU",)
        elif isinstance(getattr(m, "num_heads", None), int):
            options[name] = ("heads", m.num_heads)
    visual = model.visual
    for attr in ("pool_type", "final_ln_after_pool"):
        if hasattr(visual, attr):
            options[f"visual.{attr}"] = (getattr(visual, attr),)
    return shapes, options


def _open_clip_text(model: OpenCLIP) -> tuple[Any, ...]:
    eos = model.text_eos_id if model.text_pool_type == "eos" else None
    return model.text_pool_type, eos, model.attn_mask is not None, model.context_length, model.vocab_size


def _our_text(model: CLIP) -> tuple[Any, ...]:
    t = model.config.text
    return t.pool_type, t.eos_id, t.causal, t.context_length, t.vocab_size


def _activations(options: dict[str, tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    return {v for v in options.values() if v[0] in ("GELU", "QuickGELU")}


@pytest.mark.parametrize("name", OPEN_CLIP_NAMES)
def test_every_open_clip_architecture_matches_open_clip_on_meta(
    name: str, no_init: None, one_thread: None
) -> None:
    with torch.device("meta"):
        theirs = OpenCLIP(**open_clip.get_model_config(name))
        ours = CLIP(get(name))
    their_shapes, their_options = _structure(theirs)
    our_shapes, our_options = _structure(ours)
    assert our_shapes == their_shapes
    assert _our_text(ours) == _open_clip_text(theirs)
    if name in COLLIDING:
        # The registry's name is OpenAI's release (QuickGELU); OpenCLIP's GELU model is one call away.
        assert _activations(our_options) == {("QuickGELU",)}
        assert _activations(their_options) == {("GELU", "none")}
        assert from_open_clip(open_clip_raw_configs()[name]).quick_gelu is False
        their_options = {k: v for k, v in their_options.items() if v[0] != "GELU"}
        our_options = {k: v for k, v in our_options.items() if v[0] != "QuickGELU"}
    assert our_options == their_options


def test_registry_holds_openai_open_clip_and_small_names() -> None:
    from clip.registry import all_configs

    names = list(all_configs())
    assert names[: len(OPENAI_NAMES)] == list(OPENAI_NAMES)  # OpenAI's first, as openai/CLIP lists them
    assert set(names) >= set(OPENAI_NAMES) | set(OPEN_CLIP_NAMES) | set(small_configs())  # (and SigLIP's)
    assert get("ViT-H-14").vision.heads == 16 and get("ViT-bigG-14").vision.heads == 16
    assert get("RN50").quick_gelu and not get("ViT-B-32").quick_gelu and get("ViT-B-32-quickgelu").quick_gelu


# --------------------------------------------------------------------------- 2. tiny random open_clip models

VOCAB, CTX, EMBED = 1000, 16, 48
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT = {"context_length": CTX, "vocab_size": VOCAB, "width": 64, "heads": 2, "layers": 2}
RESNET = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32}
EPS_TANH = {"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}
PREPROCESS = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

# case -> (vision_cfg changes, text_cfg changes, quick_gelu)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], bool]] = {
    "head_width_80": ({"width": 320, "head_width": 80}, {}, False),  # ViT-H-14's 80-wide heads: 4, not 5
    "mlp_ratio_4.9231": ({"mlp_ratio": 4.9231}, {"mlp_ratio": 4.9231}, False),  # ViT-bigG-14's
    "layer_scale": ({"ls_init_value": 0.5}, {"ls_init_value": 0.5}, False),
    "quickgelu": ({}, {}, True),
    "gelu_tanh_eps_1e-6": (EPS_TANH, EPS_TANH, False),
    "text_pool_last": ({}, {"pool_type": "last"}, False),
    "text_pool_first_no_causal_mask": ({}, {"pool_type": "first", "no_causal_mask": True}, False),
    "text_pool_eos": ({}, {"pool_type": "eos", "eos_id": 2}, False),
    "no_causal_mask": ({}, {"no_causal_mask": True}, False),
    "vision_avg_pool": ({"pool_type": "avg"}, {}, False),
    "clipa": (
        {"pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
        {"pool_type": "last", "no_causal_mask": True},
        False,
    ),  # fmt: skip
    "text_proj_bias": ({}, {"proj_bias": True}, False),
    "resnet_w16": (RESNET, {}, False),
    "resnet_w24_quickgelu": ({**RESNET, "layers": [1, 2, 1, 1], "width": 24, "head_width": 64}, {}, True),
    "custom_text": (
        {},
        {"pool_type": "eos", "eos_id": 2},
        False,
    ),  # CustomTextCLIP: the text tower under `text.`
}


def _model_cfg(case: str) -> dict[str, Any]:
    """The OpenCLIP model config of a case, as open_clip_config.json's `model_cfg` holds it."""
    vision, text, quick_gelu = CASES[case]
    base = {} if "layers" in vision and isinstance(vision["layers"], list) else VISION
    cfg = {"embed_dim": EMBED, "vision_cfg": {**base, **vision}, "text_cfg": {**TEXT, **text}}
    if case == "custom_text":
        cfg["custom_text"] = True
    return {**cfg, "quick_gelu": True} if quick_gelu else cfg


def _open_clip_model(model_cfg: dict[str, Any], seed: int = 0) -> OpenCLIP:
    """A random open_clip CLIP in eval mode where every weight matters.

    open_clip's initialisation leaves biases at zero, ResNet branches at identity (bn3 = 0) and BatchNorm
    statistics at (0, 1); noise on every tensor makes a mix-up of any of them visible in the features.
    """
    torch.manual_seed(seed)
    cfg = copy.deepcopy(model_cfg)
    model = (CustomTextCLIP if cfg.pop("custom_text", False) else OpenCLIP)(**cfg).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or name == "logit_scale":
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.add_(torch.randn_like(tensor) * 0.05)
    return model


def _tokens(text_cfg: dict[str, Any], lengths: tuple[int, ...]) -> torch.Tensor:
    """Token rows as each tokenizer family writes them: start, body, end, padding.

    OpenAI BPE (argmax pooling): end-of-text is the highest id.  eos pooling (XLM-V / mT5 style): `</s>`
    = eos_id, padding 1.  BERT (CLIPA, pooled first / last): [CLS] 101, SEP stripped, padding 0.
    """
    pool = text_cfg.get("pool_type", "argmax")
    start, end, pad = {"argmax": (VOCAB - 2, VOCAB - 1, 0), "eos": (0, text_cfg.get("eos_id"), 1),
                       "first": (101, None, 0), "last": (101, None, 0)}[pool]  # fmt: skip
    g = torch.Generator().manual_seed(len(lengths))
    rows = []
    for n in lengths:
        body = torch.randint(3, VOCAB - 2, (n - 1 - (end is not None),), generator=g).tolist()
        row = [start, *body] + ([end] if end is not None else [])
        rows.append(row + [pad] * (CTX - n))
    return torch.tensor(rows)


def _write_config(folder: Path, model_cfg: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(raw), encoding="utf-8")


def _state_dict_beside_config(folder: Path, sd: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> Path:
    _write_config(folder, model_cfg)
    torch.save(sd, folder / "weights.pt")
    return folder / "weights.pt"


def _hub_folder_bin(folder: Path, sd: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> Path:
    _write_config(folder, model_cfg)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return folder


def _hub_folder_safetensors(folder: Path, sd: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> Path:
    _write_config(folder, model_cfg)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def _training_checkpoint(folder: Path, sd: dict[str, torch.Tensor], model_cfg: dict[str, Any]) -> Path:
    """open_clip's training loop saves epoch, run name, the DDP-wrapped state dict and the optimizer."""
    _write_config(folder, model_cfg)
    optimizer = {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.2, "params": [0, 1]}]}
    ckpt = {"epoch": 2, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "optimizer": optimizer}  # fmt: skip
    torch.save(ckpt, folder / "epoch_2.pt")
    return folder / "epoch_2.pt"


LAYOUTS = {
    "state_dict_beside_config": _state_dict_beside_config,
    "hub_folder_bin": _hub_folder_bin,
    "hub_folder_safetensors": _hub_folder_safetensors,
    "training_checkpoint": _training_checkpoint,
}


class _HubMirror(http.server.BaseHTTPRequestHandler):
    """The HF Hub's file route, `/{org}/{repo}/resolve/{revision}/{file}`, from a dict; 404 otherwise."""

    files: dict[str, bytes]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def hub_mirror() -> Iterator[tuple[str, dict[str, bytes]]]:
    """(base URL, files by URL path) of an HF Hub stand-in on 127.0.0.1."""
    files: dict[str, bytes] = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Mirror", (_HubMirror,), {"files": files}))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _features(model: nn.Module, images: torch.Tensor, texts: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model.encode_image(images)] + [model.encode_text(t) for t in texts]


@pytest.mark.parametrize("case", CASES)
def test_open_clip_option_loads_with_open_clip_features(
    case: str, tmp_path: Path, hub_mirror: tuple[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:  # fmt: skip
    model_cfg = _model_cfg(case)
    theirs = _open_clip_model(model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    # Rows shorter than the context (the CPU path cuts after the last end token) and a full row.
    texts = [_tokens(model_cfg["text_cfg"], (3, 7, 12)), _tokens(model_cfg["text_cfg"], (CTX, 5))]
    want = _features(theirs, images, texts)
    sd = theirs.state_dict()
    expected_cfg = from_open_clip(model_cfg)
    assert expected_cfg.quick_gelu is CASES[case][2]

    loaded = {}
    for layout, write in LAYOUTS.items():
        loaded[layout] = clip.load(str(write(tmp_path / layout, sd, model_cfg)), device="cpu")
    # The same Hub folder served over HTTP, as `hf-hub:org/repo` with HF_ENDPOINT at the mirror; repos
    # hold either weights file (a .bin-only repo is asked for the .safetensors first and answers 404).
    base_url, files = hub_mirror
    repo = f"zoo/{case}"
    folder, weights = (
        ("hub_folder_bin", "open_clip_pytorch_model.bin")
        if list(CASES).index(case) % 2
        else ("hub_folder_safetensors", "open_clip_model.safetensors")
    )
    for name in ("open_clip_config.json", weights):
        files[f"/{repo}/resolve/main/{name}"] = (tmp_path / folder / name).read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", base_url)
    loaded["hf-hub"] = clip.load(f"hf-hub:{repo}", device="cpu", download_root=str(tmp_path / "cache"))

    for layout, (model, preprocess) in loaded.items():
        assert model.config.replace(mean=expected_cfg.mean, std=expected_cfg.std) == expected_cfg, layout
        assert preprocess.mean == (0.5, 0.5, 0.5), layout  # preprocess_cfg applied
        for got, ref in zip(_features(model, images, texts), want, strict=True):
            torch.testing.assert_close(got, ref, msg=lambda m, layout=layout: f"{layout}: {m}")


def _tiny_registry_shaped(quick_gelu: bool) -> OpenCLIP:
    """An open_clip model with the shapes of this project's registered "ViT-Tiny/8@32px"."""
    cfg = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        "quick_gelu": quick_gelu,
    }
    return _open_clip_model(cfg, seed=1)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_training_checkpoint_with_arch_name(tmp_path: Path, quick_gelu: bool, one_thread: None) -> None:
    """A bare open_clip training checkpoint (no config anywhere) loads once `arch=` names it."""
    theirs = _tiny_registry_shaped(quick_gelu)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r"arch=") as info:
        clip.load(str(path), device="cpu")
    assert str(path) in str(info.value)
    # The registry's tiny model runs QuickGELU; `quick_gelu=False` states the GELU the weights were trained with.
    model, _ = clip.load(str(path), device="cpu", arch="ViT-Tiny/8@32px", quick_gelu=quick_gelu)
    assert model.config.quick_gelu is quick_gelu
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = [
        clip.tokenize(["a photo of a cat", "a much longer caption about a dog on a beach"], context_length=32)
    ]
    for got, ref in zip(_features(model, images, texts), _features(theirs, images, texts), strict=True):
        torch.testing.assert_close(got, ref)


# --------------------------------------------------------------------------- 3. never a silent guess


def test_bare_state_dict_of_unknown_shape_names_the_fix(tmp_path: Path, one_thread: None) -> None:
    """The issue's case: a head-width-80 ViT used to load with 5 heads instead of 4, silently."""
    theirs = _open_clip_model(_model_cfg("head_width_80"))
    path = tmp_path / "vit_hw80.pt"
    torch.save(theirs.state_dict(), path)
    assert infer_config(theirs.state_dict()).vision.heads == 5  # what a shape guess would build
    for call in (lambda: clip.load(str(path), device="cpu"), lambda: read_checkpoint(path)):
        with pytest.raises(ValueError, match=r"does not record its architecture") as info:
            call()
        message = str(info.value)
        assert str(path) in message and "arch=" in message and "open_clip_config.json" in message
        assert "\n" not in message


def test_vit_h_14_state_dict_needs_arch_and_then_matches_open_clip(
    tmp_path: Path, no_init: None, one_thread: None
) -> None:
    """A real ViT-H-14 state dict (3.9 GB) as meta tensors: the same file layout, with no data."""
    with torch.device("meta"):
        theirs = OpenCLIP(**open_clip.get_model_config("ViT-H-14"))
    path = tmp_path / "vit_h_14.pt"
    torch.save(theirs.state_dict(), path)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"arch=") as info:
        clip.load(str(path), device="cpu")
    assert "ViT-H-14" in str(info.value)
    # Shapes alone would say 20 heads (1280 // 64); OpenCLIP's ViT-H-14 has 16 (head width 80).
    assert infer_config(resolve(path, arch="ViT-H-14").state_dict).vision.heads == 20
    cfg, sd = read_checkpoint(path, arch="ViT-H-14")
    assert cfg == from_open_clip(open_clip_raw_configs()["ViT-H-14"])
    assert (cfg.vision.heads, cfg.text.heads, cfg.quick_gelu) == (16, 16, False)
    ours = model_from_state_dict(cfg, sd)
    assert _structure(ours) == _structure(theirs)
    assert read_checkpoint(path, arch="ViT-H-14-quickgelu")[0].quick_gelu is True


@pytest.mark.parametrize("name", ["ViT-B/32", "RN50"])
def test_openai_shaped_bare_state_dict_needs_quick_gelu(
    name: str, tmp_path: Path, no_init: None, one_thread: None
) -> None:
    """OpenAI's shapes decide the architecture, but not the activation: OpenCLIP trains both on them."""
    with torch.device("meta"):
        model = CLIP(get(name))
    path = tmp_path / "openai_shaped.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"quick_gelu=True or False") as info:
        clip.load(str(path), device="cpu")
    assert name in str(info.value) and str(path) in str(info.value)
    assert resolve(path, quick_gelu=True).config == get(name)
    assert resolve(path, quick_gelu=False).config == get(name).replace(quick_gelu=False)
    # An OpenCLIP name says GELU; OpenAI's colliding RN names say QuickGELU unless told otherwise.
    gelu = from_open_clip(open_clip_raw_configs()[name.replace("/", "-")])
    if name in COLLIDING:
        assert resolve(path, arch=name).config == get(name)
        assert resolve(path, arch=name, quick_gelu=False).config == gelu
    else:
        assert resolve(path, arch=name.replace("/", "-")).config == gelu


# --------------------------------------------------------------------------- `clip models`


def _run_models(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="clip")
    models_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_clip_models_json_lists_every_architecture_with_its_tags(capsys: pytest.CaptureFixture[str]) -> None:
    from clip.pretrained import list_pretrained
    from clip.registry import all_configs

    rows = {r["name"]: r for r in json.loads(_run_models(["--json"], capsys))}
    assert list(rows) == list(all_configs())
    assert rows["ViT-B/32"]["pretrained"] == ["openai"] and rows["ViT-B/32"]["weights"] is True
    assert rows["ViT-H-14"]["pretrained"] == [t for _, t in list_pretrained("ViT-H-14")]
    assert "laion2b_s32b_b79k" in rows["ViT-H-14"]["pretrained"]
    assert rows["RN50"]["pretrained"][0] == "openai" and rows["RN50"]["quick_gelu"] is True
    assert rows["ViT-B-32"]["quick_gelu"] is False and rows["ViT-bigG-14"]["vision"] == "ViT 48x1664 /14"
    assert rows["RN50x4"]["vision"] == "ResNet 4-6-10-6 w80"
    assert (rows["RN50"]["activation"], rows["ViT-B-32"]["activation"]) == ("quick", "gelu")
    assert rows["ViT-B-32"]["sigmoid"] is False
    assert rows["ViT-Tiny/8@32px"]["pretrained"] == []


def test_clip_models_table_stays_aligned(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from clip.registry import all_configs

    monkeypatch.setenv("COLUMNS", "120")
    lines = _run_models([], capsys).splitlines()
    header, body = lines[0], [line for line in lines[1:] if line.strip()]
    px = header.index("px") + 2  # the column's right edge
    names = list(all_configs())
    rows = [line for line in body if not line.startswith(" ")]
    assert [line.split()[0] for line in rows[: len(names)]] == names
    for line in rows[: len(names)]:
        assert line[px - 4 : px].strip().isdigit(), line  # sizes right-aligned under "px"
    tags_at = header.index("pretrained")
    continuation = [line for line in body if line.startswith(" ")]
    assert continuation and all(
        line[:tags_at].strip() == "" and line[tags_at] != " " for line in continuation
    )
    assert max(len(line) for line in lines[: len(names) + len(continuation) + 1]) <= 120
