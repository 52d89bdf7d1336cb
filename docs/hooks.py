"""MkDocs hooks: render the Sphinx-flavoured markup of ntkgp's docstrings as plain Markdown output.

The docstrings are written for both ``help()`` and this site. Two reST habits survive
mkdocstrings' Markdown rendering as literal text, so they are cleaned in the HTML:

* roles such as ``:class:`Name``` (rendered ``:class:<code>Name</code>``) keep only the code;
* a paragraph ending in ``::`` before a literal block ends in ``:``.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|meth|func|mod|data|attr|obj|exc):(?=<code>)")
_TILDE = re.compile(r"<code>~([\w.]+)</code>")
_DOUBLE_COLON = re.compile(r"::</p>")


def on_page_content(html: str, **kwargs) -> str:
    html = _ROLE.sub("", html)
    html = _TILDE.sub(lambda m: f"<code>{m.group(1).rsplit('.', 1)[-1]}</code>", html)
    return _DOUBLE_COLON.sub(":</p>", html)
