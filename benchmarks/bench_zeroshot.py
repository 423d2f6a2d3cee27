"""Zero-shot classifier construction and zero-shot evaluation throughput: ours vs open_clip, same weights.

1. Classifier: `clip.zeroshot.zero_shot_classifier` vs open_clip's `build_zero_shot_classifier` (its default 10
   classes per batch, `open_clip.tokenize`) on ImageNet's class names x OpenAI's 80 templates, by default all
   1,000 x 80 = 80,000 prompts. Also reports the largest difference between the two classifiers.
2. Evaluation: `clip.evaluation.zeroshot_eval.zeroshot_evaluate` (our preprocessing, encode, top-k) vs
   open_clip's zero-shot loop (`open_clip_train.zero_shot.run`, restated in `open_clip_loop` because its
   `accuracy` helper fails under numpy >= 2.4) with open_clip's torchvision preprocessing, on the same
   in-memory random images and the same classifier; both single-process loading (workers=0), same batch size.

Both models hold the same random weights: ours is built from the config, then loaded into an open_clip
`CLIP` of the same shape. Runs alternate between the implementations so drifting machine load hits both.
Prints JSON lines: one per (bench, impl) and one per bench with `ratio` = open_clip seconds / ours (> 1 means
ours is faster).

    python benchmarks/bench_zeroshot.py                                   # ViT-Tiny/8@32px, 1000 x 80
    python benchmarks/bench_zeroshot.py --model ViT-S/4@32px
    python benchmarks/bench_zeroshot.py --model ViT-B/32 --classes 10 --images 64   # CPU: a slice of ImageNet
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch


def open_clip_twin(model: torch.nn.Module) -> torch.nn.Module:
    """An open_clip CLIP with the same architecture as our ViT `model`, holding its weights (strict load)."""
    import open_clip

    cfg = model.config
    if cfg.vision.kind != "vit":
        raise SystemExit("this benchmark builds open_clip twins of ViT configs only")
    vision = {
        "layers": cfg.vision.layers,
        "width": cfg.vision.width,
        "head_width": cfg.vision.width // cfg.vision.heads,
        "patch_size": cfg.vision.patch_size,
        "image_size": cfg.vision.image_size,
    }
    text = {
        "context_length": cfg.text.context_length,
        "vocab_size": cfg.text.vocab_size,
        "width": cfg.text.width,
        "heads": cfg.text.heads,
        "layers": cfg.text.layers,
    }
    twin = open_clip.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.quick_gelu)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_classifier(ours, theirs, classnames, templates, args, meta):
    import open_clip

    from clip.zeroshot import zero_shot_classifier

    ctx = ours.context_length
    best = {"ours": float("inf"), "open_clip": float("inf")}
    weights = {}
    for _ in range(args.rounds):
        for impl in ("ours", "open_clip"):
            if impl == "ours":
                fn = lambda: zero_shot_classifier(ours, classnames, templates, batch_size=args.text_batch)  # noqa: E731
            else:
                fn = lambda: open_clip.build_zero_shot_classifier(  # noqa: E731
                    theirs, lambda t: open_clip.tokenize(t, context_length=ctx), classnames, templates
                )
            weights[impl], seconds = timed(fn)
            best[impl] = min(best[impl], seconds)
    n_texts = len(classnames) * len(templates)
    line = {
        "bench": "zero_shot_classifier",
        "model": args.model,
        "classes": len(classnames),
        "templates": len(templates),
        "texts": n_texts,
    }
    for impl, seconds in best.items():
        print(
            json.dumps(
                {
                    **line,
                    "impl": impl,
                    "seconds": round(seconds, 3),
                    "texts_per_s": round(n_texts / seconds, 1),
                    **meta,
                }
            ),
            flush=True,
        )
    diff = float((weights["ours"] - weights["open_clip"].float()).abs().max())
    print(
        json.dumps({**line, "ratio": round(best["open_clip"] / best["ours"], 3), "max_abs_diff": diff}),
        flush=True,
    )
    return weights["ours"]


def open_clip_loop(model, classifier, dataloader) -> tuple[float, float]:
    """open_clip_train.zero_shot.run at fp32 on the CPU, with `accuracy` summing via .item() (numpy >= 2.4)."""
    with torch.inference_mode():
        top1, top5, n = 0.0, 0.0, 0.0
        for images, target in dataloader:
            output = model(image=images)
            image_features = output["image_features"] if isinstance(output, dict) else output[0]
            logits = 100.0 * image_features @ classifier
            pred = logits.topk(5, 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            top1 += correct[:1].reshape(-1).float().sum().item()
            top5 += correct[:5].reshape(-1).float().sum().item()
            n += images.size(0)
    return top1 / n, top5 / n


def bench_eval(ours, theirs, classifier, n_classes, args, meta):
    import open_clip
    from PIL import Image

    from clip.evaluation.datasets import LabeledImages
    from clip.evaluation.zeroshot_eval import zeroshot_evaluate
    from clip.preprocess import image_transform

    cfg = ours.config
    size = cfg.vision.image_size
    rng = np.random.default_rng(0)
    side = max(size + size // 4, 36)  # a little larger than the model input: both pipelines resize and crop
    arrays = list(rng.integers(0, 256, (args.images, side, side, 3), dtype=np.uint8))
    labels = rng.integers(0, n_classes, args.images).tolist()
    ours_pre = image_transform(size, cfg.mean, cfg.std)
    their_pre = open_clip.image_transform(size, is_train=False, mean=cfg.mean, std=cfg.std)

    class Arrays(torch.utils.data.Dataset):
        def __len__(self):
            return len(arrays)

        def __getitem__(self, i):
            return their_pre(Image.fromarray(arrays[i])), labels[i]

    loader = torch.utils.data.DataLoader(Arrays(), batch_size=args.image_batch, num_workers=0)
    dataset = LabeledImages(arrays, labels, [str(i) for i in range(n_classes)], "random arrays")
    best = {"ours": float("inf"), "open_clip": float("inf")}
    top1 = {}
    for _ in range(args.rounds):
        for impl in ("ours", "open_clip"):
            if impl == "ours":
                res, seconds = timed(
                    lambda: zeroshot_evaluate(
                        ours.encode_image, dataset, classifier, ours_pre, args.image_batch, progress=False
                    )
                )
                top1[impl] = res.topk[1]
            else:
                (t1, _), seconds = timed(lambda: open_clip_loop(theirs, classifier, loader))
                top1[impl] = t1
            best[impl] = min(best[impl], seconds)
    line = {"bench": "zeroshot_eval", "model": args.model, "images": args.images, "classes": n_classes}
    for impl, seconds in best.items():
        print(
            json.dumps(
                {
                    **line,
                    "impl": impl,
                    "seconds": round(seconds, 3),
                    "top1": round(top1[impl], 4),
                    "images_per_s": round(args.images / seconds, 1),
                    **meta,
                }
            ),
            flush=True,
        )
    print(json.dumps({**line, "ratio": round(best["open_clip"] / best["ours"], 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="ViT-Tiny/8@32px", help="a ViT config name from clip.config.registry()"
    )
    ap.add_argument(
        "--classes", type=int, default=1000, help="first N ImageNet class names (default all 1000)"
    )
    ap.add_argument("--templates", type=int, default=80, help="first N of OpenAI's 80 templates")
    ap.add_argument("--images", type=int, default=512, help="images in the evaluation benchmark")
    ap.add_argument("--text-batch", type=int, default=1024, help="our classifier's texts per batch")
    ap.add_argument("--image-batch", type=int, default=64, help="images per batch, both implementations")
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate ours / open_clip this many times, keep best"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-eval", action="store_true", help="only the classifier benchmark")
    args = ap.parse_args()

    from clip.config import get_config
    from clip.data.templates import classnames, templates
    from clip.model import CLIP

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = CLIP(get_config(args.model)).eval()
    theirs = open_clip_twin(ours)
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine()}
    names = classnames("imagenet")[: args.classes]
    with torch.no_grad():
        classifier = bench_classifier(
            ours, theirs, names, templates("imagenet")[: args.templates], args, meta
        )
    if not args.skip_eval:
        bench_eval(ours, theirs, classifier, len(names), args, meta)


if __name__ == "__main__":
    main()
