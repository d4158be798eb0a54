"""README.md and docs/*.md name only what exists.

Each check reads the documents as text and looks every name up in the code:

- every ``FASTBERT_*`` environment variable is read somewhere (a quoted name in the code, or
  ``$NAME`` in a shell script);
- every ``python -m X`` entry point of fastbert or the benchmarks exists, and every ``--option``
  written on its command line is an option of its argparse parser (captured by calling the entry
  point's ``main`` with ``parse_args`` replaced, so nothing runs); an ``--option`` written alone
  must be an option of the entry points its paragraph names (of any entry point, or of a
  command line written in the docs, when it names none); options on a ``bash X.sh`` command line
  must appear in that script; the test files given to ``python -m pytest`` exist;
- every relative link resolves to a file, and its ``#anchor`` to a heading of that file;
- every path of the checkout written in backticks (``fastbert/x.py``, ``tests/x.py``; a top
  folder alone is not checked) exists, unless git ignores it;
- every ``fastbert.X`` name exists (an importable module, or an attribute of one).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN_PACKAGES = ("fastbert", "benchmarks")
CODE_SUFFIXES = {".py", ".sh", ".cpp", ".h", ".cu", ".cuh"}
CODE_DIRS = ("fastbert", "benchmarks", "csrc", "tests", ".ci", "examples")
PATH_ROOTS = ("fastbert", "benchmarks", "tests", "csrc", "examples", "docs", "kernels", ".ci")

ENV_VAR = re.compile(r"\bFASTBERT_[A-Z0-9_]*[A-Z0-9]\b")
# A command line: from "python -m X" to the end of its code span, line, shell separator or comment.
COMMAND = re.compile(r"\bpython3? -m ([\w.]+)([^`\n;&|#]*)")
SCRIPT = re.compile(r"\bbash ([\w./-]+\.sh)([^`\n;&|#]*)")
PY_FILE = re.compile(r"\bpython3? ([\w./-]+\.py)([^`\n;&|#]*)")  # setup.py's options are setuptools'
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PUBLIC_NAME = re.compile(r"(?<![\w./])fastbert(?:\.[A-Za-z_]\w*)+")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines; each table row is a block of its own."""
    blocks = []
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith("|"):
            blocks += block.splitlines()
        else:
            blocks.append(block)
    return blocks


# --- environment variables ---------------------------------------------------------------

def code_files() -> list[Path]:
    files = [ROOT / "setup.py"]
    for folder in CODE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and
                  (p.suffix in CODE_SUFFIXES or p.parent.name == ".ci")]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def unread_env_vars(text: str, sources: list[tuple[Path, str]]) -> list[str]:
    def read_in(name: str, path: Path, code: str) -> bool:
        if re.search(rf"[\"']{name}[\"']", code):
            return True
        shell = path.suffix == ".sh" or path.parent.name == ".ci"
        return shell and re.search(rf"\$\{{?{name}\b", code) is not None

    return sorted({n for n in ENV_VAR.findall(text) if not any(read_in(n, p, c) for p, c in sources)})


# --- entry points and options --------------------------------------------------------------

class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _stop(parser, *args, **kwargs):
    raise _Parsed(parser)


