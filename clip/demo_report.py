"""The demo's evaluation and report text: zero-shot cells, a per-category breakdown, text-to-image retrieval,
and report.md. No drawing here (that is `clip.demo_plots`, which imports this module, never the reverse)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip.config import VisionConfig
from clip.data.emoji import CELLS, EmojiCell, EmojiData
from clip.data.emoji_train import eval_images
from clip.evaluation.metrics import class_ranks, topk_accuracy
from clip.model import CLIP
from clip.zeroshot import zero_shot_classifier

CELL_TITLES = {
    "style": "held-out style (Fluent 3D), seen concepts",
    "concept": "held-out concepts, training styles",
    "both": "held-out concepts in the held-out style",
}
# Unicode's order of the emoji categories (Flags and Component are not in the data set).
CATEGORY_ORDER = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                  "Activities", "Objects", "Symbols")  # fmt: skip
_PREFIX = "an emoji of "


@dataclass(frozen=True, eq=False)
class CellScores:
    """One zero-shot cell scored: unit image features [M, D], class text features [D, K], cosine logits [M, K]
    and labels [M] (positions in `cell.class_concepts`)."""

    cell: EmojiCell
    image_features: torch.Tensor
    class_features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def score_cells(model: CLIP, data: EmojiData) -> dict[str, CellScores]:
    """Every non-empty zero-shot cell, encoded once (the report, the grids and retrieval all reuse it)."""
    out = {}
    for kind in CELLS:
        cell = data.cell(kind)
        if len(cell.indices) == 0:
            continue
        classifier = zero_shot_classifier(model, cell.captions, ["{}"], batch_size=512)  # [D, K]
        feats = torch.cat([model.encode_image(x) for x in eval_images(data, cell.indices).split(512)])
        feats = F.normalize(feats, dim=-1)
        out[kind] = CellScores(cell, feats, classifier, feats @ classifier, torch.as_tensor(cell.labels))
    return out


def evaluate_cells(scores: dict[str, CellScores]) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 accuracy and chance levels per cell."""
    out = {}
    for kind, s in scores.items():
        acc = topk_accuracy(s.logits, s.labels, ks=(1, 5))
        k = s.logits.shape[1]
        out[kind] = {
            "top1": round(acc[1], 4), "top5": round(acc[5], 4), "classes": k, "images": len(s.labels),
            "chance_top1": round(1 / k, 5), "chance_top5": round(min(5, k) / k, 5),
        }  # fmt: skip
    return out


