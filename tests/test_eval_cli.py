"""`clip eval` and `clip classify` end to end on a tiny random checkpoint and tiny local data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_eval_datasets import make_folder, write_cifar10, write_image

import clip.cli
from clip.evaluation.datasets import load_labeled_images
from clip.evaluation.features import EncodeOptions
from clip.evaluation.zeroshot_eval import evaluate_zeroshot
from clip.loading import load
from clip.zeroshot import zero_shot_classifier


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `clip ARGS...` in process with only this file's commands registered -> (exit code, stdout, stderr)."""
    monkeypatch.setattr(clip.cli, "COMMAND_MODULES", ("clip.commands.eval", "clip.commands.classify"))

    def run(*argv):
        code = clip.cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_eval_zeroshot_image_folder(cli, tiny_checkpoint, tmp_path):
    data = make_folder(tmp_path / "imgs")
    out = tmp_path / "res" / "results.json"
    code, stdout, _ = cli(
        "eval",
        "zeroshot",
        "--model",
        tiny_checkpoint,
        "--data",
        data,
        "--output",
        out,
        "--batch-size",
        2,
        "--templates",
        "a photo of a {}.",
        "--no-progress",
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 3 and res["n_skipped"] == 1 and "broken.jpg" in res["skipped"][0]["image"]
    assert res["classnames"] == ["cat", "golden retriever"] and res["n_templates"] == 1
    assert res["top5"] == 1.0  # 2 classes: the true class is always in the top 5
    # The command's numbers are the library's numbers.
    model, preprocess = load(str(tiny_checkpoint), device="cpu")
    dataset = load_labeled_images(data)
    classifier = zero_shot_classifier(model, dataset.classnames, ["a photo of a {}."])
    ref = evaluate_zeroshot(
        model.encode_image, dataset, classifier, preprocess, EncodeOptions(progress=False)
    )
    assert res["top1"] == ref.topk[1] and res["mean_per_class_recall"] == ref.mean_per_class_recall
    png = tmp_path / "res" / "results_confusion.png"
    assert res["confusion_matrix_png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size[0] > 100
    assert "top-1" in stdout and "1 unreadable images skipped" in stdout


def test_eval_zeroshot_cifar_uses_its_templates(cli, tiny_checkpoint, tmp_path):
    write_cifar10(tmp_path / "data")
    out = tmp_path / "cifar.json"
    code, _, _ = cli(
        "eval",
        "zeroshot",
        "--model",
        tiny_checkpoint,
        "--data",
        tmp_path / "data",
        "--output",
        out,
        "--no-progress",
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 6 and res["n_templates"] == 18 and res["n_classes"] == 10
    assert res["per_class_recall"][6:] == [None] * 4  # classes 6..9 have no test images in the tiny archive


def test_eval_zeroshot_csv_with_classnames(cli, tiny_checkpoint, tmp_path):
    make_folder(tmp_path)
    (tmp_path / "names.txt").write_text("dog\ncat\n")
    (tmp_path / "l.csv").write_text("filepath,label\ncat/c.png,1\ngolden_retriever/a.png,0\n")
    code, stdout, _ = cli(
        "eval",
        "zeroshot",
        "--model",
        tiny_checkpoint,
        "--data",
        tmp_path / "l.csv",
        "--classnames",
        tmp_path / "names.txt",
        "--templates",
        "simple",
        "--no-progress",
    )
    assert code == 0 and "2 images, 2 classes, 1 templates, 0 unreadable" in stdout


def test_eval_errors_are_clear(cli, tiny_checkpoint, tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    code, _, err = cli("eval", "zeroshot", "--model", tiny_checkpoint, "--data", tmp_path / "empty")
    assert code == 2 and "holds no images" in err
    data = make_folder(tmp_path / "imgs")
    code, _, err = cli(
        "eval", "zeroshot", "--model", tiny_checkpoint, "--data", data, "--templates", "imagenet80"
    )
    assert code == 2 and "unknown template set 'imagenet80'" in err and "imagenet-7" in err
    code, _, err = cli("eval", "retrieval", "--model", tiny_checkpoint, "--data", tmp_path / "missing.csv")
    assert code == 2 and "no such caption CSV" in err


def test_eval_retrieval(cli, tiny_checkpoint, tmp_path):
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        write_image(tmp_path / name, color)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "pairs.csv").write_text(
        "filepath,caption\na.png,a red square\na.png,something red\nb.png,a green square\n"
        "c.png,a blue square\nbad.png,lost caption\n"
    )
    out = tmp_path / "r.json"
    code, stdout, _ = cli(
        "eval",
        "retrieval",
        "--model",
        tiny_checkpoint,
        "--data",
        tmp_path / "pairs.csv",
        "--output",
        out,
        "--no-progress",
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert (res["n_images"], res["n_captions"], res["n_skipped"]) == (3, 4, 1)
    assert res["image_to_text_R@10"] == 1.0 and res["text_to_image_R@10"] == 1.0  # <= 10 candidates
    assert 1.0 <= res["image_to_text_median_rank"] <= 3.0
    assert "image->text R@1" in stdout


def test_eval_linear_probe(cli, tiny_checkpoint, tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls, base in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            for i in range(n):
                jitter = torch.randint(-20, 20, (3,), generator=g).tolist()
                write_image(tmp_path / split / cls / f"{i}.png", tuple(b + j for b, j in zip(base, jitter)))
    out = tmp_path / "lp.json"
    code, stdout, _ = cli(
        "eval",
        "linear-probe",
        "--model",
        tiny_checkpoint,
        "--train",
        tmp_path / "train",
        "--test",
        tmp_path / "test",
        "--output",
        out,
        "--no-progress",
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n_train"] == 12 and res["n_test"] == 6 and res["n_skipped"] == 0
    assert res["top1"] == 1.0  # red vs blue squares are linearly separable even in random features
    assert len(res["validation_accuracy_by_log10_C"]) >= 7 and "C =" in stdout


def test_classify_text_and_json(cli, tiny_checkpoint, tmp_path):
    write_image(tmp_path / "one.png", (255, 0, 0))
    write_image(tmp_path / "two.png", (0, 0, 255))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    imgs = [tmp_path / "one.png", tmp_path / "bad.jpg", tmp_path / "two.png"]
    code, stdout, _ = cli(
        "classify",
        *imgs,
        "--labels",
        "a dog,a cat,a diagram",
        "--model",
        tiny_checkpoint,
        "--top",
        2,
        "--no-progress",
    )
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].endswith("one.png") and len([ln for ln in lines if ln.startswith("  ")]) == 4
    assert "skipped" in stdout and "1 unreadable image(s) skipped" in stdout
    code, stdout, _ = cli(
        "classify",
        *imgs,
        "--labels",
        "a dog,a cat",
        "--templates",
        "a photo of {}.",
        "--model",
        tiny_checkpoint,
        "--json",
        "--no-progress",
    )
    res = json.loads(stdout)
    assert [r["image"] for r in res["results"]] == [str(imgs[0]), str(imgs[2])]
    probs = [p["probability"] for p in res["results"][0]["predictions"]]
    assert len(probs) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-5) and probs[0] >= probs[1]
    assert res["n_skipped"] == 1 and res["skipped"][0]["image"] == str(imgs[1])


def test_classify_errors(cli, tiny_checkpoint, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    code, _, err = cli("classify", tmp_path / "bad.jpg", "--labels", "a,b", "--model", tiny_checkpoint)
    assert code == 2 and "none of the 1 images could be read" in err
    code, _, err = cli("classify", tmp_path / "bad.jpg", "--labels", " , ", "--model", tiny_checkpoint)
    assert code == 2 and "--labels is empty" in err
