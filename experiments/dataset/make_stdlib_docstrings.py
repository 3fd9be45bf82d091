"""Build the example task's data: Python standard-library docstrings labelled by module family.

Regenerate the shipped files with::

    python experiments/dataset/make_stdlib_docstrings.py

It writes ``lightning_lora/task/stdlib_docstrings.jsonl.gz`` (one JSON object a line: ``text``,
``label``, ``module``, ``kind``, ``split``) and the sibling ``stdlib_docstrings.meta.json``
(generating Python version, counts per family and split, sha256 of the data file).

Why the standard library: it ships with every Python, so the task needs no download, and its
docstrings are real technical English whose topic (files, sockets, dates, ...) is what a sentence
encoder should pick up. Source files are parsed with ``ast``, never imported, so nothing runs.

Every choice is deterministic (sorted walks, selection and split by sha1 of the text, gzip with
``mtime=0``): the same Python version gives byte-identical files. A different Python version ships a
different standard library and therefore different, equally valid, data; the meta file records which
one made the shipped copy.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import platform
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "lightning_lora" / "task" / "stdlib_docstrings.jsonl.gz"

# Family -> top-level module names. A module belongs to the family of its first dotted component
# (``email.mime.text`` -> ``email``). Modules listed nowhere are ignored. Some names exist only in
# older Pythons (distutils, lib2to3, cgi, ...); missing ones simply contribute nothing.
FAMILIES: dict[str, tuple[str, ...]] = {
    "archives": (
        "zipfile", "tarfile", "gzip", "bz2", "lzma", "zipimport", "_compression", "zipapp",
    ),
    "build_platform": (
        "distutils", "ensurepip", "venv", "sysconfig", "site", "_sitebuiltins", "platform",
        "_aix_support", "_osx_support", "ctypes",
    ),
    "command_line": (
        "argparse", "optparse", "getopt", "cmd", "shlex", "getpass", "rlcompleter", "curses",
        "tty", "pty",
    ),
    "concurrency": (
        "asyncio", "threading", "_threading_local", "multiprocessing", "concurrent", "queue",
        "selectors", "sched", "subprocess", "signal", "contextvars",
    ),
    "data_formats": (
        "json", "csv", "sqlite3", "pickle", "pickletools", "_compat_pickle", "copyreg", "shelve",
        "dbm", "configparser", "plistlib", "tomllib", "netrc", "xdrlib",
    ),
    "datamodel_functional": (
        "collections", "_collections_abc", "functools", "operator", "heapq", "bisect", "copy",
        "dataclasses", "enum", "contextlib", "typing", "weakref", "_weakrefset", "graphlib", "abc",
        "_py_abc",
    ),
    "dates_times": ("datetime", "_pydatetime", "_strptime", "calendar", "zoneinfo"),
    "debugging_profiling": (
        "pdb", "bdb", "cProfile", "profile", "pstats", "trace", "traceback", "timeit",
        "tracemalloc", "cgitb",
    ),
    "email": ("email", "mailbox", "mimetypes", "mailcap"),
    "encodings_crypto": (
        "hashlib", "hmac", "secrets", "base64", "binascii", "codecs", "encodings", "quopri", "uu",
        "uuid", "crypt",
    ),
    "filesystem_io": (
        "os", "posixpath", "ntpath", "genericpath", "shutil", "pathlib", "glob", "fnmatch",
        "tempfile", "stat", "filecmp", "fileinput", "linecache", "io", "_pyio",
    ),
    "gui": ("tkinter", "turtle"),
    "introspection": (
        "importlib", "inspect", "pkgutil", "ast", "dis", "tokenize", "token", "symtable",
        "keyword", "opcode", "runpy", "pyclbr", "py_compile", "compileall", "codeop", "code",
        "types", "imp", "modulefinder", "pydoc", "lib2to3", "__future__",
    ),
    "logging_warnings": ("logging", "warnings"),
    "markup": ("xml", "html", "_markupbase"),
    "networking": (
        "socket", "ssl", "ftplib", "smtplib", "smtpd", "imaplib", "poplib", "nntplib",
        "telnetlib", "socketserver", "ipaddress", "asynchat", "asyncore",
    ),
    "numbers_random": (
        "statistics", "fractions", "_pydecimal", "decimal", "random", "numbers", "colorsys",
    ),
    "testing": ("unittest", "doctest"),
    "text": (
        "re", "sre_parse", "sre_compile", "sre_constants", "string", "textwrap", "difflib",
        "pprint", "reprlib", "locale", "gettext", "stringprep",
    ),
    "web": ("http", "urllib", "wsgiref", "xmlrpc", "cgi", "webbrowser"),
}  # fmt: skip

# Directory names whose contents are never read: test suites (their docstrings describe tests, not
# the module), IDLE, demos, installed third-party packages and caches.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "__pycache__"})
MIN_CHARS = 30  # shorter docstrings ("Return self.") carry no family signal
CAP_PER_FAMILY = 400  # keeps classes roughly balanced: tkinter alone has ~700 docstrings
SPLIT_TENTHS = (("train", 6), ("val", 2), ("test", 2))  # 60/20/20 by sha1 of the text

_FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}


@dataclass(frozen=True)
class Docstring:
    """One example: ``kind`` is ``module``, ``class`` or ``function`` (methods included)."""

    text: str
    label: str
    module: str
    kind: str
    split: str = ""


def normalise(text: str) -> str:
    """Collapse all whitespace runs to one space: layout is noise to a subword tokenizer."""
    return " ".join(text.split())


def skeleton(text: str) -> str:
    """Text without case and without any word that holds a digit.

    Near-copies such as the ~50 generated codec docstrings ("Python Character Mapping Codec cp037
    generated from 'MAPPINGS/.../CP037.TXT'") share one skeleton, so only one of them is kept.
    """
    return " ".join(w for w in text.lower().split() if not any(c.isdigit() for c in w))


def stable_hash(salt: str, text: str) -> int:
    """Seed-free pseudo-random number from the text: same on every machine and Python."""
    return int(hashlib.sha1(f"{salt}:{text}".encode()).hexdigest(), 16)


def split_of(text: str) -> str:
    """``train`` / ``val`` / ``test`` in proportion to ``SPLIT_TENTHS``, fixed by the text's sha1.

    Hashing the text (not drawing from a seeded RNG) keeps an example in its split when other
    examples are added or removed, e.g. by a newer Python's standard library.
    """
    tenth = stable_hash("split", text) % 10
    for split, width in SPLIT_TENTHS:
        if tenth < width:
            return split
        tenth -= width
    raise AssertionError(f"SPLIT_TENTHS must add up to 10: {SPLIT_TENTHS}")


def module_name(relative: Path) -> str:
    """``email/mime/text.py`` -> ``email.mime.text``; ``json/__init__.py`` -> ``json``."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_source_files(stdlib: Path) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, module)`` for every stdlib source file of a known family, in sorted order."""
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIP_DIRS.intersection(relative.parts[:-1]):
            continue
        module = module_name(relative)
        if module.split(".")[0] in _FAMILY_OF:
            yield path, module


def iter_docstrings(path: Path, module: str) -> Iterator[Docstring]:
    """Docstrings of the module, its classes, functions and methods (nested ones too)."""
    try:
        with warnings.catch_warnings():  # old modules' invalid escapes warn on newer Pythons
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. a file written for another Python version
        return
    label = _FAMILY_OF[module.split(".")[0]]
    kinds = {ast.Module: "module", ast.ClassDef: "class"}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield Docstring(normalise(doc), label, module, kinds.get(type(node), "function"))


def select(docstrings: list[Docstring]) -> list[Docstring]:
    """Drop short and duplicated docstrings, cap each family, assign splits; sorted output.

    A skeleton seen in two families is ambiguous by construction and dropped everywhere; within
    one family only its first occurrence (by module, then text) is kept.
    """
    by_skeleton: dict[str, list[Docstring]] = {}
    for doc in sorted(docstrings, key=lambda d: (d.module, d.text, d.kind)):
        if len(doc.text) >= MIN_CHARS:
            by_skeleton.setdefault(skeleton(doc.text), []).append(doc)
    unique = [docs[0] for docs in by_skeleton.values() if len({d.label for d in docs}) == 1]

    kept: list[Docstring] = []
    for family in sorted(FAMILIES):
        members = [d for d in unique if d.label == family]
        members.sort(key=lambda d: stable_hash("cap", d.text))
        kept.extend(members[:CAP_PER_FAMILY])

    out = [replace(doc, split=split_of(doc.text)) for doc in kept]
    return sorted(out, key=lambda d: (d.label, d.module, d.kind, d.text))


def meta_path(data_path: Path) -> Path:
    """``x/stdlib_docstrings.jsonl.gz`` -> ``x/stdlib_docstrings.meta.json``."""
    return data_path.with_name(data_path.name.removesuffix(".jsonl.gz") + ".meta.json")


def write_dataset(out: Path, stdlib: Path | None = None) -> dict:
    """Generate the data file at ``out`` and its meta file beside it; return the meta dict.

    ``stdlib`` defaults to the running interpreter's standard library source directory.
    """
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs = [d for path, module in iter_source_files(stdlib) for d in iter_docstrings(path, module)]
    examples = select(docs)

    lines = "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in examples)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 (and no file name, which gzip.compress never writes) keeps the header reproducible
    out.write_bytes(gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0))

    counts = {f: {s: 0 for s, _ in SPLIT_TENTHS} for f in sorted({d.label for d in examples})}
    for d in examples:
        counts[d.label][d.split] += 1
    meta = {
        "python": platform.python_version(),
        "generator": "experiments/dataset/make_stdlib_docstrings.py",
        "num_examples": len(examples),
        "num_classes": len(counts),
        "min_chars": MIN_CHARS,
        "cap_per_family": CAP_PER_FAMILY,
        "splits": {s: sum(c[s] for c in counts.values()) for s, _ in SPLIT_TENTHS},
        "families": counts,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
    }
    meta_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="data file (.jsonl.gz)")
    args = parser.parse_args()
    meta = write_dataset(args.out)
    print(f"{meta['num_examples']} examples, {meta['num_classes']} families -> {args.out}")
    print(json.dumps(meta["splits"]))


if __name__ == "__main__":
    main()
