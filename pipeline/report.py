"""Human-readable text, JSON and a self-contained HTML report (base64 JPEG thumbnails) of one recognised clip.

The JSON and the HTML carry the same content; the HTML is one file that opens offline (no external assets).
"""
from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from pipeline.segments import fmt_time

logger = logging.getLogger(__name__)


def _b64(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def shop_thumbnail(path, width: int = 160) -> bytes | None:
    """A small JPEG of a shop image, or None when the file is gone or unreadable (the report still renders)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((width, width))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            return buf.getvalue()
    except (OSError, ValueError, TypeError):
        return None


def text_report(result: dict) -> str:
    """What ``run.py`` prints: top-k products with supporting frames, the timeline, the speed line."""
    lines = [f"{result['clip']}: {result['n_frames']} frames sampled"
             f" ({result['settings']['fps']:g} fps, detector {'on' if result['settings']['detector'] else 'off'}"
             f"{', ' + result['settings']['backend'] if result['settings'].get('backend') else ''})"]
    lines.append(f"{'rank':>4}  {'score':>6}  {'image id':<36}  title")
    for p in result["products"]:
        lines.append(f"{p['rank']:>4}  {p['score']:6.3f}  {p['image_id']:<36}  {p['title']}")
        sup = ", ".join(f"#{s['frame']}@{s['time_s']:.1f}s {s['score']:.2f}"
                        + (" box" if s["box"] is not None else " full") for s in p["support"])
        lines.append(f"{'':>4}  {'':>6}  supported by frames {sup}")
    if result.get("segments") is not None:
        lines.append(f"timeline ({len(result['segments'])} segments):")
        for s in result["segments"]:
            top = s["products"][0] if s["products"] else None
            what = f"{top['image_id']}  {top['title']}  ({top['score']:.3f})" if top else "(no match)"
            lines.append(f"  {fmt_time(s['start_s'])}-{fmt_time(s['end_s'])}  {s['n_frames']:>4} frames  {what}")
    lines.append(result["speed"])
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
.frames{display:flex;flex-wrap:wrap;gap:8px} .frames figure{margin:0;width:240px}
figure img{max-width:100%} figcaption{font-size:.8em;color:#555}
.shop img{max-width:150px;max-height:150px} .sup img{max-height:90px;margin-right:4px}
.meta{font-size:.85em;color:#555}
"""


def html_report(result: dict, thumbs: dict[int, bytes], shop_paths: dict[str, str] | None = None) -> str:
    """One self-contained HTML page: top-k shop images beside the supporting frames, then all kept frames.

    ``thumbs`` maps a frame's position in ``result['frames']`` to a JPEG with its detections drawn.
    """
    esc = html.escape
    pos_of = {f["index"]: n for n, f in enumerate(result["frames"])}
    shop_cache: dict[str, str | None] = {}

    def shop_img(p: dict) -> str:
        key = p["image_id"]
        if key not in shop_cache:
            path = (shop_paths or {}).get(key) or p.get("path")
            jpeg = shop_thumbnail(path) if path and Path(path).is_file() else None
            shop_cache[key] = _b64(jpeg) if jpeg else None
        src = shop_cache[key]
        return f'<img src="{src}" alt="{esc(key)}">' if src else '<span class="meta">(shop image not found)</span>'

    def frame_img(frame_index: int) -> str:
        n = pos_of.get(frame_index)
        jpeg = thumbs.get(n) if n is not None else None
        return f'<img src="{_b64(jpeg)}" alt="frame {frame_index}">' if jpeg else ""

    def products_table(products: list[dict]) -> str:
        rows = ["<tr><th>rank</th><th>shop image</th><th>product</th><th>score</th><th>supporting frames</th></tr>"]
        for p in products:
            sup = " ".join(frame_img(s["frame"]) for s in p["support"])
            sup_txt = ", ".join(f"#{s['frame']} @{s['time_s']:.1f}s ({s['score']:.2f})" for s in p["support"])
            rows.append(f"<tr><td>{p['rank']}</td><td class='shop'>{shop_img(p)}</td>"
                        f"<td><b>{esc(p['title'] or '')}</b><br><span class='meta'>{esc(p['image_id'])}"
                        f"{' view ' + str(p['view']) if p.get('view') else ''}</span></td>"
                        f"<td>{p['score']:.3f}</td><td class='sup'>{sup}<br><span class='meta'>{esc(sup_txt)}"
                        f"</span></td></tr>")
        return "<table>" + "".join(rows) + "</table>"

    s = result["settings"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(Path(result['clip']).name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(Path(result['clip']).name)}</h1>",
             f"<p class='meta'>{result['n_frames']} frames at {s['fps']:g} fps; detector "
             f"{'on' if s['detector'] else 'off'}; backend {esc(s['backend'])}; aggregation "
             f"{esc(s['aggregation'])}; index {esc(str(s.get('index') or ''))}<br>{esc(result['speed'])}</p>",
             "<h2>Recognised products</h2>", products_table(result["products"])]
    if result.get("segments") is not None:
        parts.append("<h2>Timeline</h2><table><tr><th>from</th><th>to</th><th>frames</th><th>shop image</th>"
                     "<th>product</th><th>score</th></tr>")
        for seg in result["segments"]:
            top = seg["products"][0] if seg["products"] else None
            row = (f"<tr><td>{fmt_time(seg['start_s'])}</td><td>{fmt_time(seg['end_s'])}</td>"
                   f"<td>{seg['n_frames']}</td>")
            if top:
                row += (f"<td class='shop'>{shop_img(top)}</td><td>{esc(top['title'] or '')}<br>"
                        f"<span class='meta'>{esc(top['image_id'])}</span></td><td>{top['score']:.3f}</td></tr>")
            else:
                row += "<td></td><td>(no match)</td><td></td></tr>"
            parts.append(row)
        parts.append("</table>")
    parts.append("<h2>Sampled frames</h2><p class='meta'>green: crop embedded; orange: other detections; "
                 "no box: the full frame was embedded</p><div class='frames'>")
    for n, f in enumerate(result["frames"]):
        if n not in thumbs:
            continue
        cap = f"#{f['index']} @{f['time_s']:.1f}s — " + (
            "full frame" if f["full_frame"] else f"{len(f['used'])} crop(s), {len(f['boxes'])} detection(s)")
        parts.append(f"<figure>{frame_img(f['index'])}<figcaption>{esc(cap)}</figcaption></figure>")
    kept = len(thumbs)
    if kept < len(result["frames"]):
        parts.append(f"</div><p class='meta'>{kept} of {len(result['frames'])} frames shown</p>")
    else:
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
