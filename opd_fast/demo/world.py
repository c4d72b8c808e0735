"""The demo's miniature world: 16x16 RGB images, three tasks mirroring the paper's, their prompts and rewards.

An image is a (3, 16, 16) float tensor in [-1, 1]; the demo's transformer generates it directly (the "latent" is the
image itself: no VAE). Rewards take images in that layout and return one float in [0, 1] per image.

- composition (GenEval-like): "two red blocks on the left" -> a rule-based detector finds coloured blobs; the score
  averages three checks as GenEval averages its sub-tasks: the named colour dominates, the count is right, every
  blob of that colour lies in the named half.
- glyph (OCR-like): 'a sign saying "t"' -> template matching against a 5x5 bitmap font (scaled 2x): the score is the
  correlation with the named glyph when that glyph is the best match over all glyphs and small shifts, else 0.
- aesthetic (PickScore-like, continuous): "a calm sunset" -> colour harmony with the scene's palette (sky above the
  horizon, ground below) times nothing else: averaged with smoothness (no horizontal speckle).

Pretraining renders (`render_pretraining`) come with noisy captions: each attribute word of the caption is replaced
by a random one with probability `caption_noise`, as web alt-text misdescribes images. A model trained on them draws
plausible images of the right kind but follows the attributes only loosely: weak at every task, as a base should be.
"""

from __future__ import annotations

import numpy as np
import torch

SIZE = 16
TASKS = ("composition", "glyph", "aesthetic")

# -- vocabulary ----------------------------------------------------------------------------------------------------
COLORS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
COUNTS = {"one": 1, "two": 2, "three": 3}
SIDES = ("left", "right", "top", "bottom")
# 3x3 bitmap font, drawn 4x (12x12 pixels): coarse enough for a tiny model to draw, distinct enough to read.
# No "a" or "i", which the word-level text encoder could not tell from the article / pronoun.
FONT = {
    "c": ["###", "#..", "###"],
    "h": ["#.#", "###", "#.#"],
    "l": ["#..", "#..", "###"],
    "o": ["###", "#.#", "###"],
    "t": ["###", ".#.", ".#."],
    "u": ["#.#", "#.#", "###"],
    "x": ["#.#", ".#.", "#.#"],
    "z": ["##.", ".#.", ".##"],
}
GLYPH_SCALE = 4
SIGN_WORDS = ("sign saying", "poster reading")
SCENES = {  # (sky, ground) colours
    "sunset": ((0.95, 0.55, 0.2), (0.35, 0.1, 0.3)),
    "ocean": ((0.55, 0.8, 0.95), (0.05, 0.25, 0.6)),
    "forest": ((0.7, 0.85, 0.7), (0.1, 0.4, 0.15)),
    "desert": ((0.95, 0.85, 0.55), (0.8, 0.5, 0.2)),
    "night": ((0.05, 0.05, 0.25), (0.25, 0.25, 0.4)),
    "snow": ((0.6, 0.7, 0.9), (0.95, 0.95, 0.98)),
}
MOODS = ("calm", "quiet", "soft")
HORIZON = 10  # first ground row of the ideal scene

BLOCK, BLOCK_WIDTH = 4, 6  # composition blocks, pixels along / across their half: small blocks carry too little of
# the distillation loss next to the other tasks' whole-image changes, and the student learns them last
BACKGROUND = (0.1, 0.1, 0.12)
PANEL = (0.15, 0.15, 0.22)
INK = (0.75, 0.75, 0.75)
GLYPH_OFFSET = 2  # the 12x12 glyph sits at rows/cols 2..13


# -- prompts -------------------------------------------------------------------------------------------------------
def task_prompts(task: str) -> list[dict]:
    """Every prompt of a task with the attributes its reward checks: {"prompt": str, **attributes}."""
    if task == "composition":
        return [
            {"prompt": f"{n} {c} blocks on the {s}", "count": COUNTS[n], "color": c, "side": s}
            for n in COUNTS
            for c in COLORS
            for s in SIDES
        ]
    if task == "glyph":
        return [{"prompt": f'a {w} "{g}"', "glyph": g} for w in SIGN_WORDS for g in FONT]
    if task == "aesthetic":
        return [{"prompt": f"a {m} {s}", "scene": s} for s in SCENES for m in MOODS]
    raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)})")


# -- rendering -----------------------------------------------------------------------------------------------------
def _canvas(color) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, dtype=np.float32), (SIZE, SIZE, 3)).copy()