def category_breakdown(
    scores: dict[str, CellScores], data: EmojiData
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per cell, per emoji category (in Unicode's order): top-1 accuracy and the number of images.

    Classes stay the whole cell's (a "food" image may be mistaken for any concept), only images are grouped.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, s in scores.items():
        correct = (class_ranks(s.logits, s.labels) == 1).numpy()
        cats = data.categories[data.image_concept[s.cell.indices]]
        present = set(cats.tolist())
        order = [c for c in CATEGORY_ORDER if c in present] + sorted(present - set(CATEGORY_ORDER))
        out[kind] = {c: {"top1": round(float(correct[cats == c].mean()), 4), "images": int((cats == c).sum())}
                     for c in order}  # fmt: skip
    return out


@dataclass(frozen=True)
class RetrievalExample:
    """One text query: the concept's caption and its top-k pool images (data rows), which of them are true."""

    concept: int
    caption: str
    category: str
    rows: tuple[int, ...]
    true: tuple[bool, ...]
    first_true_rank: int  # 1-based rank of the best-placed true image in the whole pool
    best_true_row: int  # that image's data row


@torch.no_grad()
def retrieval(
    data: EmojiData,
    scores: dict[str, CellScores],
    n_examples: int = 6,
    k: int = 5,
    seed: int = 0,
) -> tuple[dict[str, Any], list[RetrievalExample]] | None:
    """Text -> image retrieval over the held-out pool: every image of a held-out concept, in every style.

    Each held-out concept's canonical caption is a query; its true images are that concept's images (2-4
    styles). Returns (metrics: recall@1/5/10 = a true image in the top k, the pool and query counts; examples:
    `n_examples` queries from distinct categories, seeded), or None when the slice holds no held-out concept.
    """
    parts = [scores[k_] for k_ in ("concept", "both") if k_ in scores]
    if not parts:
        return None
    rows = np.concatenate([p.cell.indices for p in parts])
    feats = torch.cat([p.image_features for p in parts])  # [P, D]
    concepts = parts[0].cell.class_concepts  # the held-out concepts (the same classes in both cells)
    text = parts[0].class_features  # [D, Q]
    sim = text.T @ feats.T  # [Q, P]
    truth = torch.as_tensor(data.image_concept[rows][None, :] == concepts[:, None])  # [Q, P]
    # Rank of the best true image, ties with false images counted against it (as clip.evaluation ranks).
    best_true, best_j = sim.masked_fill(~truth, float("-inf")).max(dim=1)  # [Q], [Q]
    first = 1 + ((sim >= best_true[:, None]) & ~truth).sum(dim=1)  # [Q]; other true images never count
    metrics: dict[str, Any] = {
        f"recall@{r}": round(float((first <= r).float().mean()), 4) for r in (1, 5, 10)
    }
    # Chance of a true image in the top 5 for a random ranking, averaged over the queries.
    n_true, n_pool = truth.sum(dim=1).double(), len(rows)
    miss = torch.ones_like(n_true)
    for j in range(5):
        miss *= (n_pool - n_true - j).clamp(min=0) / (n_pool - j)
    metrics.update(
        queries=len(concepts), pool_images=n_pool, chance_recall_at_5=round(float(1 - miss.mean()), 4)
    )
    order = sim.argsort(dim=1, descending=True)
    examples = []
    for q in _pick_queries(data, concepts, n_examples, seed):
        top = order[q, :k].tolist()
        examples.append(RetrievalExample(
            int(concepts[q]), str(parts[0].cell.captions[q]), str(data.categories[concepts[q]]),
            tuple(int(rows[j]) for j in top), tuple(bool(truth[q, j]) for j in top), int(first[q]),
            int(rows[int(best_j[q])]),
        ))  # fmt: skip
    return metrics, examples


def _pick_queries(data: EmojiData, concepts: np.ndarray, n: int, seed: int) -> list[int]:
    """Up to `n` query positions, one per category first (seeded), so the examples show variety."""
    rng = np.random.default_rng(seed)
    cats = data.categories[concepts]
    firsts, rest = [], []
    for c in [c for c in CATEGORY_ORDER if c in set(cats.tolist())] + sorted(
        set(cats.tolist()) - set(CATEGORY_ORDER)
    ):
        members = rng.permutation(np.flatnonzero(cats == c)).tolist()
        firsts.append(members[0])
        rest.extend(members[1:])
    picks = rng.permutation(firsts).tolist()[:n]
    picks += rng.permutation(rest).tolist()[: n - len(picks)]
    return [int(p) for p in picks]


def example_dict(data: EmojiData, ex: RetrievalExample) -> dict[str, Any]:
    """A retrieval example for results.json: the query and its top images (concept name, style, true)."""
    return {
        "caption": ex.caption, "category": ex.category, "first_true_rank": ex.first_true_rank,
        "top": [{"name": str(data.names[data.image_concept[r]]), "style": data.style_names[int(data.image_style[r])],
                 "true": t} for r, t in zip(ex.rows, ex.true, strict=True)],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- text


def results_table(results: dict[str, Any]) -> str:
    lines = [
        "| zero-shot cell | classes | images | top-1 | top-5 | chance top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in results["cells"].items():
        lines.append(
            f"| {CELL_TITLES[kind]} | {r['classes']} | {r['images']} | {100 * r['top1']:.1f}% | "
            f"{100 * r['top5']:.1f}% | {100 * r['chance_top1']:.2f}% |"
        )
    return "\n".join(lines)


def category_table(by_category: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one row per category, one column per cell, "top-1 (images)"."""
    kinds = list(by_category)
    cats = list(dict.fromkeys(c for k in kinds for c in by_category[k]))
    lines = ["| category | " + " | ".join(f"{k}: top-1 (images)" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]  # fmt: skip
    for c in cats:
        cells = [by_category[k].get(c) for k in kinds]
        lines.append(f"| {c} | " + " | ".join(f"{100 * x['top1']:.1f}% ({x['images']})" if x else "-" for x in cells)
                     + " |")  # fmt: skip
    return "\n".join(lines)


def retrieval_text(ret: dict[str, Any]) -> str:
    m = ret["metrics"]
    lines = [
        f"Each of the {m['queries']} held-out concepts' captions searched the {m['pool_images']:,} images of "
        f"held-out concepts (all styles, the 3-D one included): a true image came first for "
        f"{100 * m['recall@1']:.1f}% of the captions, in the top 5 for {100 * m['recall@5']:.1f}% "
        f"(chance {100 * m['chance_recall_at_5']:.1f}%), in the top 10 for {100 * m['recall@10']:.1f}%.",
        "",
        "| caption | category | top 5 (true ones in bold) | best true rank |",
        "|---|---|---|---|",
    ]
    for ex in ret["examples"]:
        tops = ", ".join(f"**{t['name']}** ({t['style']})" if t["true"] else f"{t['name']} ({t['style']})"
                         for t in ex["top"])  # fmt: skip
        lines.append(
            f"| {ex['caption'].removeprefix(_PREFIX)} | {ex['category']} | {tops} | {ex['first_true_rank']} |"
        )
    return "\n".join(lines)


def report_markdown(results: dict[str, Any]) -> str:
    """report.md from results.json's content."""
    pace = results.get("pace", {})
    used = pace.get("threads_used", {}).items()
    threads = ", ".join(f"{n:,} steps on {t} thread{'' if t == '1' else 's'}" for t, n in used) or "unknown"
    parts = [
        "# CLIP on emoji art: zero-shot report",
        f"A CLIP ({describe_model(results['model'])}) trained for {results['steps']:,} steps of "
        f"{results['batch_size']} pairs ({results['samples_seen']:,} samples, {results['train_images']:,} images "
        f"of {results['train_concepts']:,} concepts in the training styles) in {results['train_seconds']:.0f} s "
        f"({threads}), then evaluated zero-shot on what it never saw.",
        results_table(results),
    ]
    if pace.get("lines"):
        parts += ["## The machine", "\n".join(f"- {line}" for line in pace["lines"])]
    if results.get("by_category"):
        parts += ["## By category",
                  "Top-1 per emoji category (each cell's images grouped by their concept's category; the classes "
                  "stay the whole cell's).", category_table(results["by_category"])]  # fmt: skip
    parts += ["## Training curves", "![training curves](curves.png)",
              "## Examples", "Held-out images with their top-3 captions (green: right first, orange: right at "
              "rank 2-3, red: missed).", "![examples: held-out images with their top-3 captions](examples.png)"]  # fmt: skip
    if results.get("retrieval"):
        parts += ["## Text to image", retrieval_text(results["retrieval"]),
                  "![retrieval: captions with their top-5 images, true ones framed in green](retrieval.png)"]  # fmt: skip
    parts.append("Weights: `checkpoints/latest.pt` (readable by `clip.load`, `clip classify`, `clip eval`).")
    return "\n\n".join(parts) + "\n"


def describe_model(model: dict[str, Any]) -> str:
    v, t = model["vision"], model["text"]
    tower = f"ViT {v['layers']}x{v['width']}, patch {v['patch_size']}" if v["kind"] == "vit" else "ResNet"
    if v.get("conv_stem"):
        tower += " from early convolutions " + "-".join(str(c) for c in v["conv_stem"])
    clips_ratio = VisionConfig.mlp_ratio  # the config's default, CLIP's 4: say only when the run differs
    if v["kind"] == "vit" and v.get("mlp_ratio", clips_ratio) != clips_ratio:
        tower += f", MLP {int(v['width'] * v['mlp_ratio'])}"
    return (
        f"{tower} at {v['image_size']} px; text {t['layers']}x{t['width']}; {model['embed_dim']}-d embedding"
    )
