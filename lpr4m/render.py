"""Procedural drawing for the synthetic LPR4M-mini: products, shop images, rooms, a presenter and clip frames.

Everything is numpy + OpenCV, single threaded and driven by an explicit ``numpy.random.Generator`` so one seed
gives the same pixels. A product is drawn once as a *sprite* (premultiplied RGB + alpha at a canonical size) and
then placed in frames by a homography (yaw/pitch/roll/distance of a flat card seen by a pinhole camera). The box
of the presented product is measured on the final, occluded, blurred alpha of that product (``alpha >= 0.5``),
so it is exact by construction: clipped by the frame edges, shrunk by hands in front of it, absent when hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

cv2.setNumThreads(1)  # many helpers share two cores; the synthesiser is single threaded by design

# -- vocabulary -------------------------------------------------------------------------------------------------
COLOURS = {  # name -> RGB; names go into titles and ASR
    "red": (200, 30, 35), "orange": (240, 130, 20), "yellow": (245, 205, 40), "lime": (150, 205, 50),
    "green": (30, 140, 60), "teal": (20, 150, 150), "sky blue": (90, 170, 230), "blue": (30, 80, 200),
    "navy": (20, 30, 90), "purple": (120, 50, 160), "pink": (240, 120, 170), "brown": (120, 70, 35),
    "black": (25, 25, 28), "white": (240, 240, 236), "grey": (140, 140, 145), "cream": (240, 225, 185),
    "maroon": (110, 20, 40), "gold": (200, 160, 50),
}
KINDS = {  # kind -> (height/width range, category id, category name, noun)
    "box": ((1.15, 1.6), "1", "snacks", "box"),
    "carton": ((1.8, 2.3), "2", "dairy", "carton"),
    "bottle": ((2.3, 3.0), "3", "drinks", "bottle"),
    "can": ((1.55, 1.9), "4", "canned food", "can"),
    "jar": ((0.95, 1.3), "5", "condiments", "jar"),
    "pouch": ((1.15, 1.5), "6", "snacks", "pouch"),
    "tube": ((2.4, 3.1), "7", "cosmetics", "tube"),
}
PATTERNS = {  # pattern -> adjective used in titles
    "plain": "plain", "hstripes": "striped", "vstripes": "pinstriped", "diagonal": "diagonal striped",
    "dots": "polka dot", "checks": "checked", "waves": "wavy", "twotone": "two-tone", "chevron": "chevron",
    "gradient": "gradient",
}
LABEL_SHAPES = ("rect", "ellipse", "circle", "band", "badge")
LOGOS = ("circle", "triangle", "star", "diamond", "square", "ring", "leaf", "none")
FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX)
SYLLABLES = ("ka", "lo", "mi", "ra", "to", "zen", "vi", "su", "no", "be", "pa", "lu", "xo", "fi", "da", "mor",
             "el", "qu", "an", "tri", "go", "sha", "yo", "ne", "cru", "bi", "ol", "ve")
VARIANTS = ("ORIGINAL", "LIGHT", "CLASSIC", "500 ml", "250 g", "FAMILY", "MINI", "EXTRA", "BIO", "ZERO")
CYLINDERS = ("bottle", "can", "jar", "tube")


def brand_name(rng: np.random.Generator) -> str:
    return "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), rng.integers(2, 4))).capitalize()


def _pick(rng, seq, exclude=()):
    choices = [s for s in seq if s not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _contrast(c1, c2) -> float:
    return float(np.abs(np.asarray(COLOURS[c1], float) - np.asarray(COLOURS[c2], float)).sum())


def _pick_contrasting(rng, base: str, exclude=(), min_diff: float = 220) -> str:
    options = [c for c in COLOURS if c != base and c not in exclude and _contrast(c, base) >= min_diff]
    return options[int(rng.integers(len(options)))]


# -- products -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProductSpec:
    """Everything that decides a product's look; two specs that differ in one field are hard look-alikes."""

    kind: str
    aspect: float  # height / width
    colour: str
    pattern: str
    pattern_colour: str
    pattern_scale: float
    label_shape: str
    label_colour: str
    text_colour: str
    brand: str
    variant: str
    logo: str
    logo_colour: str
    cap_colour: str
    font: int
    family: int = 0

    @property
    def title(self) -> str:
        noun = KINDS[self.kind][3]
        pattern = "" if self.pattern == "plain" else PATTERNS[self.pattern] + " "
        return f"{self.brand} {self.variant.lower()} {self.colour} {pattern}{noun} with {self.label_colour} label"

    @property
    def short(self) -> str:
        return f"{self.colour} {PATTERNS[self.pattern]} {KINDS[self.kind][3]}"

    @property
    def category(self) -> tuple[str, str]:
        return KINDS[self.kind][1], KINDS[self.kind][2]


def random_spec(rng: np.random.Generator, family: int = 0) -> ProductSpec:
    kind = _pick(rng, KINDS)
    colour = _pick(rng, COLOURS)
    label_colour = _pick_contrasting(rng, colour)
    return ProductSpec(
        kind=kind, aspect=float(rng.uniform(*KINDS[kind][0])), colour=colour, pattern=_pick(rng, PATTERNS),
        pattern_colour=_pick_contrasting(rng, colour, min_diff=150), pattern_scale=float(rng.uniform(0.6, 1.6)),
        label_shape=_pick(rng, LABEL_SHAPES), label_colour=label_colour,
        text_colour=_pick_contrasting(rng, label_colour, min_diff=300), brand=brand_name(rng),
        variant=_pick(rng, VARIANTS), logo=_pick(rng, LOGOS), logo_colour=_pick_contrasting(rng, label_colour),
        cap_colour=_pick(rng, COLOURS), font=int(rng.integers(len(FONTS))), family=family)