def _slots(side: str) -> list[tuple[int, int, int, int]]:
    """The three block rectangles (row, col, height, width) of a half: in a row along it, BLOCK long and
    BLOCK_WIDTH across, on the patch grid."""
    if side in ("left", "right"):
        x = 0 if side == "left" else SIZE - BLOCK_WIDTH
        return [(y, x, BLOCK, BLOCK_WIDTH) for y in (0, 6, 12)]
    y = 0 if side == "top" else SIZE - BLOCK_WIDTH
    return [(y, x, BLOCK_WIDTH, BLOCK) for x in (0, 6, 12)]


def render_composition(count: int, color: str, side: str, rng: np.random.Generator) -> np.ndarray:
    """`count` blocks of `color` in `count` of the named half's three slots, on a dark background. Few layouts per
    prompt: a tiny model renders them cleanly in few sampling steps, and the detector does not depend on them."""
    img = _canvas(BACKGROUND)
    slots = _slots(side)
    for k in sorted(rng.permutation(len(slots))[:count]):
        y, x, h, w = slots[k]
        img[y : y + h, x : x + w] = COLORS[color]
    return img


def glyph_mask(glyph: str, dy: int = 0, dx: int = 0) -> np.ndarray:
    """(16, 16) bool: the glyph drawn GLYPH_SCALE x at the centre, shifted by (dy, dx)."""
    bits = np.array([[ch == "#" for ch in row] for row in FONT[glyph]])
    big = bits.repeat(GLYPH_SCALE, 0).repeat(GLYPH_SCALE, 1)
    mask = np.zeros((SIZE, SIZE), bool)
    y, x = GLYPH_OFFSET + dy, GLYPH_OFFSET + dx
    mask[y : y + big.shape[0], x : x + big.shape[1]] = big
    return mask


def render_glyph(glyph: str, dy: int = 0, dx: int = 0, ink=INK, panel=PANEL) -> np.ndarray:
    img = _canvas(panel)
    img[glyph_mask(glyph, dy, dx)] = ink
    return img


def render_scene(scene: str, horizon: int = HORIZON, gradient: float = 0.06) -> np.ndarray:
    """Sky above the horizon, ground below, each with a gentle vertical gradient: the aesthetic task's ideal."""
    sky, ground = (np.asarray(c, np.float32) for c in SCENES[scene])
    img = np.empty((SIZE, SIZE, 3), np.float32)
    for row in range(SIZE):
        base, t = (sky, row / max(horizon - 1, 1)) if row < horizon else (ground, (row - horizon) / SIZE)
        img[row] = np.clip(base + gradient * (t - 0.5), 0, 1)
    return img


def render_perfect(task: str, row: dict, rng: np.random.Generator) -> np.ndarray:
    """An image that satisfies the prompt `row` exactly (HWC in [0, 1]): what the reward tests hold up."""
    if task == "composition":
        return render_composition(row["count"], row["color"], row["side"], rng)
    if task == "glyph":
        return render_glyph(row["glyph"])
    return render_scene(row["scene"])


def render_pretraining(task: str, rng: np.random.Generator, caption_noise: float) -> tuple[np.ndarray, str]:
    """One generic render of `task`'s kind with a noisy caption: (HWC image in [0, 1], caption)."""

    def maybe(true_value, choices):
        return choices[rng.integers(len(choices))] if rng.random() < caption_noise else true_value

    if task == "composition":
        n, c, s = (list(COUNTS)[rng.integers(3)], list(COLORS)[rng.integers(4)], SIDES[rng.integers(4)])
        img = render_composition(COUNTS[n], c, s, rng)
        caption = f"{maybe(n, list(COUNTS))} {maybe(c, list(COLORS))} blocks on the {maybe(s, SIDES)}"
    elif task == "glyph":
        g = list(FONT)[rng.integers(len(FONT))]
        shade = rng.uniform(0.6, 0.85)
        img = render_glyph(g, ink=(shade,) * 3, panel=tuple(rng.uniform(0.05, 0.3, 3)))
        caption = f'a {SIGN_WORDS[rng.integers(2)]} "{maybe(g, list(FONT))}"'
    else:
        s = list(SCENES)[rng.integers(len(SCENES))]
        img = render_scene(s, horizon=2 * int(rng.integers(3, 7)), gradient=rng.uniform(0, 0.2))
        if rng.random() < 0.5:  # clutter: a few random patches, as generic photos are not composed
            for _ in range(rng.integers(1, 4)):
                y, x = 2 * rng.integers(0, SIZE // 2, 2)
                img[y : y + 2, x : x + 2] = rng.uniform(0, 1, 3)
        img = img + rng.normal(0, rng.uniform(0, 0.12), img.shape).astype(np.float32)
        caption = f"a {MOODS[rng.integers(3)]} {maybe(s, list(SCENES))}"
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)  # sensor noise on every render
    return np.clip(img, 0, 1), caption


