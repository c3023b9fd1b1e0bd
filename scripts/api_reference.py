"""Write docs/api.md, the API reference, from the docstrings of the names in ``lightning_deconv.__all__``.

python scripts/api_reference.py            # rewrite docs/api.md
python scripts/api_reference.py --check    # fail if docs/api.md is out of date (run by the tests)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import lightning_deconv

PATH = Path(__file__).resolve().parents[1] / "docs" / "api.md"
GROUPS = {
    "The monitors (callbacks)": ["DeconvCallback", "TopKMonitor", "OcclusionMonitor", "Watch", "PAPER_EPOCHS"],
    "Projection engine": [
        *("deconvolve", "project", "Projector", "Projection", "find_maxima", "TopK", "merge_top_k"),
        "choose_features",
        *("receptive_field", "ReceptiveField"),
    ],
    "Analyses (the paper's figures)": [
        *("top_k", "project_top_k", "save_top_k", "load_top_k"),
        *(
            "occlusion",
            "Occlusion",
            "invariance",
            "Invariance",
            "linear_cka",
            "filter_spectrum",
            "aliasing",
            "Diagnosis",
        ),
    ],
    "Rendering": ["normalize", "crop", "support_boxes", "projection_grid", "evolution_grid"],
    "Run files": ["find_firings", "read_firings", "RecordError"],
}


def reference() -> str:
    """The Markdown text: per group, each name's signature and the first paragraph of its docstring."""
    listed = sorted(n for names in GROUPS.values() for n in names)
    if listed != sorted(lightning_deconv.__all__):
        raise SystemExit(f"GROUPS and __all__ differ: {set(listed) ^ set(lightning_deconv.__all__)}")
    lines = [
        "# API reference",
        "",
        "Every name below is importable from `lightning_deconv` and listed in its `__all__`; each has a typed",
        "docstring with the details (`help(lightning_deconv.NAME)`), most with a runnable example that the tests run.",
        "The monitors and `Watch` import Lightning on first use. Written by `scripts/api_reference.py`.",
        "",
    ]
    for title, names in GROUPS.items():
        lines += [f"## {title}", ""]
        for name in names:
            obj = getattr(lightning_deconv, name)
            if not callable(obj):
                lines += [f"### `{name}`", "", f"`{obj!r}`", ""]
                continue
            signature = str(inspect.signature(obj))
            summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").replace("``", "`")
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{name}`", "", "```python", f"{kind} {name}{signature}", "```", "", summary, ""]
    return "\n".join(lines)


def main() -> None:
    text = reference()
    if "--check" in sys.argv:
        if not PATH.exists() or PATH.read_text() != text:
            raise SystemExit(f"{PATH} is out of date: run python scripts/api_reference.py")
        return
    PATH.write_text(text)
    print(f"Wrote {PATH}")


if __name__ == "__main__":
    main()
