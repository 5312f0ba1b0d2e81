"""Procedural image sets for the model zoo: small, deterministic, no downloads.

Every image set is a function ``(n, size, seed) -> float32 array (n, 3, size, size)`` with
values in [-1, 1] (the diffusion models' pixel range). The same (name, n, size, seed) always
gives the same bytes: numpy's PCG64 generator, no threads, no global state.

Sets:
  shapes     - a two-colour linear gradient background with 1-3 filled discs / squares /
               triangles in saturated colours.
  gradients  - smooth linear or radial colour gradients, some with soft stripes.
  checkers   - two-colour checkerboards and stripes at random periods and phases.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["IMAGE_SETS", "make_images", "image_set_names"]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float64) + 0.5) / size  # pixel centres in (0, 1)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx


def _rand_colour(rng: np.random.Generator, n: int, saturated: bool = False) -> np.ndarray:
    """(n, 3) colours in [0, 1]."""
    col = rng.uniform(0.0, 1.0, size=(n, 3))
    if saturated:
        # push one channel to 1 and one to ~0 for vivid shape colours
        hi = rng.integers(0, 3, size=n)
        lo = (hi + rng.integers(1, 3, size=n)) % 3
        col[np.arange(n), hi] = rng.uniform(0.8, 1.0, size=n)
        col[np.arange(n), lo] = rng.uniform(0.0, 0.2, size=n)
    return col


def _shapes(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    yy, xx = _grid(size)
    out = np.empty((n, 3, size, size), dtype=np.float64)
    for i in range(n):
        c0, c1 = _rand_colour(rng, 2) * 0.6  # muted background
        ang = rng.uniform(0, 2 * np.pi)
        u = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) + 0.5
        u = np.clip(u, 0, 1)
        img = c0[:, None, None] * (1 - u) + c1[:, None, None] * u
        for _ in range(int(rng.integers(1, 4))):
            col = _rand_colour(rng, 1, saturated=True)[0]
            kind = int(rng.integers(0, 3))
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            rad = rng.uniform(0.12, 0.3)
            if kind == 0:  # disc
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2
            elif kind == 1:  # axis-aligned square
                m = (np.abs(yy - cy) <= rad) & (np.abs(xx - cx) <= rad)
            else:  # upward triangle
                dy = yy - (cy - rad)
                m = (dy >= 0) & (dy <= 2 * rad) & (np.abs(xx - cx) <= dy / 2)
            img = np.where(m[None], col[:, None, None], img)
        out[i] = img
    return out


def _gradients(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    yy, xx = _grid(size)
    out = np.empty((n, 3, size, size), dtype=np.float64)
    for i in range(n):
        c0, c1 = _rand_colour(rng, 2)
        if rng.uniform() < 0.5:
            ang = rng.uniform(0, 2 * np.pi)
            u = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) / 0.71 + 0.5
        else:
            cy, cx = rng.uniform(0.0, 1.0, size=2)
            u = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.5, 1.2)
        u = np.clip(u, 0, 1)
        img = c0[:, None, None] * (1 - u) + c1[:, None, None] * u
        if rng.uniform() < 0.4:  # soft stripes modulating brightness
            per = rng.uniform(0.25, 0.6)
            ang = rng.uniform(0, np.pi)
            s = np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / per)
            img = img * (0.8 + 0.2 * s[None])
        out[i] = img
    return out


def _checkers(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    yy, xx = _grid(size)
    out = np.empty((n, 3, size, size), dtype=np.float64)
    for i in range(n):
        c0, c1 = _rand_colour(rng, 2)
        per = int(rng.choice([2, 4, 8])) / size
        py, px = rng.uniform(0, per, size=2)
        by = np.floor((yy + py) / per).astype(int)
        bx = np.floor((xx + px) / per).astype(int)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            m = (by + bx) % 2 == 0
        elif kind == 1:
            m = by % 2 == 0
        else:
            m = bx % 2 == 0
        out[i] = np.where(m[None], c0[:, None, None], c1[:, None, None])
    return out


IMAGE_SETS: dict[str, Callable[[int, int, int], np.ndarray]] = {
    "shapes": _shapes,
    "gradients": _gradients,
    "checkers": _checkers,
}


def image_set_names() -> list[str]:
    return sorted(IMAGE_SETS)


def make_images(name: str, n: int = 1024, size: int = 16, seed: int = 0) -> np.ndarray:
    """Deterministic procedural images, float32 (n, 3, size, size) in [-1, 1]."""
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; choose one of {image_set_names()}")
    if n < 1 or size < 4:
        raise ValueError("need n >= 1 and size >= 4")
    img01 = IMAGE_SETS[name](int(n), int(size), int(seed))
    return np.ascontiguousarray(np.clip(img01 * 2.0 - 1.0, -1.0, 1.0).astype(np.float32))
