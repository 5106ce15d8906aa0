"""Real English sentences for the zoo: first sentences of Python standard-library docstrings.

Deterministic for a given Python version: a fixed list of modules, members in sorted order,
first sentence of each docstring, filtered for plain prose and deduplicated in order.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

# Pure-Python, side-effect-free stdlib modules with well-written docstrings.
_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib "
    "dis email enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext glob "
    "gzip hashlib heapq hmac html.parser http.client http.cookiejar imaplib inspect io "
    "ipaddress itertools json logging lzma mailbox mimetypes netrc numbers operator optparse "
    "os pathlib pickle pkgutil platform plistlib poplib pprint pydoc queue quopri random re "
    "reprlib sched secrets selectors shelve shlex shutil smtplib socket socketserver "
    "statistics string stringprep struct subprocess symtable tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback turtle types typing unittest urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree "
    "zipfile zipimport"
).split()

_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)])\.(\s|$)")
_ALLOWED = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-/]+\.$")


def _first_sentence(doc: str) -> str | None:
    paragraph = doc.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    m = _SENTENCE_END.search(text)
    if m is None:
        return None
    sentence = text[: m.start() + 1]
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not _ALLOWED.match(sentence):
        return None
    if "(" in words[0] or "=" in sentence or "->" in sentence:
        return None
    return sentence


@functools.cache
def stdlib_sentences() -> tuple[str, ...]:
    """All usable sentences, deduplicated (case-insensitively), in a deterministic order."""
    seen: set[str] = set()
    out: list[str] = []

    def add(doc: str | None) -> None:
        if not doc:
            return
        s = _first_sentence(doc)
        if s is not None and s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)

    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - stripped-down Python builds
            continue
        add(inspect.getdoc(module))
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            add(inspect.getdoc(obj))
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    if not meth.startswith("_") and inspect.isfunction(vars(obj)[meth]):
                        add(inspect.getdoc(vars(obj)[meth]))
    return tuple(out)
