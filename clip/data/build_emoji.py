"""Build the emoji data files from an npm ``node_modules`` tree (see :mod:`clip.data.emoji` for the format).

Sources, pinned (names and keywords are CLDR's, read from OpenMoji's JSON):

- ``emoji-datasource-google@16.0.0``: ``emoji.json`` (concept list, categories) and ``img/google/64/*.png``
- ``emoji-datasource-twitter@16.0.0``: ``img/twitter/64/*.png``
- ``@lobehub/fluent-emoji-3d@1.1.0``: ``assets/*.webp`` (256 px 3-D renders; the held-out style)
- ``openmoji@17.0.0``: ``data/openmoji.json`` and ``color/svg/*.svg`` (rasterised with cairosvg)

Recipe: codepoint keys are normalised (lower case, ``fe0f`` dropped) before joining sources; skin-tone variants
and the categories Flags and Component are dropped; every image is composited on white and resized to
``size`` x ``size`` (LANCZOS). Files are written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from clip.data import emoji
from clip.io import atomic_path

PACKAGES: dict[str, tuple[str, str]] = {
    "google": ("emoji-datasource-google", "16.0.0"),
    "twitter": ("emoji-datasource-twitter", "16.0.0"),
    "fluent3d": ("@lobehub/fluent-emoji-3d", "1.1.0"),
    "openmoji": ("openmoji", "17.0.0"),
}
EXCLUDED_CATEGORIES = frozenset({"Flags", "Component"})
_SKIN_TONES = frozenset(f"1f3f{c}" for c in "bcdef")


def npm_command() -> str:
    """The npm command that fetches the pinned packages into ``./node_modules``."""
    specs = " ".join(f"{name}@{version}" for name, version in PACKAGES.values())
    return f"npm install --no-save --ignore-scripts {specs}"


def normalize_key(codepoints: str) -> str:
    """'1F468-200D-2764-FE0F' -> '1f468-200d-2764' (the join key between sources)."""
    return "-".join(p for p in codepoints.lower().replace("_", "-").split("-") if p and p != "fe0f")


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What a build wrote: counts, files (path -> bytes) and wall time in seconds."""

    concepts: int
    held_out: int
    images_per_style: dict[str, int]
    files: dict[str, int]
    seconds: float


def check_packages(node_modules: Path, styles: tuple[str, ...]) -> None:
    """Raise FileNotFoundError/ValueError naming the package and the npm command if one is missing or differs."""
    for style in styles:
        name, version = PACKAGES[style]
        pkg_json = node_modules / name / "package.json"
        if not pkg_json.is_file():
            raise FileNotFoundError(
                f"{node_modules} lacks the npm package {name}@{version} ({pkg_json} not found); "
                f"run `{npm_command()}` in its parent folder, or use `clip data build-emoji --npm-install`"
            )
        found = json.loads(pkg_json.read_text(encoding="utf-8")).get("version")
        if found != version:
            raise ValueError(
                f"{node_modules / name} is version {found}, but the data set is pinned to {name}@{version}; "
                f"run `{npm_command()}`"
            )


def read_concepts(node_modules: Path) -> list[dict]:
    """Concept records (sorted by emoji.json's ``sort_order``): key, image file name, name, keywords, category."""
    entries = json.loads((node_modules / PACKAGES["google"][0] / "emoji.json").read_text(encoding="utf-8"))
    openmoji = json.loads((node_modules / "openmoji" / "data" / "openmoji.json").read_text(encoding="utf-8"))
    cldr = {normalize_key(e["hexcode"]): e for e in openmoji}
    concepts = []
    for e in sorted(entries, key=lambda e: e["sort_order"]):
        key = normalize_key(e["unified"])
        # Skin tones live in `skin_variations` (ignored); the set check guards any base entry that carries one.
        if e["category"] in EXCLUDED_CATEGORIES or _SKIN_TONES & set(key.split("-")):
            continue
        om = cldr.get(key)
        if om is not None:
            name, tags = om["annotation"], om.get("tags", "")
            keywords = [t.strip() for t in tags.split(",") if t.strip()]
        else:  # Not in CLDR via OpenMoji: fall back to emoji-data's upper-case name and short names.
            name = e["name"].lower()
            keywords = [s.replace("_", " ") for s in e.get("short_names", [])]
        if any(emoji.KEYWORD_SEP in k for k in keywords):
            raise ValueError(f"keyword of {name!r} contains the separator {emoji.KEYWORD_SEP!r}")
        concepts.append(
            {
                "key": key,
                "image": e["image"],
                "name": name,
                "keywords": keywords,
                "category": e["category"],
                "subcategory": e["subcategory"],
                "has_img": {
                    "google": e.get("has_img_google", True),
                    "twitter": e.get("has_img_twitter", True),
                },
            }
        )
    return concepts


