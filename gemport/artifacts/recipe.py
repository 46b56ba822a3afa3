"""Recipes: one model, many artifacts. A TOML file read and checked before anything is built.

```toml
name = "gemma-3-270m"                     # optional; default: the file's stem
source = "../build/models/gemma-3-270m"   # an HF folder (or any format gemport reads); relative to this file
reference = "../build/models/gemma-3-270m" # optional, an HF folder; default: source

[protocol]                                # optional; gemport validate's protocol
corpus = "eval.txt"                       # default: Python's pydoc topics
ctx = 512
windows = 4

[[artifact]]
name = "q4_k_m"                           # the artifact is OUT/q4_k_m.gguf (a folder for the other formats)
format = "gguf"                           # gemport's writers: hf, gguf, onnx, jax, trtllm, ...
quant = "q4_k_m"                          # every other key is the option of `gemport convert` of that name
gates = { max_kld = 0.05 }                # optional: max_kld, max_ppl_delta (%, absolute), min_top1 (%)

[[artifact]]
name = "gptq-int4"
format = "hf"
method = "gptq"                           # `gemport quantize --method gptq` instead of convert
bits = 4

[[artifact]]
name = "onnx-gptq-int4"
format = "onnx"
from = "gptq-int4"                        # built from that artifact (one GPTQ pass feeds both)
validate = false                          # optional: build only (an intermediate)
```

An artifact's options are checked by gemport's own command-line parser, so a recipe takes exactly
what `gemport convert` / `gemport quantize` take (``group_size = 128`` is ``--group-size 128``,
``true`` a flag). Errors name the recipe line and the key: ``recipe.toml:14: artifact 'q4': ...``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemport import registry
from gemport.errors import InputError, UnsupportedError

GATES = ("max_kld", "max_ppl_delta", "min_top1")
METHODS = ("rtn", "awq", "gptq")
RESERVED = ("name", "format", "from", "method", "validate", "gates")
# options the builder sets itself, never a recipe
BUILDER_OPTIONS = ("overwrite", "to", "dst_format", "verbose", "help", "json")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TOP_KEYS = ("name", "source", "reference", "protocol", "artifact")
# files and folders of the build itself (gemport/artifacts/builder.py), no artifact's
RESERVED_NAMES = ("manifest.json", "report.md", "report.json", "report.png")
PROTOCOL_KEYS = ("corpus", "ctx", "windows")


@dataclass(frozen=True)
class Artifact:
    """One entry: ``format`` (a writer), ``method`` (quantize) or None (convert), ``options`` (CLI
    option name without dashes -> value), ``source`` (another artifact's name, or None for the
    recipe's source)."""

    name: str
    format: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    validate: bool = True
    gates: dict[str, float] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)  # the recipe table as written
    line: int = 0

    @property
    def filename(self) -> str:
        """Its path inside the output folder: a file for GGUF, a folder otherwise."""
        return f"{self.name}.gguf" if self.format == "gguf" else self.name

    def cli_args(self, src: Path, dst: Path) -> list[str]:
        """gemport's arguments that build it (without the program name)."""
        if self.method:
            args = ["quantize", str(src), str(dst), "--method", self.method, "--to", self.format]
        else:
            args = ["convert", str(src), str(dst), "--to", self.format]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False:
                args += [flag, str(value)]
        return args


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    source: Path
    reference: Path
    corpus: Path | None
    ctx: int
    windows: int
    artifacts: tuple[Artifact, ...]

    def artifact(self, name: str) -> Artifact:
        return next(a for a in self.artifacts if a.name == name)

    def closure(self, names: list[str]) -> list[Artifact]:
        """The artifacts ``names`` and those they are built from, in recipe order."""
        want, todo = set(), list(names)
        while todo:
            art = self.artifact(todo.pop())
            if art.name not in want:
                want.add(art.name)
                todo += [art.source] if art.source else []
        return [a for a in self.artifacts if a.name in want]