def entry_point_module(name: str) -> str | None:
    """The module ``python -m name`` runs, or None when there is none."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    if spec is None:
        return None
    return f"{name}.__main__" if spec.submodule_search_locations is not None else name


_options_cache: dict[str, set[str] | str] = {}


def entry_point_options(name: str) -> set[str] | str:
    """The options of ``python -m name``'s parser, subcommands' included, or why there are none."""
    if name not in _options_cache:
        _options_cache[name] = _read_options(name)
    return _options_cache[name]


def _read_options(name: str) -> set[str] | str:
    module_name = entry_point_module(name)
    if module_name is None:
        return f"no module {name}"
    main = getattr(importlib.import_module(module_name), "main", None)
    if main is None:
        return f"{module_name} has no main()"
    patched = pytest.MonkeyPatch()
    patched.setattr(argparse.ArgumentParser, "parse_args", _stop)
    patched.setattr(argparse.ArgumentParser, "parse_known_args", _stop)
    patched.setattr(sys, "argv", [name])
    try:
        main()
    except _Parsed as parsed:
        return _parser_options(parsed.parser)
    finally:
        patched.undo()
    return f"{module_name}.main() returned without parsing arguments"


def _parser_options(parser: argparse.ArgumentParser) -> set[str]:
    options = set()
    for action in parser._actions:
        options.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _parser_options(sub)
    return options


def is_own(module: str) -> bool:
    return module.split(".")[0] in OWN_PACKAGES


def command_line_problems(text: str) -> list[str]:
    problems = []
    for module, args in COMMAND.findall(text):
        if module == "pytest":  # the test files and folders it is given
            problems += [f"python -m pytest: no {arg}" for arg in args.split()
                         if re.fullmatch(r"tests/[\w./-]*(?:::\w+)?", arg) and not (ROOT / arg.split("::")[0]).exists()]
        if not is_own(module):
            continue
        options = entry_point_options(module)
        if isinstance(options, str):
            problems.append(f"python -m {module}: {options}")
            continue
        problems += [f"python -m {module}: no option {o}" for o in OPTION.findall(args) if o not in options]
    for script, args in SCRIPT.findall(text):
        path = ROOT / script
        if not path.is_file():
            problems.append(f"bash {script}: no such script")
            continue
        code = read(path)
        problems += [f"bash {script}: no option {o}" for o in OPTION.findall(args)
                     if not re.search(rf"(?<![\w-]){o}(?![\w-])", code)]
    problems += [f"python {script}: no such file" for script, _ in PY_FILE.findall(text) if not (ROOT / script).is_file()]
    return problems


def foreign_options(text: str) -> set[str]:
    """Options written on the command lines of other tools (pip, pytest, setup.py) in ``text``."""
    lines = [args for module, args in COMMAND.findall(text) if not is_own(module)]
    return {o for args in lines + [args for _, args in PY_FILE.findall(text)] for o in OPTION.findall(args)}


def lone_option_problems(text: str, known_foreign: set[str]) -> list[str]:
    problems = []
    all_modules = {m for m, _ in COMMAND.findall(text) if is_own(m)}
    for block in paragraphs(text):
        own_lines = {m for m, _ in COMMAND.findall(block) if is_own(m)}
        modules = own_lines or all_modules
        known = set(known_foreign)
        for module in modules:
            options = entry_point_options(module)
            if not isinstance(options, str):
                known |= options
        stripped = PY_FILE.sub("", SCRIPT.sub("", COMMAND.sub("", block)))  # command lines are checked on their own
        for option in OPTION.findall(stripped):
            if option not in known:
                where = ", ".join(sorted(own_lines)) if own_lines else "any entry point"
                problems.append(f"{option} is not an option of {where}: {block.strip()[:80]!r}")
    return problems


# --- links and paths --------------------------------------------------------------------------

def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", read(path), flags=re.M)}


def link_problems(doc: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            problems.append(f"link {target}: no file {file_part}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"link {target}: no heading #{anchor} in {path.name}")
    return problems


def ignored_by_git(path: str) -> bool:
    patterns = [line.strip().strip("/") for line in read(ROOT / ".gitignore").splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p in patterns for p in prefixes)


def path_problems(text: str) -> list[str]:
    problems = []
    for span in CODE_SPAN.findall(text):
        if not re.fullmatch(rf"(?:{'|'.join(map(re.escape, PATH_ROOTS))})/[\w.-]+[\w./-]*", span):
            continue
        if not (ROOT / span).exists() and not ignored_by_git(span):
            problems.append(f"path {span} does not exist")
    return problems


# --- fastbert.X names -------------------------------------------------------------------------

def missing_public_name(name: str) -> str | None:
    """None when ``name`` (fastbert.a.b...) is a module or an attribute reachable from one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ImportError:
            continue
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            return f"{name}: importing {module_name} failed ({exc})"
        for j in range(i, len(parts)):
            if not hasattr(obj, parts[j]):
                return f"{name}: {type(obj).__name__} {'.'.join(parts[:j])} has no {parts[j]}"
            obj = getattr(obj, parts[j])
        return None
    return f"{name}: no such module"


def public_name_problems(text: str) -> list[str]:
    problems = []
    for name in sorted(set(PUBLIC_NAME.findall(text))):
        if name in re.findall(r"\"(fastbert\.\w+)\"", read(ROOT / "setup.py")):
            continue  # an extension module setup.py builds: present only once built
        problem = missing_public_name(name)
        if problem:
            problems.append(problem)
    return problems


# --- the tests ------------------------------------------------------------------------------

def all_docs_text() -> str:
    return "\n\n".join(read(p) for p in DOCS)


@pytest.fixture(scope="module")
def sources():
    return [(p, read(p)) for p in code_files()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_environment_variables_the_docs_name_are_read(doc, sources):
    problems = unread_env_vars(read(doc), sources)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_entry_points_and_options_the_docs_name_exist(doc):
    text = read(doc)
    problems = command_line_problems(text) + lone_option_problems(text, foreign_options(all_docs_text()))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_paths_the_docs_give_exist(doc):
    text = read(doc)
    problems = link_problems(doc, text) + path_problems(text)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_fastbert_names_the_docs_mention_exist(doc):
    problems = public_name_problems(read(doc))
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_docs_exist():
    assert len(read(ROOT / "README.md").splitlines()) <= 200
    assert len(DOCS) > 1


def test_each_check_flags_a_wrong_name(sources, tmp_path):
    """The checks above find each kind of wrong name (so that their empty lists mean something)."""
    assert unread_env_vars("set `FASTBERT_NO_SUCH_VARIABLE=1`", sources) == ["FASTBERT_NO_SUCH_VARIABLE"]
    assert command_line_problems("`python -m fastbert.no_such_module`") == [
        "python -m fastbert.no_such_module: no module fastbert.no_such_module"]
    assert command_line_problems("`python -m benchmarks --quick --no-such-option`") == [
        "python -m benchmarks: no option --no-such-option"]
    assert command_line_problems("`python -m pytest -q tests/test_no_such_file.py`") == [
        "python -m pytest: no tests/test_no_such_file.py"]
    assert command_line_problems("`bash benchmarks/gpu_check.sh --no-such-option tests DIR`") == [
        "bash benchmarks/gpu_check.sh: no option --no-such-option"]
    assert len(lone_option_problems("`python -m fastbert.info` takes `--no-such-option`", set())) == 1
    assert lone_option_problems("`python -m fastbert.info` takes `--check`", set()) == []
    doc = tmp_path / "doc.md"
    doc.write_text("# A heading\n")
    assert link_problems(doc, "[x](no-such.md) [y](#a-heading) [z](#no-heading)") == [
        "link no-such.md: no file no-such.md", "link #no-heading: no heading #no-heading in doc.md"]
    assert path_problems("`fastbert/no_such.py`, `benchmarks/results/local/`") == [
        "path fastbert/no_such.py does not exist"]
    assert public_name_problems("`fastbert.no_such_name`, `fastbert.optimize`") == [
        "fastbert.no_such_name: module fastbert has no no_such_name"]