def look_alike(spec: ProductSpec, rng: np.random.Generator, how: str) -> ProductSpec:
    """A hard negative: the same product with one visible property changed.

    ``colour``: same shape, pattern and label, another body colour. ``pattern``: same shape and colour, other
    print. ``shape``: same colour and print on another container. ``label``: same container, another brand label.
    """
    if how == "colour":
        colour = _pick(rng, COLOURS, exclude=(spec.colour,))
        pattern_colour = spec.pattern_colour if spec.pattern_colour != colour else _pick_contrasting(rng, colour)
        label_colour = spec.label_colour if spec.label_colour != colour else _pick_contrasting(rng, colour)
        return replace(spec, colour=colour, pattern_colour=pattern_colour, label_colour=label_colour,
                       text_colour=spec.text_colour if spec.text_colour != label_colour else
                       _pick_contrasting(rng, label_colour, min_diff=300))
    if how == "pattern":
        return replace(spec, pattern=_pick(rng, PATTERNS, exclude=(spec.pattern,)),
                       pattern_scale=float(rng.uniform(0.6, 1.6)), variant=_pick(rng, VARIANTS))
    if how == "shape":
        kind = _pick(rng, KINDS, exclude=(spec.kind,))
        return replace(spec, kind=kind, aspect=float(rng.uniform(*KINDS[kind][0])))
    if how == "label":
        label_colour = _pick_contrasting(rng, spec.colour, exclude=(spec.label_colour,))
        return replace(spec, brand=brand_name(rng), label_shape=_pick(rng, LABEL_SHAPES, exclude=(spec.label_shape,)),
                       label_colour=label_colour, text_colour=_pick_contrasting(rng, label_colour, min_diff=300),
                       logo=_pick(rng, LOGOS, exclude=(spec.logo,)), logo_colour=_pick_contrasting(rng, label_colour))
    raise ValueError(f"unknown look-alike kind {how!r}")


