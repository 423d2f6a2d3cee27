"""`clip index --precision` / `Index.open(..., precision=)`: bf16 and int8 folder indexes agree with fp32, the
precision is recorded, an index never mixes vectors of two precisions, and bad values get one clear line."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip import cli
from clip.config import get_config
from clip.model import CLIP
from clip.search.encoder import (
    AGREEMENT_FLOOR,
    AGREEMENT_IMAGES,
    Encoder,
    PrecisionMismatchError,
    check_precision_name,
)
from clip.search.index import Index
from clip.search.store import DB_NAME

N_IMAGES = 12


def make_photos(folder, n, seed=0, start=0):
    """n distinct small photos (random colour blocks, JPEG and PNG); returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((40, 32))
        path = folder / f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        img.save(path, quality=95)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint, a photo folder, and its index at fp32, bf16 and int8."""
    from clip.loading import save_model

    tmp = tmp_path_factory.mktemp("precision")
    torch.manual_seed(0)
    ckpt = str(tmp / "tiny.pt")
    save_model(CLIP(get_config("ViT-Tiny/8@32px")).eval(), ckpt)
    make_photos(tmp / "photos", N_IMAGES)
    for precision in ("fp32", "bf16", "int8"):
        with Index.open(tmp / precision, model=ckpt, precision=precision) as idx:
            report = idx.sync(tmp / "photos", batch_size=5, num_workers=0)
            assert report.added == N_IMAGES
    return tmp, ckpt


def vectors_by_path(idx: Index) -> dict[str, np.ndarray]:
    """Every stored vector [D] of `idx` by path (through the public search API)."""
    hits = idx.search_vectors(torch.ones(1, idx.embed_dim), k=len(idx), ann=False)[0]
    vecs = idx.vectors_of([h.id for h in hits])
    return {h.path: v for h, v in zip(hits, vecs, strict=True)}


def meta(root) -> dict[str, str]:
    """The index manifest (the meta table of IDX/index.sqlite), read directly."""
    with sqlite3.connect(root / DB_NAME) as con:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_vectors_agree_with_fp32(setup, precision):
    tmp, _ = setup
    with Index.open(tmp / "fp32") as ref_idx, Index.open(tmp / precision) as idx:
        ref, ours = vectors_by_path(ref_idx), vectors_by_path(idx)
        assert sorted(ours) == sorted(ref) and len(ours) == N_IMAGES
        a = torch.from_numpy(np.stack([ref[p] for p in sorted(ref)]))
        b = torch.from_numpy(np.stack([ours[p] for p in sorted(ref)]))
        cos = F.cosine_similarity(a, b, dim=-1)
        assert float(cos.min()) >= AGREEMENT_FLOOR, cos
        assert not torch.equal(a, b)  # the low precision really ran (not fp32 again)

        # The manifest records the precision and the agreement measured while indexing.
        m = meta(tmp / precision)
        assert m["precision"] == precision and meta(tmp / "fp32")["precision"] == "fp32"
        agree = json.loads(m["agreement_with_fp32"])
        assert agree == idx.report()["agreement_with_fp32"] and idx.report()["precision"] == precision
        assert agree["precision"] == precision and agree["images"] == min(AGREEMENT_IMAGES, N_IMAGES)
        assert AGREEMENT_FLOOR <= agree["image_cosine_min"] <= agree["image_cosine_mean"] <= 1.0
        # It measures what was stored (up to the float16 rounding of the stored vectors).
        assert agree["image_cosine_min"] >= float(cos.min()) - 2e-3
        assert "agreement_with_fp32" not in meta(tmp / "fp32")

        # Queries go through the same prepared model: an indexed image finds itself first.
        path = sorted(ref)[3]
        assert idx.search_image(path, k=1)[0].path == path


def test_encoder_measures_agreement_only_below_fp32(setup):
    _, ckpt = setup
    pixels = torch.randn(20, 3, 32, 32)
    fp32 = Encoder.load(ckpt)
    fp32.measure_agreement(pixels, fp32.encode_pixels(pixels))
    assert fp32.agreement is None
    enc = Encoder.load(ckpt, precision="int8")
    enc.measure_agreement(pixels[:5], enc.encode_pixels(pixels[:5]))
    assert enc.agreement["images"] == 5
    out = enc.encode_pixels(pixels[5:])
    enc.measure_agreement(pixels[5:], out)  # measured over calls, up to AGREEMENT_IMAGES
    assert enc.agreement["images"] == AGREEMENT_IMAGES and out.shape == (15, enc.embed_dim)
    with torch.no_grad():
        ref = F.normalize(fp32.model.encode_image(pixels[:AGREEMENT_IMAGES]), dim=-1)
    fast = torch.cat([enc.encode_pixels(pixels[:5]), out[: AGREEMENT_IMAGES - 5]])
    cos = F.cosine_similarity(ref, fast, dim=-1)
    assert enc.agreement["image_cosine_min"] == pytest.approx(float(cos.min()), abs=1e-6)
    # The identity names the weights, not the precision (the precision is recorded beside it).
    assert enc.identity == fp32.identity


def test_mismatched_precision_is_refused(setup):
    tmp, ckpt = setup
    for model in (ckpt, None):
        with pytest.raises(PrecisionMismatchError, match="built with --precision int8, not bf16"):
            Index.open(tmp / "int8", model=model, precision="bf16")
    with pytest.raises(PrecisionMismatchError, match="--precision fp32"):
        Index.open(tmp / "fp32", model=Encoder.load(ckpt, precision="int8"))  # an Encoder's own precision
    # Left out, the precision is the index's own: new images are embedded at int8 too.
    with Index.open(tmp / "int8", model=ckpt) as idx:
        assert idx._encoder.precision == "int8"
    with Index.open(tmp / "int8") as idx:
        assert idx.encoder.precision == "int8"  # loaded from the recorded model spec and precision


def test_index_from_before_precisions_counts_as_fp32(tmp_path, setup):
    _, ckpt = setup
    make_photos(tmp_path / "photos", 3)
    with Index.open(tmp_path / "old", model=ckpt) as idx:
        idx.sync(tmp_path / "photos", num_workers=0)
    with sqlite3.connect(tmp_path / "old" / DB_NAME) as con:
        con.execute("DELETE FROM meta WHERE key = 'precision'")
    with pytest.raises(PrecisionMismatchError, match="built with --precision fp32"):
        Index.open(tmp_path / "old", model=ckpt, precision="int8")
    with Index.open(tmp_path / "old", model=ckpt) as idx:
        assert idx.report()["precision"] == "fp32" and idx._encoder.precision == "fp32"


def run_cli(argv):
    return cli.main([str(a) for a in argv])


def test_cli_precision_records_prints_and_refuses(tmp_path, setup, capsys):
    _, ckpt = setup
    photos = tmp_path / "photos"
    make_photos(photos, 6)
    assert run_cli(["index", photos, "--index", tmp_path / "idx", "--model", ckpt, "--precision", "int8",
                    "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "agreement of int8 with fp32" in line]
    assert len(lines) == 1, out
    assert "on the first 6 images: min cosine 0.99" in lines[0] and "warning" not in out
    report = json.loads((tmp_path / "idx" / "report.json").read_text())
    assert report["precision"] == "int8" and report["agreement_with_fp32"]["images"] == 6

    # Another precision: refused with one line naming the flag; nothing embedded.
    make_photos(photos, 2, seed=1, start=6)
    code = run_cli(["index", photos, "--index", tmp_path / "idx", "--precision", "bf16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "built with --precision int8" in err[0] and "leave --precision out" in err[0]
    with Index.open(tmp_path / "idx") as idx:
        assert len(idx) == 6

    # Left out: the index's own precision, the new images embedded at int8 and the agreement printed again.
    assert run_cli(["index", photos, "--index", tmp_path / "idx", "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "embedded 2 new" in out and out.count("agreement of int8 with fp32 on the first 2 images") == 1
    # Nothing new: nothing measured, nothing printed.
    assert run_cli(["index", photos, "--index", tmp_path / "idx", "--no-progress"]) == 0
    assert "agreement" not in capsys.readouterr().out


def test_bad_precision_values_get_one_clear_line(tmp_path, setup, capsys):
    _, ckpt = setup
    make_photos(tmp_path / "photos", 1)
    with pytest.raises(SystemExit) as exc:
        run_cli(
            ["index", tmp_path / "photos", "--index", tmp_path / "i", "--model", ckpt, "--precision", "fp64"]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--precision: invalid choice: 'fp64'" in err and "int8" in err
    assert not (tmp_path / "i").exists()

    with pytest.raises(
        ValueError, match=r"unknown precision 'fp64'; use --precision fp32 / bf16 / fp16 / int8"
    ):
        Index.open(tmp_path / "i", model=ckpt, precision="fp64")
    assert not (tmp_path / "i").exists()  # refused before anything was created
    with pytest.raises(ValueError, match="int8 is a CPU precision; on cuda use bf16 or fp16"):
        check_precision_name("int8", torch.device("cuda"))

    code = run_cli(["index", "--from-embeddings", tmp_path, "--index", tmp_path / "e", "--precision", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--precision is for embedding PHOTOS_DIR" in err[0]


def test_device_defaults_to_auto_like_the_other_commands():
    args = cli.build_parser().parse_args(["index", "photos", "--index", "i"])
    assert args.device == "auto" and args.precision is None