def to_model(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) in [-1, 1], the demo model's state space."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1], clipped."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


# -- rewards -------------------------------------------------------------------------------------------------------
_PALETTE = np.array(list(COLORS.values()), np.float32)  # (4, 3)
_SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # a reader tolerates a glyph off by a pixel


def _standardize(a: np.ndarray) -> np.ndarray:
    """Rows of `a` shifted to mean 0 and scaled to norm 1 (all-constant rows stay 0), so dot products are
    correlations."""
    a = a - a.mean(-1, keepdims=True)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.where(norm > 1e-8, a / np.maximum(norm, 1e-8), 0.0)


_TEMPLATES = _standardize(np.array([[glyph_mask(g, dy, dx).ravel() for dy, dx in _SHIFTS] for g in FONT], np.float32))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a (16, 16) bool mask, each as an (n, 2) array of (row, col)."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < SIZE and 0 <= nx < SIZE and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(pixels))
    return found


def detect_blocks(img: np.ndarray, min_pixels: int = 4) -> list[tuple[str, float, float]]:
    """Coloured blobs of an HWC [0, 1] image as (colour name, centre row, centre col): saturated pixels take the
    nearest palette colour; 4-connected runs of one colour with at least `min_pixels` pixels are objects."""
    saturated = img.max(-1) - img.min(-1) > 0.3
    distance = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 4)
    label = np.where(saturated & (distance.min(-1) < 0.35), distance.argmin(-1), -1)
    blobs = []
    for k, name in enumerate(COLORS):
        for pixels in _components(label == k):
            if len(pixels) >= min_pixels:
                blobs.append((name, float(pixels[:, 0].mean()), float(pixels[:, 1].mean())))
    return blobs


def _in_half(row: float, col: float, side: str) -> bool:
    mid = (SIZE - 1) / 2
    return {"left": col < mid, "right": col > mid, "top": row < mid, "bottom": row > mid}[side]


def composition_reward(img: np.ndarray, count: int, color: str, side: str) -> float:
    blobs = detect_blocks(img)
    mine = [b for b in blobs if b[0] == color]
    if not mine:
        return 0.0
    color_ok = len(mine) >= len(blobs) - len(mine)
    count_ok = len(mine) == count
    side_ok = all(_in_half(r, c, side) for _, r, c in mine)
    return (color_ok + count_ok + side_ok) / 3


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


def read_glyph(img: np.ndarray) -> tuple[str, dict[str, float]]:
    """Template OCR: each glyph's best correlation (over small shifts) with the image's luminance."""
    luma = _standardize(_luma(img).ravel()[None])[0]
    best = (_TEMPLATES @ luma).max(-1)  # (glyphs,)
    scores = {g: float(v) for g, v in zip(FONT, best)}
    return max(scores, key=scores.get), scores


def glyph_reward(img: np.ndarray, glyph: str) -> float:
    recognised, scores = read_glyph(img)
    return max(scores[glyph], 0.0) if recognised == glyph else 0.0


def aesthetic_reward(img: np.ndarray, scene: str) -> float:
    """Average of colour harmony (closeness to the scene's sky-over-ground palette) and smoothness (horizontal
    speckle: the ideal scene is uniform along each row)."""
    sky, ground = (np.asarray(c, np.float32) for c in SCENES[scene])
    target = np.where((np.arange(SIZE) < HORIZON)[:, None, None], sky, ground)
    harmony = float(np.exp(-np.mean(np.sum((img - target) ** 2, -1)) / 0.05))
    speckle = float(np.mean(np.abs(np.diff(img, axis=1))))
    smoothness = float(np.exp(-speckle / 0.03))
    return (harmony + smoothness) / 2


def reward(task: str, img: np.ndarray, row: dict) -> float:
    """The task's score of one HWC [0, 1] image for the prompt `row` (from task_prompts)."""
    if task == "composition":
        return composition_reward(img, row["count"], row["color"], row["side"])
    if task == "glyph":
        return glyph_reward(img, row["glyph"])
    if task == "aesthetic":
        return aesthetic_reward(img, row["scene"])
    raise ValueError(f"unknown task {task!r}")


def rewards(task: str, x: torch.Tensor, rows: list[dict]) -> np.ndarray:
    """(N,) rewards of model-space images x (N, 3, 16, 16) in [-1, 1] for prompts `rows`."""
    pixels = to_pixels(x)
    return np.array([reward(task, img, row) for img, row in zip(pixels, rows)], np.float64)