@dataclass
class Sprite:
    """A drawn product: premultiplied float32 RGB (0..255) and alpha (0..1), both HxW."""

    rgb: np.ndarray
    alpha: np.ndarray

    @property
    def size(self) -> tuple[int, int]:  # (w, h)
        return self.alpha.shape[1], self.alpha.shape[0]

    def rgba(self) -> np.ndarray:
        return np.dstack([self.rgb, self.alpha])

    def resized(self, height: int) -> "Sprite":
        h, w = self.alpha.shape
        scale = height / h
        size = (max(2, round(w * scale)), max(2, round(h * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        out = cv2.resize(self.rgba(), size, interpolation=interp)
        return Sprite(out[..., :3], out[..., 3])


def _col(name) -> tuple[int, int, int]:
    return COLOURS[name]


def _silhouette(kind: str, w: int, h: int) -> tuple[np.ndarray, list, tuple[int, int, int, int]]:
    """Body mask, extra parts [(mask, role)] and the printable face (x1, y1, x2, y2)."""
    body = np.zeros((h, w), np.uint8)
    parts = []
    aa = cv2.LINE_AA

    def rrect(mask, x1, y1, x2, y2, r):
        r = int(max(1, min(r, (x2 - x1) // 2, (y2 - y1) // 2)))
        cv2.rectangle(mask, (x1 + r, y1), (x2 - r, y2), 255, -1, aa)
        cv2.rectangle(mask, (x1, y1 + r), (x2, y2 - r), 255, -1, aa)
        for cx, cy in ((x1 + r, y1 + r), (x2 - r, y1 + r), (x1 + r, y2 - r), (x2 - r, y2 - r)):
            cv2.circle(mask, (cx, cy), r, 255, -1, aa)

    if kind == "box":
        rrect(body, 0, 0, w - 1, h - 1, 0.03 * w)
        face = (int(0.06 * w), int(0.06 * h), int(0.94 * w), int(0.94 * h))
    elif kind == "carton":
        top = int(0.2 * h)
        rrect(body, 0, top, w - 1, h - 1, 0.02 * w)
        cv2.fillPoly(body, [np.array([[0, top], [w // 2, int(0.07 * h)], [w - 1, top]], np.int32)], 255, aa)
        fin = np.zeros_like(body)
        cv2.rectangle(fin, (int(0.1 * w), 0), (int(0.9 * w), int(0.07 * h)), 255, -1, aa)
        parts.append((fin, "fin"))
        face = (int(0.06 * w), int(0.26 * h), int(0.94 * w), int(0.95 * h))
    elif kind == "bottle":
        neck_w, shoulder = 0.36 * w, int(0.34 * h)
        rrect(body, 0, shoulder, w - 1, h - 1, 0.12 * w)
        pts = np.array([[0, shoulder + int(0.05 * h)], [int(w / 2 - neck_w / 2), int(0.16 * h)],
                        [int(w / 2 + neck_w / 2), int(0.16 * h)], [w - 1, shoulder + int(0.05 * h)]], np.int32)
        cv2.fillPoly(body, [pts], 255, aa)
        cv2.rectangle(body, (int(w / 2 - neck_w / 2), int(0.08 * h)), (int(w / 2 + neck_w / 2), int(0.18 * h)),
                      255, -1, aa)
        cap = np.zeros_like(body)
        rrect(cap, int(w / 2 - neck_w * 0.62), 0, int(w / 2 + neck_w * 0.62), int(0.09 * h), 0.04 * w)
        parts.append((cap, "cap"))
        face = (int(0.04 * w), int(0.42 * h), int(0.96 * w), int(0.92 * h))
    elif kind == "can":
        ry = max(2, int(0.06 * w))
        cv2.rectangle(body, (0, ry), (w - 1, h - 1 - ry), 255, -1, aa)
        for cy in (ry, h - 1 - ry):
            cv2.ellipse(body, (w // 2, cy), (w // 2, ry), 0, 0, 360, 255, -1, aa)
        rim = np.zeros_like(body)
        cv2.ellipse(rim, (w // 2, ry), (w // 2, ry), 0, 0, 360, 255, -1, aa)
        cv2.rectangle(rim, (0, h - 1 - 2 * ry), (w - 1, h - 1 - ry), 255, -1, aa)
        cv2.ellipse(rim, (w // 2, h - 1 - ry), (w // 2, ry), 0, 0, 360, 255, -1, aa)
        parts.append((rim, "rim"))
        face = (int(0.03 * w), int(0.12 * h), int(0.97 * w), int(0.86 * h))
    elif kind == "jar":
        lid_h = int(0.16 * h)
        rrect(body, 0, int(0.12 * h), w - 1, h - 1, 0.16 * w)
        lid = np.zeros_like(body)
        rrect(lid, int(0.07 * w), 0, int(0.93 * w), lid_h, 0.03 * w)
        parts.append((lid, "cap"))
        face = (int(0.06 * w), int(0.28 * h), int(0.94 * w), int(0.9 * h))
    elif kind == "pouch":
        xs = np.linspace(0, 1, 12)
        bulge = (0.04 * w * np.sin(np.pi * xs)).astype(int)
        left = [[int(b), int(0.06 * h + t * 0.94 * (h - 1))] for b, t in zip(bulge, xs)]
        right = [[w - 1 - int(b), int(0.06 * h + t * 0.94 * (h - 1))] for b, t in zip(bulge[::-1], xs[::-1])]
        cv2.fillPoly(body, [np.array(left + right, np.int32)], 255, aa)
        seal = np.zeros_like(body)
        teeth = max(6, w // 14)
        top = [[0, int(0.12 * h)]] + [[int(i * (w - 1) / teeth), 0 if i % 2 else int(0.02 * h)]
                                       for i in range(teeth + 1)] + [[w - 1, int(0.12 * h)]]
        cv2.fillPoly(seal, [np.array(top, np.int32)], 255, aa)
        parts.append((seal, "seal"))
        face = (int(0.08 * w), int(0.18 * h), int(0.92 * w), int(0.92 * h))
    elif kind == "tube":
        crimp, cap_top = int(0.07 * h), int(0.86 * h)
        pts = np.array([[0, crimp], [w - 1, crimp], [int(0.78 * w), cap_top], [int(0.22 * w), cap_top]], np.int32)
        cv2.fillPoly(body, [pts], 255, aa)
        seal = np.zeros_like(body)
        cv2.rectangle(seal, (0, 0), (w - 1, crimp), 255, -1, aa)
        parts.append((seal, "seal"))
        cap = np.zeros_like(body)
        rrect(cap, int(0.26 * w), cap_top - 2, int(0.74 * w), h - 1, 0.05 * w)
        parts.append((cap, "cap"))
        face = (int(0.12 * w), int(0.12 * h), int(0.88 * w), int(0.7 * h))
    else:
        raise ValueError(f"unknown product kind {kind!r}")
    return body, parts, face


def _pattern(spec: ProductSpec, w: int, h: int) -> np.ndarray:
    c1 = np.asarray(_col(spec.colour), np.float32)
    c2 = np.asarray(_col(spec.pattern_colour), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(6.0, 0.22 * w * spec.pattern_scale)
    p = spec.pattern
    if p == "plain":
        t = np.zeros((h, w), np.float32)
    elif p == "hstripes":
        t = ((yy // (period / 2)) % 2).astype(np.float32)
    elif p == "vstripes":
        t = ((xx // (period / 4)) % 2 * ((xx // (period / 2)) % 2 == 0)).astype(np.float32)
    elif p == "diagonal":
        t = (((xx + yy) // (period / 2)) % 2).astype(np.float32)
    elif p == "dots":
        cx, cy = xx % period - period / 2, yy % period - period / 2
        t = (cx * cx + cy * cy < (period * 0.28) ** 2).astype(np.float32)
    elif p == "checks":
        t = (((xx // (period / 2)) + (yy // (period / 2))) % 2).astype(np.float32)
    elif p == "waves":
        t = ((np.sin((yy + 0.15 * period * np.sin(xx / period * 2 * np.pi)) / period * 2 * np.pi)) > 0.3)
        t = t.astype(np.float32)
    elif p == "twotone":
        t = (yy > 0.55 * h).astype(np.float32)
    elif p == "chevron":
        t = (((yy + np.abs((xx % period) - period / 2)) // (period / 2)) % 2).astype(np.float32)
    elif p == "gradient":
        t = yy / max(1, h - 1)
    else:
        raise ValueError(f"unknown pattern {p!r}")
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _logo(img, spec: ProductSpec, cx: int, cy: int, r: int) -> None:
    col = _col(spec.logo_colour)
    aa = cv2.LINE_AA
    if r < 2 or spec.logo == "none":
        return
    if spec.logo == "circle":
        cv2.circle(img, (cx, cy), r, col, -1, aa)
    elif spec.logo == "ring":
        cv2.circle(img, (cx, cy), r, col, max(1, r // 3), aa)
    elif spec.logo == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), col, -1, aa)
    elif spec.logo in ("triangle", "diamond", "star", "leaf"):
        if spec.logo == "triangle":
            ang = np.deg2rad([-90, 30, 150])
            rad = np.full(3, r)
        elif spec.logo == "diamond":
            ang = np.deg2rad([-90, 0, 90, 180])
            rad = np.array([r, 0.6 * r, r, 0.6 * r])
        elif spec.logo == "star":
            ang = np.deg2rad(np.arange(10) * 36 - 90)
            rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        else:
            ang = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            rad = r * (0.35 + 0.65 * np.abs(np.sin(ang)))
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(img, [pts], col, aa)


def _fit_text(img, text: str, box, colour, font: int, thickness_frac: float = 0.09) -> None:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    if bw < 4 or bh < 4:
        return
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min(bw / max(tw, 1), bh / max(th, 1)) * 0.92
    thick = max(1, int(round(scale * th * thickness_frac)))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    org = (int(x1 + (bw - tw) / 2), int(y1 + (bh + th) / 2))
    cv2.putText(img, text, org, font, scale, colour, thick, cv2.LINE_AA)


def draw_product(spec: ProductSpec, height: int = 240) -> Sprite:
    """The product seen from the front, ``height`` pixels tall."""
    h = int(height)
    w = max(8, int(round(h / spec.aspect)))
    body, parts, (fx1, fy1, fx2, fy2) = _silhouette(spec.kind, w, h)
    img = _pattern(spec, w, h)
    canvas = np.ascontiguousarray(img.astype(np.uint8))
    fw, fh = fx2 - fx1, fy2 - fy1
    # label
    lab = _col(spec.label_colour)
    cx, cy = (fx1 + fx2) // 2, fy1 + int(0.5 * fh)
    lw, lh = int(0.78 * fw), int(min(0.5 * fh, 0.55 * fw))
    aa = cv2.LINE_AA
    if spec.label_shape == "rect":
        cv2.rectangle(canvas, (cx - lw // 2, cy - lh // 2), (cx + lw // 2, cy + lh // 2), lab, -1, aa)
        tbox = (cx - lw // 2 + 3, cy - lh // 2 + 2, cx + lw // 2 - 3, cy + lh // 6)
    elif spec.label_shape == "ellipse":
        cv2.ellipse(canvas, (cx, cy), (lw // 2, lh // 2), 0, 0, 360, lab, -1, aa)
        tbox = (cx - int(0.36 * lw), cy - lh // 4, cx + int(0.36 * lw), cy + lh // 10)
    elif spec.label_shape == "circle":
        r = min(lw, lh) // 2 + 2
        cv2.circle(canvas, (cx, cy), r, lab, -1, aa)
        tbox = (cx - int(0.72 * r), cy - r // 2, cx + int(0.72 * r), cy + r // 8)
    elif spec.label_shape == "band":
        cv2.rectangle(canvas, (0, cy - lh // 3), (w - 1, cy + lh // 3), lab, -1, aa)
        tbox = (fx1 + 2, cy - lh // 3 + 2, fx2 - 2, cy + lh // 8)
    else:  # badge: a rounded label with a border
        cv2.rectangle(canvas, (cx - lw // 2, cy - lh // 2), (cx + lw // 2, cy + lh // 2), lab, -1, aa)
        cv2.rectangle(canvas, (cx - lw // 2, cy - lh // 2), (cx + lw // 2, cy + lh // 2), _col(spec.logo_colour),
                      max(1, lw // 30), aa)
        tbox = (cx - lw // 2 + 4, cy - lh // 2 + 4, cx + lw // 2 - 4, cy + lh // 6)
    _fit_text(canvas, spec.brand.upper(), tbox, _col(spec.text_colour), FONTS[spec.font])
    inset = (tbox[2] - tbox[0]) // 5
    sub = (tbox[0] + inset, tbox[3] + 2, tbox[2] - inset, tbox[3] + max(3, (tbox[3] - tbox[1]) // 2))
    _fit_text(canvas, spec.variant, sub, _col(spec.text_colour), cv2.FONT_HERSHEY_SIMPLEX, 0.07)
    _logo(canvas, spec, cx, fy1 + max(3, int(0.13 * fh)), max(2, int(min(0.1 * fh, 0.18 * fw))))
    img = canvas.astype(np.float32)
    alpha = body.astype(np.float32) / 255.0
    for mask, role in parts:
        m = mask.astype(np.float32)[..., None] / 255.0
        colour = np.asarray(_col(spec.cap_colour) if role == "cap" else
                            (205, 205, 210) if role == "rim" else
                            tuple(min(255, int(c * 0.8 + 40)) for c in _col(spec.colour)), np.float32)
        img = img * (1 - m) + colour * m
        alpha = np.maximum(alpha, m[..., 0])
    # shading: cylinders get a horizontal cosine profile and a highlight, flat packs a soft diagonal light
    xs = np.linspace(-1, 1, w, dtype=np.float32)
    if spec.kind in CYLINDERS:
        shade = 0.72 + 0.33 * np.sqrt(np.clip(1 - xs ** 2, 0, 1)) + 0.25 * np.exp(-((xs + 0.45) / 0.12) ** 2)
        img = img * shade[None, :, None]
    else:
        ys = np.linspace(-1, 1, h, dtype=np.float32)
        img = img * (1.05 - 0.08 * (xs[None, :] + ys[:, None]))[..., None]
    # a darker outline helps the silhouette read against similar backgrounds
    edge = alpha - cv2.erode(alpha, np.ones((3, 3), np.uint8))
    img = img * (1 - 0.45 * edge[..., None])
    img = np.clip(img, 0, 255)
    return Sprite(img * alpha[..., None], alpha)


# -- compositing ----------------------------------------------------------------------------------------------
def over(dst: np.ndarray, rgb_premult: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    """Composite a premultiplied layer onto float32 ``dst`` at (x, y), clipped to ``dst``."""
    H, W = dst.shape[:2]
    h, w = alpha.shape
    x1, y1, x2, y2 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x2 <= x1 or y2 <= y1:
        return
    a = alpha[y1 - y:y2 - y, x1 - x:x2 - x, None]
    dst[y1:y2, x1:x2] = dst[y1:y2, x1:x2] * (1 - a) + rgb_premult[y1 - y:y2 - y, x1 - x:x2 - x]


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation (degrees) about y (yaw), x (pitch) then z (roll)."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ rx @ ry


@dataclass
class Pose:
    """Where a product card is: centre (pixels), projected height at zero rotation (pixels), angles (degrees)."""

    cx: float
    cy: float
    height: float
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0


def homography(sprite_size: tuple[int, int], pose: Pose, focal: float = 3.0) -> np.ndarray:
    """3x3 map from sprite pixels to frame pixels: a flat card rotated in 3-D, seen by a pinhole camera.

    ``focal`` is the camera distance in card heights: smaller values give stronger perspective.
    """
    w, h = sprite_size
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    card = np.array([[-w / 2, -h / 2, 0], [w / 2, -h / 2, 0], [w / 2, h / 2, 0], [-w / 2, h / 2, 0]]) / h
    pts = card @ rotation(pose.yaw, pose.pitch, pose.roll).T
    z = focal + pts[:, 2]
    proj = pts[:, :2] * (focal / z)[:, None] * pose.height + np.array([pose.cx, pose.cy])
    return cv2.getPerspectiveTransform(src.astype(np.float32), proj.astype(np.float32))


def project(H: np.ndarray, pts) -> np.ndarray:
    pts = np.asarray(pts, np.float64).reshape(-1, 1, 2)
    return cv2.perspectiveTransform(pts, H).reshape(-1, 2)


def warp_sprite(sprite: Sprite, H: np.ndarray, frame_w: int, frame_h: int, pad: int = 0):
    """Warp into the frame; returns (rgb_premult, alpha, x0, y0) for the clipped region, or None if outside."""
    w, h = sprite.size
    corners = project(H, [[0, 0], [w, 0], [w, h], [0, h]])
    x0 = max(0, int(math.floor(corners[:, 0].min())) - pad - 1)
    y0 = max(0, int(math.floor(corners[:, 1].min())) - pad - 1)
    x1 = min(frame_w, int(math.ceil(corners[:, 0].max())) + pad + 2)
    y1 = min(frame_h, int(math.ceil(corners[:, 1].max())) + pad + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    T = np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1]], np.float64) @ H
    out = cv2.warpPerspective(sprite.rgba(), T, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    return out[..., :3], out[..., 3], x0, y0


def polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = math.cos(math.radians(angle_deg)) * c, math.sin(math.radians(angle_deg)) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1,
             cv2.LINE_AA)
    return k / max(k.sum(), 1e-6)


# -- shop images ----------------------------------------------------------------------------------------------
def _gradient_bg(rng, size_wh, light: bool = True) -> np.ndarray:
    w, h = size_wh
    if light:
        c1 = rng.uniform(215, 255, 3)
        c2 = rng.uniform(200, 250, 3)
    else:
        c1 = np.asarray(_col(_pick(rng, COLOURS)), float) * rng.uniform(0.6, 1.0)
        c2 = c1 * rng.uniform(0.5, 0.9) + rng.uniform(0, 60, 3)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    bg = c1[None, None, :] * (1 - t) + c2[None, None, :] * t
    return np.broadcast_to(bg, (h, w, 3)).astype(np.float32).copy()


def _texture_bg(rng, size_wh) -> np.ndarray:
    """A tabletop or fabric: low-frequency noise on a colour, sometimes with planks."""
    w, h = size_wh
    base = np.asarray(_col(_pick(rng, ("brown", "cream", "grey", "white", "sky blue", "pink", "gold"))), np.float32)
    small = rng.normal(0, 1, (max(2, h // 24), max(2, w // 24))).astype(np.float32)
    noise = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None, :] * (0.85 + 0.08 * noise[..., None])
    if rng.random() < 0.5:
        step = int(rng.integers(max(8, h // 8), max(9, h // 3)))
        img[::step] *= 0.6
    return np.clip(img, 0, 255)


def shop_image(sprite: Sprite, size: int, rng: np.random.Generator, view: int = 0) -> np.ndarray:
    """A shop image: view 0 is the clean main image (product centred on white), views >= 1 vary pose and scene."""
    if view == 0:
        bg = np.full((size, size, 3), rng.uniform(243, 255), np.float32)
        pose = Pose(size / 2, size / 2, 0.84 * size)
        w, h = sprite.size
        pose.height = min(0.84 * size, 0.84 * size * h / w)
    else:
        bg = _gradient_bg(rng, (size, size)) if rng.random() < 0.5 else _texture_bg(rng, (size, size))
        w, h = sprite.size
        fit = min(0.8 * size, 0.8 * size * h / w)
        pose = Pose(size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size,
                    fit * rng.uniform(0.55, 0.95), yaw=rng.uniform(-35, 35), pitch=rng.uniform(-15, 15),
                    roll=rng.uniform(-25, 25))
    small = sprite.resized(max(8, int(pose.height * 1.3)))
    H = homography(small.size, pose, focal=1e6 if view == 0 else 2.5)  # the main image is an exact front view
    shadow = view == 0 or rng.random() < 0.6
    warped = warp_sprite(small, H, size, size, pad=4)
    if warped is not None:
        rgb, a, x0, y0 = warped
        if shadow:  # a soft drop shadow grounds the product
            sh = cv2.GaussianBlur(a, (0, 0), 3) * 0.25
            over(bg, np.zeros_like(rgb), sh, x0 + 3, y0 + 4)
        over(bg, rgb, a, x0, y0)
    return np.clip(bg + 0.5, 0, 255).astype(np.uint8)


# -- scenes ---------------------------------------------------------------------------------------------------
@dataclass
class Presenter:
    """A person shape: head, hair, torso; arms are drawn per frame towards the hand."""

    cx: float  # torso centre, fraction of width
    head_r: float  # fraction of frame height
    skin: tuple
    shirt: tuple
    hair: tuple

    def shoulders(self, W: int, H: int) -> tuple[tuple[float, float], tuple[float, float]]:
        r = self.head_r * H
        y = 0.2 * H + 2.4 * r
        return (self.cx * W - 1.9 * r, y), (self.cx * W + 1.9 * r, y)


SKINS = ((240, 200, 170), (225, 175, 140), (190, 140, 100), (150, 100, 70), (100, 65, 45))


def random_presenter(rng) -> Presenter:
    return Presenter(cx=float(rng.uniform(0.35, 0.65)), head_r=float(rng.uniform(0.075, 0.1)),
                     skin=SKINS[int(rng.integers(len(SKINS)))], shirt=_col(_pick(rng, COLOURS)),
                     hair=((30, 20, 15), (80, 50, 25), (160, 120, 60), (20, 20, 20))[int(rng.integers(4))])


def draw_presenter(img: np.ndarray, p: Presenter) -> None:
    H, W = img.shape[:2]
    r = p.head_r * H
    cx, cy = p.cx * W, 0.2 * H
    aa = cv2.LINE_AA
    (sx1, sy), (sx2, _) = p.shoulders(W, H)
    torso = np.array([[sx1, sy], [sx2, sy], [sx2 + 0.4 * r, H + 5], [sx1 - 0.4 * r, H + 5]], np.int32)
    cv2.fillPoly(img, [torso], p.shirt, aa)
    for sx in (sx1, sx2):
        cv2.circle(img, (int(sx), int(sy + 0.5 * r)), int(0.6 * r), p.shirt, -1, aa)
    cv2.rectangle(img, (int(cx - 0.35 * r), int(cy + 0.8 * r)), (int(cx + 0.35 * r), int(sy + 0.2 * r)), p.skin, -1,
                  aa)
    cv2.ellipse(img, (int(cx), int(cy - 0.15 * r)), (int(1.08 * r), int(1.12 * r)), 0, 0, 360, p.hair, -1, aa)
    cv2.ellipse(img, (int(cx), int(cy + 0.1 * r)), (int(0.92 * r), int(1.1 * r)), 0, 0, 360, p.skin, -1, aa)
    for ex in (-0.35, 0.35):
        cv2.circle(img, (int(cx + ex * r), int(cy)), max(1, int(0.1 * r)), (30, 30, 30), -1, aa)
    cv2.ellipse(img, (int(cx), int(cy + 0.5 * r)), (int(0.3 * r), int(0.12 * r)), 0, 0, 180, (150, 60, 60),
                max(1, int(0.06 * r)), aa)


def room_background(rng, size_wh) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """A procedural live-room: wall (plain, tiles, curtain or gradient), maybe shelves, maybe a table.

    Returns the float32 image and shelf slots (x, y_bottom, max_height) where products may stand.
    """
    w, h = size_wh
    style = _pick(rng, ("plain", "tiles", "curtain", "gradient", "shelves", "shelves"))
    wall = np.asarray(_col(_pick(rng, COLOURS)), np.float32) * rng.uniform(0.5, 0.9) + rng.uniform(20, 80)
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.clip(wall, 0, 255)
    slots = []
    if style == "tiles":
        step = int(rng.integers(max(8, h // 14), max(9, h // 6)))
        img[::step] *= 0.75
        img[:, ::step] *= 0.75
    elif style == "curtain":
        xs = np.arange(w, dtype=np.float32)
        img *= (0.8 + 0.2 * np.sin(xs / rng.uniform(6, 18)))[None, :, None]
    elif style == "gradient":
        img = _gradient_bg(rng, (w, h), light=False)
    elif style == "shelves":
        shelf_col = np.asarray(_col(_pick(rng, ("brown", "white", "grey", "cream"))), np.float32) * 0.9
        n = int(rng.integers(2, 4))
        gap = 0.7 * h / n
        for i in range(n):
            y = int(0.12 * h + (i + 1) * gap)
            img[y:y + max(3, h // 60)] = shelf_col
            img[y + max(3, h // 60):y + max(5, h // 40)] = shelf_col * 0.6
            for x in np.arange(rng.uniform(0.02, 0.08), 0.98, rng.uniform(0.07, 0.12)):
                slots.append((float(x * w), float(y), float(gap * 0.8)))
    if rng.random() < 0.4:  # a lamp-like warm blob
        cx, cy = rng.uniform(0, w), rng.uniform(0, h * 0.4)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img += 50 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.25 * w) ** 2))[..., None]
    return np.clip(img, 0, 255), slots


def fit_background(frame: np.ndarray, size_wh) -> np.ndarray:
    """Scale and centre-crop a real frame to ``size_wh``."""
    w, h = size_wh
    fh, fw = frame.shape[:2]
    s = max(w / fw, h / fh)
    img = cv2.resize(frame, (max(w, round(fw * s)), max(h, round(fh * s))), interpolation=cv2.INTER_AREA)
    y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[y0:y0 + h, x0:x0 + w].astype(np.float32)


def place_on_slot(img, sprite: Sprite, x: float, y_bottom: float, height: float) -> None:
    s = sprite.resized(max(6, int(height)))
    w, h = s.size
    over(img, s.rgb, s.alpha, int(x - w / 2), int(y_bottom - h))


# -- hands and arms --------------------------------------------------------------------------------------------
def draw_arm(img, shoulder, hand, skin, sleeve, width: float) -> None:
    """Upper arm (sleeve) and forearm (skin) from shoulder to hand, elbow pushed down and out."""
    sx, sy = shoulder
    hx, hy = hand
    ex = sx + 0.35 * (hx - sx) + (0.25 * width if hx > sx else -0.25 * width)
    ey = max(sy, hy) + 1.2 * width
    aa = cv2.LINE_AA
    t = max(2, int(width))
    cv2.line(img, (int(sx), int(sy)), (int(ex), int(ey)), sleeve, t, aa)
    cv2.line(img, (int(ex), int(ey)), (int(hx), int(hy)), skin, max(2, int(0.8 * width)), aa)
    cv2.circle(img, (int(ex), int(ey)), t // 2, sleeve, -1, aa)


def hand_mask(shape_hw, H: np.ndarray, sprite_size, grip: str, side: int, finger_w: float,
              depth: float = 0.22, x0: int = 0, y0: int = 0) -> tuple[np.ndarray, tuple[float, float]]:
    """Fingers wrapped over the product edge (in front of it) and the palm beside it.

    Returns a float32 mask (0..1) of ``shape_hw`` in the ROI whose origin is (x0, y0) and the wrist point in
    frame coordinates. Finger positions follow the product's homography, so they foreshorten with it.
    """
    w, h = sprite_size
    mask = np.zeros(shape_hw, np.uint8)
    aa = cv2.LINE_AA
    off = np.array([x0, y0], np.float64)
    t = max(2, int(finger_w))
    if grip == "side":
        ex = 0 if side < 0 else w
        ys = h * (0.42 + np.arange(4) * 0.1)
        inner = ex - side * depth * w
        starts = project(H, [[ex, y] for y in ys]) - off
        ends = project(H, [[inner, y] for y in ys]) - off
        palm = project(H, [[ex + side * 0.12 * w, h * 0.55]])[0] - off
        wrist = project(H, [[ex + side * 0.3 * w, h * 0.62]])[0]
    else:  # from below: fingers up the front, palm under the product
        xs = w * (0.3 + np.arange(4) * 0.13)
        starts = project(H, [[x, h] for x in xs]) - off
        ends = project(H, [[x, h * (1 - 0.6 * depth)] for x in xs]) - off
        palm = project(H, [[w * 0.5, h * 1.05]])[0] - off
        wrist = project(H, [[w * 0.5, h * 1.25]])[0]
    for s, e in zip(starts, ends):
        cv2.line(mask, (int(s[0]), int(s[1])), (int(e[0]), int(e[1])), 255, t, aa)
        cv2.circle(mask, (int(e[0]), int(e[1])), t // 2, 255, -1, aa)
    cv2.circle(mask, (int(palm[0]), int(palm[1])), int(1.6 * t), 255, -1, aa)
    return mask.astype(np.float32) / 255.0, (float(wrist[0]), float(wrist[1]))


@dataclass
class Track:
    """A smooth random function of time: knots every ``step`` seconds, cosine-interpolated."""

    knots: np.ndarray
    step: float

    @classmethod
    def random(cls, rng, duration: float, lo: float, hi: float, step: float = 2.5) -> "Track":
        n = int(math.ceil(duration / step)) + 2
        return cls(rng.uniform(lo, hi, n), step)

    def __call__(self, t: float) -> float:
        i = min(int(t // self.step), len(self.knots) - 2)
        u = (t - i * self.step) / self.step
        u = (1 - math.cos(math.pi * min(max(u, 0.0), 1.0))) / 2
        return float(self.knots[i] * (1 - u) + self.knots[i + 1] * u)


@dataclass
class FrameResult:
    rgb: np.ndarray  # HxWx3 uint8
    box: list[float] | None  # normalised xyxy of the presented product, None when not visible
    visible_fraction: float = 0.0
    box_area: float = 0.0  # fraction of the frame


@dataclass
class ClipScene:
    """One clip: a static background (room, distractors, presenter) and the presented product's motion."""

    background: np.ndarray  # float32 (H+2m) x (W+2m) x 3, includes presenter body and distractors
    margin: int
    size_wh: tuple[int, int]
    presenter: Presenter
    sprite: Sprite
    hand_side: int  # -1 product held by the presenter's right arm (left of image), +1 the other
    grip: str
    scale: Track
    cx: Track
    cy: Track
    yaw: Track
    pitch: Track
    roll: Track
    cam_x: Track
    cam_y: Track
    light: Track
    absent: list[tuple[float, float]]  # time intervals without the product
    occluder: tuple[float, float] | None  # time interval when the other hand passes in front
    blur: float  # probability of motion blur per frame
    light_map: np.ndarray  # HxWx3 multiplicative lighting
    noise: np.ndarray  # float32 noise tile
    noise_sigma: float
    seed: int = 0
    min_visible: float = 0.25
    extras: dict = field(default_factory=dict)

    def render(self, t: float) -> FrameResult:
        """The frame at time ``t`` seconds (a pure function of the scene and ``t``)."""
        W, H = self.size_wh
        m = self.margin
        ox, oy = int(round(m + self.cam_x(t))), int(round(m + self.cam_y(t)))
        frame = self.background[oy:oy + H, ox:ox + W].copy()
        rng = np.random.default_rng([self.seed, int(round(t * 1000))])
        p = self.presenter
        sh_l, sh_r = p.shoulders(W, H)
        shoulder = (sh_l if self.hand_side < 0 else sh_r)
        shoulder = (shoulder[0] - (ox - m), shoulder[1] - (oy - m))
        arm_w = 0.75 * p.head_r * H
        finger_w = 0.2 * p.head_r * H
        present = not any(a <= t < b for a, b in self.absent)
        box, vis_frac, area = None, 0.0, 0.0
        layers = None
        if present:
            pose = Pose(self.cx(t) * W, self.cy(t) * H, self.scale(t) * H, self.yaw(t), self.pitch(t), self.roll(t))
            Hm = homography(self.sprite.size, pose, focal=2.5)
            blur_len = int(rng.integers(5, 15)) if rng.random() < self.blur else 0
            occluding = bool(self.occluder and self.occluder[0] <= t < self.occluder[1])
            # the ROI also holds the palm and the passing hand, so neither is cut at the product's edge
            pad = blur_len + int(4 * finger_w) + (int(0.7 * self.extras.get("occ_r", 0.3) * pose.height)
                                                  if occluding else 0)
            warped = warp_sprite(self.sprite, Hm, W, H, pad=pad)
            if warped is not None:
                rgb, a, x0, y0 = warped
                if blur_len:
                    k = motion_kernel(blur_len, float(rng.uniform(0, 180)))
                    rgb = cv2.filter2D(rgb, -1, k, borderType=cv2.BORDER_CONSTANT)
                    a = cv2.filter2D(a, -1, k, borderType=cv2.BORDER_CONSTANT)
                hm, wrist = hand_mask(a.shape, Hm, self.sprite.size, self.grip, self.hand_side, finger_w, x0=x0,
                                      y0=y0)
                if occluding:
                    u = (t - self.occluder[0]) / max(1e-6, self.occluder[1] - self.occluder[0])
                    w_, h_ = self.sprite.size
                    c = project(Hm, [[w_ * (0.1 + 0.8 * u), h_ * self.extras.get("occ_y", 0.5)]])[0]
                    occ = np.zeros(a.shape, np.uint8)
                    rad = int(self.extras.get("occ_r", 0.3) * pose.height * 0.5)
                    cv2.ellipse(occ, (int(c[0] - x0), int(c[1] - y0)), (rad, int(rad * 1.3)), 30, 0, 360, 255, -1,
                                cv2.LINE_AA)
                    hm = np.maximum(hm, occ.astype(np.float32) / 255.0)
                visible = a * (1 - hm)
                full_area = polygon_area(project(Hm, [[0, 0], [self.sprite.size[0], 0],
                                                      [self.sprite.size[0], self.sprite.size[1]],
                                                      [0, self.sprite.size[1]]]))
                fill = float(self.sprite.alpha.mean())  # silhouette share of its card
                vis_frac = float((visible >= 0.5).sum()) / max(1.0, full_area * fill)
                if vis_frac >= self.min_visible:
                    layers = (rgb, a, hm, x0, y0, wrist, visible)
                else:
                    present = False
        if layers is None:  # empty hand resting low at the side
            wrist = (shoulder[0] + self.hand_side * 0.3 * p.head_r * H, min(H - 2, shoulder[1] + 5 * p.head_r * H))
            draw_arm(frame, shoulder, wrist, p.skin, p.shirt, arm_w)
            cv2.circle(frame, (int(wrist[0]), int(wrist[1])), int(1.3 * finger_w), p.skin, -1, cv2.LINE_AA)
            vis_frac = 0.0
        else:
            rgb, a, hm, x0, y0, wrist, visible = layers
            draw_arm(frame, shoulder, wrist, p.skin, p.shirt, arm_w)
            h_, w_ = a.shape
            roi = frame[y0:y0 + h_, x0:x0 + w_]
            roi[:] = roi * (1 - a[..., None]) + rgb
            skin = np.asarray(p.skin, np.float32)
            roi[:] = roi * (1 - hm[..., None]) + skin * hm[..., None]
            ys, xs = np.nonzero(visible >= 0.5)
            if len(xs):
                bx1, by1 = x0 + xs.min(), y0 + ys.min()
                bx2, by2 = x0 + xs.max() + 1, y0 + ys.max() + 1
                box = [round(bx1 / W, 6), round(by1 / H, 6), round(bx2 / W, 6), round(by2 / H, 6)]
                area = (bx2 - bx1) * (by2 - by1) / float(W * H)
        # lighting, sensor noise
        gain = self.light(t)
        frame *= self.light_map * gain
        n = self.noise
        dy, dx = int(rng.integers(0, n.shape[0] - H + 1)), int(rng.integers(0, n.shape[1] - W + 1))
        frame += n[dy:dy + H, dx:dx + W] * self.noise_sigma
        out = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
        return FrameResult(out, box, vis_frac if box else 0.0, area)


def light_map(rng, size_wh) -> np.ndarray:
    """Per-channel colour temperature times a soft directional gradient (a lamp from one side)."""
    w, h = size_wh
    temp = np.array([1 + rng.uniform(-0.08, 0.12), 1.0, 1 + rng.uniform(-0.12, 0.08)], np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = ((xx / w - 0.5) * math.cos(ang) + (yy / h - 0.5) * math.sin(ang)) * rng.uniform(0.0, 0.45)
    return ((1 + g)[..., None] * temp[None, None, :]).astype(np.float32)
