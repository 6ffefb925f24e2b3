"""A Sphinx extension of the book: each page's scripts once.

Jupyter Book's Sphinx setup registers two inline scripts twice, once with the file name
``None`` and once with ``""``, so Sphinx does not see them as the same script and every page
carried both copies of each. One of them declares ``const THEBE_JS_URL``, and its second
declaration is a JavaScript ``SyntaxError`` in the console of every page (a review found it;
the browser test now fails on any uncaught page error). On ``html-page-context`` this keeps
the first of scripts with the same file name (``None`` and ``""`` alike: an inline script)
and attributes (the inline body included).
"""

from __future__ import annotations


def drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        key = (str(getattr(script, "filename", script) or ""),
               tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