class _Lines:
    """Where each key sits in the TOML text (tomllib gives values, not lines): ``line(section, index,
    key)`` with section "" (the top), "protocol" or "artifact" (index: the n-th [[artifact]])."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"-]+)\s*\]\]?")
    KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[str, int, str], int] = {}
        self.headers: dict[tuple[str, int], int] = {}
        section, index, counts = "", 0, {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = self.HEADER.match(line)
            if header:
                table = header.group(2).strip('"')
                section = table.split(".")[0]
                if header.group(1) == "[[" and table == section:
                    counts[section] = counts.get(section, -1) + 1
                index = counts.get(section, 0)
                self.headers.setdefault((section, index), number)
                continue
            key = self.KEY.match(line)
            if key:
                self.keys.setdefault((section, index, key.group(1).strip('"')), number)

    def line(self, section: str, index: int = 0, *keys: str | None) -> int:
        """The line of the first of ``keys`` found (a key, or a top-level table's header), else of the
        table's header."""
        found = [self.keys[section, index, k] for k in keys if (section, index, k) in self.keys]
        found += [self.headers[k, 0] for k in keys if not section and (k, 0) in self.headers]
        return found[0] if found else self.headers.get((section, index), 1)


def load(path: str | Path) -> Recipe:
    """Read and check ``path``. InputError (exit 2) naming ``path:line`` for anything wrong: not TOML,
    an unknown key, format, method, gate or option, a bad value, a missing source, a duplicate name,
    an artifact built from one that does not exist or from itself."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the recipe: {getattr(exc, 'strerror', None) or exc}", path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{at.group(1)}" if at else path
        raise InputError(f"not valid TOML: {exc}", where) from None
    lines = _Lines(text)

    def fail(message: str, section: str = "", index: int = 0, *keys: str | None):
        raise InputError(message, f"{path}:{lines.line(section, index, *keys)}")

    _unknown(data, TOP_KEYS, "key", fail)
    base = path.parent.resolve()  # paths in the recipe are relative to it; absolute from here on
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        fail(f"name must be letters, digits, '.', '_' or '-', got {name!r}", "", 0, "name")
    source = _existing(data, "source", base, fail, required=True)
    _check_checkpoint(source, None, lambda m: fail(m, "", 0, "source"))
    reference = _existing(data, "reference", base, fail)
    _check_checkpoint(reference or source, "hf", lambda m: fail(m, "", 0, "reference" if reference else "source"))
    reference = reference or source
    protocol = data.get("protocol", {})
    if not isinstance(protocol, dict):
        fail("protocol must be a table ([protocol])", "", 0, "protocol")
    _unknown(protocol, PROTOCOL_KEYS, "protocol key", fail, "protocol")
    corpus = _existing(protocol, "corpus", base, fail, section="protocol")
    ctx = _count(protocol, "ctx", 512, 3, fail)
    windows = _count(protocol, "windows", 16, 1, fail)
    entries = data.get("artifact")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        fail("a recipe needs at least one [[artifact]] table", "", 0, "artifact")
    artifacts = [_artifact(entry, i, lines, fail) for i, entry in enumerate(entries)]
    _check_names(artifacts, fail)
    return Recipe(path, name, source, reference, corpus, ctx, windows, tuple(artifacts))


def _check_checkpoint(path: Path, fmt: str | None, fail) -> None:
    """A checkpoint gemport reads (the reference: an HF folder, which transformers runs)."""
    from gemport.errors import GemportError

    try:
        found = registry.detect(path)
    except GemportError as exc:
        fail(f"{path} is not a checkpoint gemport reads: {exc}")
    if fmt is not None and found != fmt:
        fail(f"the reference {path} must be a Hugging Face folder (it is {found}); set reference = an HF folder")


def _check_names(artifacts: list[Artifact], fail) -> None:
    """Unique names; ``from`` names an artifact listed before (so no cycles, and builds run in order)."""
    seen: set[str] = set()
    files: dict[str, str] = {}
    for i, art in enumerate(artifacts):
        if art.name in seen:
            fail(f"artifact {art.name!r} is listed twice", "artifact", i, "name")
        other = files.setdefault(art.filename.lower(), art.name)
        if other != art.name:
            fail(f"artifact {art.name!r} would be written to {art.filename}, as {other!r} is", "artifact", i, "name")
        if art.source is not None and art.source not in seen:
            where = "itself" if art.source == art.name else f"{art.source!r}, which is not listed before it"
            fail(f"artifact {art.name!r}: from names {where}", "artifact", i, "from")
        seen.add(art.name)


def _unknown(table: dict, known: tuple[str, ...], what: str, fail, section: str = "", index: int = 0) -> None:
    for key in table:
        if key not in known:
            fail(f"unknown {what} {key!r} (known: {', '.join(known)})", section, index, key)


def _existing(table: dict, key: str, base: Path, fail, required: bool = False, section: str = "") -> Path | None:
    value = table.get(key)
    if value is None:
        if required:
            fail(f"{key} is required (the model to build from)", section)
        return None
    if not isinstance(value, str) or not value:
        fail(f"{key} must be a path, got {value!r}", section, 0, key)
    found = (base / value).resolve()
    if not found.exists():
        fail(f"{key} {str(found)!r} does not exist", section, 0, key)
    return found


def _count(table: dict, key: str, default: int, least: int, fail) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        fail(f"{key} must be an integer >= {least}, got {value!r}", "protocol", 0, key)
    return value


def _artifact(entry: dict, index: int, lines: _Lines, fail) -> Artifact:
    def bad(message: str, *keys: str | None):
        name = entry.get("name")
        fail(f"artifact {name!r}: {message}" if isinstance(name, str) else message, "artifact", index, *keys)

    name = entry.get("name")
    if name is None:
        bad('every artifact needs a name (name = "...")', "name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        bad(
            f"an artifact's name starts with a letter or digit, then letters, digits, '.', '_' or '-'; got {name!r}",
            "name",
        )
    if name.lower() in RESERVED_NAMES:
        bad(f"the name {name!r} is one of the build's own files ({', '.join(RESERVED_NAMES)})", "name")
    fmt = entry.get("format")
    if fmt is None:
        bad(f"every artifact needs a format (gemport writes: {', '.join(registry.writers())})", "format")
    if fmt not in registry.writers():
        bad(f"unknown format {fmt!r} (gemport writes: {', '.join(registry.writers())})", "format")
    method = entry.get("method")
    if method is not None and method not in METHODS:
        bad(f"unknown method {method!r} (methods: {', '.join(METHODS)})", "method")
    source = entry.get("from")
    if source is not None and not isinstance(source, str):
        bad(f"from must be an artifact's name, got {source!r}", "from")
    validate = entry.get("validate", True)
    if not isinstance(validate, bool):
        bad(f"validate must be true or false, got {validate!r}", "validate")
    gates = entry.get("gates", {})
    if not isinstance(gates, dict):
        bad("gates must be a table, e.g. gates = { max_kld = 0.05 }", "gates")
    for gate, limit in gates.items():
        if gate not in GATES:
            bad(f"no gate {gate!r}: gates are {', '.join(GATES)} (KLD, |delta-ppl| %, top-1 %)", gate, "gates")
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit >= 0:
            bad(f"gate {gate} must be a number >= 0, got {limit!r}", gate, "gates")
        if gate == "min_top1" and limit > 100:
            bad(f"gate min_top1 is a percentage, at most 100; got {limit!r}", gate, "gates")
    if gates and not validate:
        bad("gates need validation (validate = false)", "gates")
    options = {k: v for k, v in entry.items() if k not in RESERVED}
    line = lines.line("artifact", index)
    art = Artifact(name, fmt, method, options, source, validate, dict(gates), dict(entry), line)
    _check_options(art, bad)
    return art


def _check_options(art: Artifact, bad) -> None:
    """Each option through gemport's own parser, as `gemport convert|quantize` would get it."""
    from gemport.cli import build_parser

    for key, value in art.options.items():
        if key in BUILDER_OPTIONS:
            bad(f"{key} is set by gemport build, not by a recipe", key)
        if not isinstance(value, str | int | float | bool) or (isinstance(value, str) and not value):
            bad(f"option {key} must be a string, number or true/false, got {value!r}", key)
    args = art.cli_args(Path("SRC"), Path("DST"))
    parser = build_parser()
    command = next(a for a in parser._actions if a.dest == "command").choices[args[0]]
    known = {o.lstrip("-").replace("-", "_"): a for a in command._actions for o in a.option_strings}
    for key, value in art.options.items():
        if key not in known:
            bad(f"unknown option {key!r} for gemport {args[0]} (see gemport {args[0]} --help)", key)
        _check_type(key, value, known[key], bad)

    def error(message: str):
        named = [o[2:].replace("-", "_") for o in re.findall(r"--[a-z0-9-]+", message)]
        bad(f"gemport {args[0]}: {message}", *[k for k in named if k in art.options], "quant")

    for p in (parser, command):
        p.error = error
    parsed = parser.parse_args(args)
    try:
        _check_values(parsed)
    except UnsupportedError as exc:
        error(str(exc))


def _check_type(key: str, value, action, bad) -> None:
    """TOML types as the option takes them: true/false for a flag, a number for a numeric option."""
    flag = action.nargs == 0
    if flag != isinstance(value, bool):
        bad(f"option {key} is a flag: true or false" if flag else f"option {key} takes a value, not {value!r}", key)
    numeric = getattr(action.type, "__name__", "") in ("int", "float", "_positive")
    if numeric and isinstance(value, str):
        bad(f"option {key} is a number: {key} = {value}, not {value!r}", key)


def _check_values(args) -> None:
    """The checks gemport convert / quantize make of their option values before reading anything."""
    from gemport import cli

    if args.command == "convert":
        args.dst_format = args.dst_format or ""
        cli._check_quant(args)
    else:
        cli._check_method_options(args)
        if args.dst_format == "gguf":
            cli._check_gguf_quantize(args)