def to_array(image: Image.Image, size: int) -> np.ndarray:
    """An image composited on white, padded to a square and resized: uint8 [size, size, 3]."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    if w != h:
        square = Image.new("RGB", (max(w, h),) * 2, (255, 255, 255))
        square.paste(rgb, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        rgb = square
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _index_files(folder: Path, suffix: str) -> dict[str, Path]:
    """Files in ``folder`` by normalised codepoint key (file names differ in case and FE0F between packages)."""
    return {
        normalize_key(p.name[: -len(suffix)]): p for p in folder.iterdir() if p.name.lower().endswith(suffix)
    }


def _svg_loader(size: int) -> Callable[[Path], Image.Image]:
    try:
        import cairosvg
    except ImportError as err:  # libcairo2 missing raises OSError, handled by the caller's message too
        raise RuntimeError(
            "OpenMoji's SVG art needs cairosvg: pip install 'clipforge[build]' (and Debian's libcairo2), "
            "or build without it (--no-openmoji)"
        ) from err
    # Rasterise at >= 64 px, like the 64 px PNG sources, then resize the same way as the others.
    px = max(size, 64)

    def load(path: Path) -> Image.Image:
        png = cairosvg.svg2png(bytestring=path.read_bytes(), output_width=px, output_height=px)
        return Image.open(io.BytesIO(png))

    return load


def _style_files(node_modules: Path, style: str, concepts: list[dict]) -> list[Path | None]:
    """The source file of each concept in ``style`` (None where the vendor has no art)."""
    root = node_modules / PACKAGES[style][0]
    if style in ("google", "twitter"):
        folder = root / "img" / style / "64"
        paths = [folder / c["image"] if c["has_img"][style] else None for c in concepts]
        return [p if p is not None and p.is_file() else None for p in paths]
    folder, suffix = (root / "assets", ".webp") if style == "fluent3d" else (root / "color" / "svg", ".svg")
    files = _index_files(folder, suffix)
    return [files.get(c["key"]) for c in concepts]


def render_style(
    node_modules: Path, style: str, concepts: list[dict], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [M, size, size, 3] and their concept indices int32 [M] for one style."""
    load = _svg_loader(size) if style == "openmoji" else Image.open
    images, owners = [], []
    for c, path in enumerate(_style_files(node_modules, style, concepts)):
        if path is None:
            continue
        with load(path) as img:
            images.append(to_array(img, size))
        owners.append(c)
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, np.asarray(owners, dtype=np.int32)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Write a compressed .npz atomically; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # the package's one atomic writer (umask-aware mode)
        np.savez_compressed(f, **arrays)
    return path.stat().st_size


def _concept_arrays(concepts: list[dict], size: int) -> dict[str, np.ndarray]:
    keys = [c["key"] for c in concepts]
    names = [c["name"] for c in concepts]
    subs = [c["subcategory"] for c in concepts]
    # The build id ties openmoji.npz to the emoji.npz it was built with (same concepts, same size).
    build_id = hashlib.sha1(json.dumps([keys, names, size]).encode("utf-8")).hexdigest()
    return {
        "codepoints": np.array(keys, dtype=str),
        "names": np.array(names, dtype=str),
        "keywords": np.array([emoji.KEYWORD_SEP.join(c["keywords"]) for c in concepts], dtype=str),
        "categories": np.array([c["category"] for c in concepts], dtype=str),
        "subcategories": np.array(subs, dtype=str),
        "held_out": emoji.compositional_split(keys, names, subs),
        "build_id": np.array(build_id),
    }


