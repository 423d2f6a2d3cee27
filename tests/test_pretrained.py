"""clip.pretrained: OpenCLIP's tag table as data, checked against the installed open_clip."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from clip import hub, pretrained
from clip.pretrained import HubFile, PreprocessCfg, PretrainedCfg, UrlFile

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_pretrained", ROOT / "scripts" / "gen_open_clip_pretrained.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_json_is_what_the_generator_makes() -> None:
    # A stale file (open_clip upgraded, or a hand edit) fails here: rerun the script.
    shipped = json.loads(pretrained.DATA_FILE.read_text(encoding="utf-8"))
    assert shipped == _generator().build()


def test_every_open_clip_tag_agrees_with_open_clip() -> None:
    import open_clip

    ours = pretrained.list_pretrained()
    assert ours == open_clip.list_pretrained()
    assert len(ours) == 196 and len({a for a, _ in ours}) == 115
    for arch, tag in ours:
        entry = pretrained.get_pretrained_cfg(arch, tag)
        theirs = open_clip.get_pretrained_cfg(arch, tag)
        assert entry.quick_gelu == theirs.get("quick_gelu", False), (arch, tag)
        assert entry.preprocess.mean == tuple(theirs["mean"]) and entry.preprocess.std == tuple(theirs["std"])
        assert entry.preprocess.interpolation == theirs["interpolation"]
        assert entry.preprocess.resize_mode == theirs["resize_mode"]
        assert (entry.url.url if entry.url else "") == theirs["url"], (arch, tag)
        hub_id = f"{entry.hf_hub.repo}/{entry.hf_hub.filename}" if entry.hf_hub else ""
        assert hub_id in (theirs["hf_hub"], theirs["hf_hub"] + "open_clip_pytorch_model.bin"), (arch, tag)
        assert entry.preprocess.size == open_clip.get_model_config(arch)["vision_cfg"]["image_size"]


@pytest.mark.parametrize("arch", ["RN50", "ViT-B-32-256"])
def test_size_is_the_built_model_size(arch: str) -> None:
    """OpenCLIP's final preprocess size is its vision tower's image size; build two small ones to see it."""
    import open_clip

    model = open_clip.create_model(arch, device="meta")
    size = model.visual.preprocess_cfg["size"]
    size = size[0] if isinstance(size, tuple) else size
    for a, tag in pretrained.list_pretrained(arch):
        assert pretrained.get_pretrained_cfg(a, tag).preprocess.size == size


def test_known_entries_spelled_out() -> None:
    entry = pretrained.get_pretrained_cfg("ViT-H-14", "laion2b_s32b_b79k")
    assert entry == PretrainedCfg(
        arch="ViT-H-14",
        tag="laion2b_s32b_b79k",
        hf_hub=HubFile("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin"),
        url=None,
        quick_gelu=False,
        preprocess=PreprocessCfg(224),
    )
    assert entry.name == "ViT-H-14/laion2b_s32b_b79k"
    siglip = pretrained.get_pretrained_cfg("ViT-B-16-SigLIP-384", "webli")
    assert siglip.preprocess == PreprocessCfg(384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", "squash")
    clipa = pretrained.get_pretrained_cfg("ViT-L-14-CLIPA-336", "datacomp1b")
    assert clipa.preprocess == PreprocessCfg(
        336, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", "squash"
    )
    release = pretrained.get_pretrained_cfg("RN50", "yfcc15m")
    assert release.url == UrlFile(
        "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/rn50-quickgelu-yfcc15m-455df137.pt",
        "rn50-quickgelu-yfcc15m-455df137.pt",
        "455df137",
    )
    assert release.quick_gelu and pretrained.get_pretrained_cfg("RN50-quickgelu", "yfcc15m").quick_gelu
    # OpenAI's tags publish the same digests as clip.hub's own table, under the same file names.
    for file in hub.OPENAI_MODELS:
        arch = file.name.replace("/", "-").replace("@336px", "-336")
        url = pretrained.get_pretrained_cfg(arch, "openai").url
        assert (url.filename, url.sha256) == (file.filename, file.sha256)
        assert url.url.endswith(f"/{file.sha256}/{file.filename}")


def test_tags_normalise_and_names_parse() -> None:
    assert pretrained.get_pretrained_cfg("ViT-H-14", "LAION2B-S32B-B79K").tag == "laion2b_s32b_b79k"
    assert pretrained.parse_pretrained_name("ViT-H-14/laion2b_s32b_b79k") == ("ViT-H-14", "laion2b_s32b_b79k")
    assert pretrained.parse_pretrained_name("ViT-B-32:LAION2B-S34B-B79K") == ("ViT-B-32", "laion2b_s34b_b79k")
    for plain in ("ViT-B/32", "ViT-L/14@336px", "RN50", "/tmp/weights.pt", "ViT-H-14/nope", ""):
        assert pretrained.parse_pretrained_name(plain) is None, plain
    tags = pretrained.list_pretrained("ViT-H-14")
    assert (
        tags[0] == ("ViT-H-14", "laion2b_s32b_b79k")
        and {a for a, _ in tags} == {"ViT-H-14"}
        and len(tags) == 4
    )
    assert pretrained.list_pretrained("nope") == []


def test_unknown_names_list_what_exists() -> None:
    with pytest.raises(
        ValueError, match="ViT-B-32 has no pretrained tag 'laion5b'; its tags: openai, laion400m_e31"
    ):
        pretrained.get_pretrained_cfg("ViT-B-32", "laion5b")
    with pytest.raises(ValueError, match="architecture 'ViT-H-41'.*close names: ViT-H-14"):
        pretrained.get_pretrained_cfg("ViT-H-41", "laion2b_s32b_b79k")


def test_dataclasses_round_trip_and_validate() -> None:
    for arch, tag in pretrained.list_pretrained()[::17]:
        entry = pretrained.get_pretrained_cfg(arch, tag)
        assert PretrainedCfg.from_dict(json.loads(json.dumps(entry.to_dict()))) == entry
    with pytest.raises(ValueError, match="unknown preprocess keys \\['sise'\\]"):
        PreprocessCfg.from_dict({"sise": 224})
    with pytest.raises(ValueError, match="interpolation 'nearest'"):
        PreprocessCfg(interpolation="nearest")
    with pytest.raises(ValueError, match="resize_mode 'crop'"):
        PreprocessCfg(resize_mode="crop")
    with pytest.raises(ValueError, match="3 values"):
        PreprocessCfg(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="sha256 of u must be"):
        UrlFile("u", "f", "XYZ")
