"""Write the hook reference of docs/plugins.md from rbees_core/hookspecs.py.

Usage: ``python scripts/gen_plugin_docs.py`` rewrites the part of docs/plugins.md between
its two ``<!-- hook reference ... -->`` markers; ``--check`` only says whether that part is
up to date (exit 1 when it is not). The rest of the page (the worked examples) is written by
hand. tests/test_docs.py runs the check, so a hookspec changed without this script run
fails the kernel tests.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "plugins.md"
BEGIN = ("<!-- hook reference: generated from rbees_core/hookspecs.py by "
         "scripts/gen_plugin_docs.py; do not edit by hand -->")
END = "<!-- end of the hook reference -->"

#: Sphinx roles of the docstrings, as Markdown code: :class:`x.Y` -> `x.Y`.
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def markdown(text: str) -> str:
    """A docstring's reStructuredText roles and literals as Markdown code spans."""
    return _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", text))


def hookspecs() -> list[tuple[str, Any, dict[str, Any]]]:
    """``(name, function, spec options)`` of every hook, in the order of the source."""
    from rbees_core import hookspecs as module

    marker = f"{module.PROJECT}_spec"
    found = [(name, function, getattr(function, marker))
             for name, function in vars(module).items()
             if inspect.isfunction(function) and hasattr(function, marker)]
    return sorted(found, key=lambda item: item[1].__code__.co_firstlineno)


def signature(name: str, function: Any) -> str:
    """``name(arg: type, ...) -> type``, annotations as written (they are strings)."""
    sig = inspect.signature(function)
    params = ", ".join(
        f"{p.name}: {p.annotation}" if p.annotation is not inspect.Parameter.empty else p.name
        for p in sig.parameters.values())
    returns = "" if sig.return_annotation is inspect.Signature.empty else (
        f" -> {sig.return_annotation}")
    return f"{name}({params}){returns}"


def reference() -> str:
    """The generated part of the page, markers included."""
    from rbees_core import hookspecs as module

    specs = hookspecs()
    lines = [BEGIN, "", "## Hooks", "", markdown(inspect.getdoc(module) or ""), "",
             "| hook | what for |", "|---|---|"]
    for name, function, _ in specs:
        doc = inspect.getdoc(function) or ""
        summary = markdown(doc.split("\n\n")[0].replace("\n", " "))
        lines.append(f"| [`{name}`](#{name}) | {summary} |")
    for name, function, options in specs:
        lines += ["", f"### `{name}`", "", "```python", "@hookimpl",
                  f"def {signature(name, function)}: ...", "```", ""]
        flags = [flag for flag in ("firstresult", "historic") if options.get(flag)]
        if flags:
            lines += [f"Spec options: {', '.join(flags)}.", ""]
        lines.append(markdown(inspect.getdoc(function) or ""))
    lines += ["", END]
    return "\n".join(lines)


def updated(page: str) -> str:
    """``page`` with its generated part replaced by :func:`reference`."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{PAGE}: the markers of the hook reference are missing")
    return page[:start] + reference() + page[end + len(END):]


def main(argv: list[str]) -> int:
    page = PAGE.read_text(encoding="utf-8")
    new = updated(page)
    if "--check" in argv:
        if new != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python scripts/gen_plugin_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != page:
        PAGE.write_text(new, encoding="utf-8")
        print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
