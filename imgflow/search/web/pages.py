"""The HTML pages: Jinja2 templates (``imgflow/search/templates``) rendered on the server with
autoescape on — descriptions and read text come from images anyone can drop in a folder, so
a sign reading ``<script>`` is text — and what the templates show of a row.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jinja2
from fastapi.responses import HTMLResponse

from imgflow.search.web.state import WebState

VECTOR_HEAD = 6  # values of a vector shown on an image's page


def when(value) -> str:
    """A timestamp as 2026-12-04 23:19:59 UTC."""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value or "")
    match = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)", text)
    return f"{match.group(1)} {match.group(2)} UTC" if match else text


def vector_summary(values) -> dict:
    values = [float(v) for v in values or []]
    return {"dim": len(values), "head": [f"{v:.4f}" for v in values[:VECTOR_HEAD]], "norm": f"{math.sqrt(sum(v * v for v in values)):.4f}"}


def row_fields(row: dict) -> list[dict]:
    """Every column of a row, each as a kind the template knows how to show."""
    fields = []
    for name, value in row.items():
        if name.endswith("_vector"):
            fields.append({"name": name, "kind": "vector", "value": vector_summary(value)})
        elif isinstance(value, dict):
            fields.append({"name": name, "kind": "map", "value": sorted((k, str(v)) for k, v in value.items())})
        elif isinstance(value, list):
            fields.append({"name": name, "kind": "list", "value": [str(v) for v in value]})
        elif name == "llama_extracted" and value:
            try:
                pretty = json.dumps(json.loads(value), indent=2, ensure_ascii=False)
            except ValueError:
                pretty = str(value)
            fields.append({"name": name, "kind": "pre", "value": pretty})
        elif name == "timestamp":
            fields.append({"name": name, "kind": "text", "value": when(value)})
        else:
            fields.append({"name": name, "kind": "text", "value": "" if value is None else str(value)})
    return fields


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("imgflow.search", "templates"),
        autoescape=True,  # every value is text unless a template says otherwise (none does)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    env.filters["basename"] = lambda p: (p or "").rstrip("/").rsplit("/", 1)[-1]
    return env


class Pages:
    """Renders a template with what every page shows: the runs, the chosen run's counts and
    categories, whether images are shown, the last sync's error."""

    def __init__(self, state: WebState) -> None:
        self.state = state
        self.env = templates()

    def render(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        state = self.state
        index = state.index
        runs = index.runs()
        run: str = context.pop("run", None) or state.default_run(runs)
        base: dict[str, Any] = {
            "runs": runs,
            "run": run,
            "categories": {c: n for c, n in index.categories(run).items() if c},
            "category": "",
            "q": "",
            "total": index.count(run),
            "failed_total": index.failed_count(run),
            "images_allowed": state.images.allowed,
            "sync_error": state.sync_error,
            "out": str(state.out),
            "empty": not runs,
        }
        base.update(context)
        return HTMLResponse(self.env.get_template(name).render(**base), status_code=status)