def build_emoji(
    node_modules: str | Path,
    output_dir: str | Path | None = None,
    size: int = 32,
    openmoji: bool = True,
) -> BuildReport:
    """Build ``emoji.npz`` (and ``openmoji.npz`` unless ``openmoji=False``) into ``output_dir``.

    ``node_modules`` must hold the four pinned packages (OpenMoji's JSON is needed even without its art).
    """
    start = time.perf_counter()
    if not 8 <= size <= 256:
        raise ValueError(f"--size {size} is out of range; use 8..256 (sources are 64 px, Fluent 256 px)")
    node_modules = Path(node_modules)
    if not node_modules.is_dir():
        raise FileNotFoundError(f"node_modules folder {node_modules} not found; run `{npm_command()}`")
    out = Path(output_dir) if output_dir is not None else emoji.default_root()
    styles = emoji.STYLES if openmoji else tuple(s for s in emoji.STYLES if s != "openmoji")
    check_packages(node_modules, emoji.STYLES)
    if openmoji:
        _svg_loader(size)  # fail before the slow part when cairosvg is missing
    concepts = read_concepts(node_modules)
    meta = _concept_arrays(concepts, size)
    rendered = {s: render_style(node_modules, s, concepts, size) for s in styles}
    main_styles = [s for s in styles if s != "openmoji"]
    main = {
        "images": np.concatenate([rendered[s][0] for s in main_styles]),
        "image_concept": np.concatenate([rendered[s][1] for s in main_styles]),
        "image_style": np.concatenate(
            [np.full(len(rendered[s][1]), emoji.STYLES.index(s), np.int8) for s in main_styles]
        ),
        **meta,
        "style_names": np.array(emoji.STYLES, dtype=str),
        "sources": np.array([f"{n}@{v}" for n, v in PACKAGES.values()], dtype=str),
        "size": np.array(size, dtype=np.int32),
        "format_version": np.array(emoji.FORMAT_VERSION, dtype=np.int32),
    }
    files = {str(out / emoji.MAIN_FILE): _save_npz(out / emoji.MAIN_FILE, main)}
    if openmoji:
        images, owners = rendered["openmoji"]
        om = {
            "images": images,
            "image_concept": owners,
            "image_style": np.full(len(owners), emoji.STYLES.index("openmoji"), np.int8),
            "codepoints": meta["codepoints"],
            "build_id": meta["build_id"],
        }
        files[str(out / emoji.OPENMOJI_FILE)] = _save_npz(out / emoji.OPENMOJI_FILE, om)
    _copy_attribution(out)
    return BuildReport(
        concepts=len(concepts),
        held_out=int(meta["held_out"].sum()),
        images_per_style={s: len(rendered[s][1]) for s in styles},
        files=files,
        seconds=time.perf_counter() - start,
    )


def _copy_attribution(out: Path) -> None:
    """Put the licence/credits file beside data built outside the package folder."""
    src = emoji.default_root() / "ATTRIBUTION.md"
    dst = out / "ATTRIBUTION.md"
    if src.is_file() and src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


def npm_install(folder: str | Path) -> Path:
    """Run the pinned ``npm install`` in ``folder`` and return its ``node_modules`` (needs npm on PATH)."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            f"npm not found on PATH; install Node.js, or run `{npm_command()}` elsewhere and pass --node-modules"
        )
    specs = [f"{name}@{version}" for name, version in PACKAGES.values()]
    cmd = [npm, "install", "--no-save", "--ignore-scripts", "--no-audit", "--no-fund", *specs]
    result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed in {folder}:\n{result.stderr.strip()[-2000:]}")
    return Path(folder) / "node_modules"
