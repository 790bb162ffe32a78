"""Griffe extension for the API reference: render the reST markup of gpntk's Sphinx-style docstrings.

mkdocstrings parses the ``:param x:`` fields itself (``docstring_style: sphinx``) but renders the
remaining text as Markdown, where reST roles and directives would show up verbatim. Before the
docstrings are parsed, this extension rewrites

* ``:math:`...``` into ``\\(...\\)`` and ``.. math::`` blocks into ``$$ ... $$`` blocks, which
  ``pymdownx.arithmatex`` (generic mode) hands to MathJax;
* ``:class:``, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:obj:``, ``:exc:``
  cross-references into autorefs links: a link where the target is documented on the site,
  plain code otherwise (external targets such as ``torch`` or ``gpytorch`` have no inventory,
  since the build must work offline).

Used from ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import html
import re
import textwrap
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`(?P<body>[^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|data|mod|obj|exc|const):`(?P<body>[^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<arg>.*)$")
_DIRECTIVE_OPTION = re.compile(r"^\s*:(label|nowrap|name|class):")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(text: str) -> str:
    """``.. math::`` directives as ``$$`` blocks (blank-line separated equations stay separate)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["arg"]] if match["arg"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            if not _DIRECTIVE_OPTION.match(lines[i]):
                body.append(lines[i])
            i += 1
        equations = [eq.strip("\n") for eq in re.split(r"\n\s*\n", textwrap.dedent("\n".join(body)))]
        if out and out[-1].strip():
            out.append("")
        for eq in filter(str.strip, equations):
            eq = textwrap.dedent(eq)
            if ("\\\\" in eq or "&" in eq) and "\\begin" not in eq:
                eq = "\\begin{aligned}\n" + eq + "\n\\end{aligned}"
            out.append(indent + "$$")
            out.extend(indent + line if line.strip() else "" for line in eq.split("\n"))
            out.append(indent + "$$")
            out.append("")
        if i < len(lines) and not lines[i].strip():
            i += 1  # the blank line after the directive is already there
    return "\n".join(out)


def _identifier(target: str, obj: griffe.Object) -> str:
    """The full dotted path of a (possibly relative) reference target, as far as it resolves."""
    if target.startswith("gpntk"):
        return target
    first, _, rest = target.partition(".")
    try:
        resolved = obj.resolve(first)
    except Exception:  # noqa: BLE001 - unresolvable names (torch, gpytorch, ...) stay as written
        return target
    return f"{resolved}.{rest}" if rest else resolved


def _xref(match: re.Match[str], obj: griffe.Object) -> str:
    role, body = match["role"], match["body"].strip()
    explicit = re.fullmatch(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>", body)
    title, target = (explicit["title"], explicit["target"]) if explicit else (None, body)
    no_link = target.startswith("!")
    target = target.lstrip("!")
    short = target.startswith("~")
    target = target.lstrip("~").lstrip(".")
    if title is None:
        title = target.rsplit(".", 1)[-1] if short else target
        if role in ("func", "meth") and not title.endswith(")"):
            title += "()"
    code = f"<code>{html.escape(title)}</code>"
    if no_link:
        return code
    identifier = html.escape(_identifier(target, obj), quote=True)
    return f'<autoref identifier="{identifier}" optional>{code}</autoref>'


def rest_to_markdown(text: str, obj: griffe.Object) -> str:
    """The docstring ``text`` of ``obj`` with its reST roles and math directives as Markdown."""
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"\\({m['body']}\\)", text)
    return _XREF_ROLE.sub(lambda m: _xref(m, obj), text)


class RestMarkup(griffe.Extension):
    """Rewrite every docstring of a package once it is fully loaded (so names resolve)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[str] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.path in seen:
                continue
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = rest_to_markdown(obj.docstring.value, obj)
                obj.docstring.__dict__.pop("parsed", None)  # drop a cached parse of the old text
            stack.extend(member for member in obj.members.values() if not member.is_alias)
