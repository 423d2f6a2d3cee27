"""`clip demo`: the main job on its embedded default (train on emoji art, evaluate zero-shot)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small CLIP on the bundled emoji art and evaluate it zero-shot",
        description="Trains on Noto, Twemoji and OpenMoji art of the seen concepts, then scores zero-shot "
        "the held-out Fluent 3D style, the held-out concepts, and both. Writes report.md, results.json, "
        "curves.png, examples.png, retrieval.png and checkpoints/latest.pt into OUT. Its length is planned for "
        "what this machine does idle and kept on a busy machine, which then takes longer and says why.",
    )
    p.add_argument("--output-dir", default="demo-out", help="OUT folder (default: demo-out)")
    p.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="budget for the whole run on this machine idle (default 10); a busy machine takes longer "
        "with the same number of steps unless --strict-time",
    )
    p.add_argument(
        "--strict-time",
        action="store_true",
        help="stop training at the budget even when the machine is busy (fewer steps: lower scores)",
    )
    p.add_argument(
        "--timing-cache",
        metavar="PATH",
        help="JSON file where this machine's idle step timing is remembered, so a run on a busy machine plans "
        "the idle length (default: ~/.cache/clipforge/demo-timing.json; 'none': do not remember)",
    )
    p.add_argument("--steps", type=int, help="train exactly this many steps instead of filling the budget")
    p.add_argument("--batch-size", type=int, help="samples per step (default: the demo's, 128)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the demo's, 5e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=0, help="DataLoader processes (0: load in the main process)"
    )
    p.add_argument(
        "--model-config",
        help="JSON model config to train instead (a CLIPConfig or openai/CLIP constructor arguments)",
    )
    p.add_argument("--max-concepts", type=int, help="train and evaluate on a random slice of concepts")
    p.add_argument("--no-openmoji", action="store_true", help="train on Noto and Twemoji only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clip.demo import DEMO_MODEL, DemoConfig, print_summary, run_demo
    from clip.train.build import load_model_config

    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    if args.strict_time and args.steps is not None:
        raise ValueError(
            "--strict-time bounds a planned run; --steps fixes its length instead: pass one of them"
        )
    tuned = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    cfg = DemoConfig(
        output_dir=args.output_dir, minutes=args.minutes, steps=args.steps, seed=args.seed,
        workers=args.workers, openmoji=not args.no_openmoji,
        model=load_model_config(args.model_config) if args.model_config else DEMO_MODEL,
        max_concepts=args.max_concepts, strict_time=args.strict_time,
        timing_cache="" if args.timing_cache == "none" else args.timing_cache, **tuned,
    )  # fmt: skip
    print_summary(run_demo(cfg))
    return 0
