"""report.html of a study or a compare: its report.md as one self-contained web page (its plots embedded as data
URIs, no network access), with sortable tables. Made from the Markdown text itself, so the two never disagree."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from markdown_it import MarkdownIt

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
code, pre { background: #f5f5f5; font-size: 12px; }
pre { padding: 0.8em; overflow-x: auto; }
blockquote { border-left: 4px solid #ddd; margin-left: 0; padding-left: 1em; color: #555; }
"""

# Click a header to sort its table by that column (numbers by value: the first number in a cell; else as text);
# again to reverse. Rows keep their order among equals. The page then counts its tables and loaded images into
# <body data-tables data-images data-images-loaded>, for a test to read.
SCRIPT = """
function key(cell) {
  const text = cell.textContent.trim();
  const m = text.match(/^[^0-9+\\-]*([+\\-]?\\d[\\d,]*\\.?\\d*(?:e[+\\-]?\\d+)?)/i);
  return m ? [0, parseFloat(m[1].replace(/,/g, ""))] : [1, text.toLowerCase()];
}
function sortBy(th) {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
  table.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  const rows = Array.from(body.rows).map((r, i) => [key(r.cells[col] || r.cells[0]), i, r]);
  rows.sort((a, b) => (a[0][0] - b[0][0]) || (a[0][1] < b[0][1] ? -dir : a[0][1] > b[0][1] ? dir : a[1] - b[1]));
  rows.forEach(r => body.appendChild(r[2]));
}
document.querySelectorAll("th").forEach(th => th.addEventListener("click", () => sortBy(th)));
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.tables = document.querySelectorAll("table").length;
  document.body.dataset.images = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def _embedded(src: str, folder: Path) -> str:
    """A data URI of the PNG ``src`` (relative to ``folder``), or ``src`` itself where it is not such a file."""
    path = folder / src
    if src.endswith(".png") and "://" not in src and path.is_file():
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return src


def html_report(markdown: str, folder: Path, title: str = "spannorm study") -> str:
    """report.md's text as a self-contained page; its images (paths relative to ``folder``) embedded."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or ():
            if child.type == "image":
                child.attrSet("src", _embedded(child.attrGet("src") or "", Path(folder)))
    body = md.renderer.render(tokens, md.options, {})
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
