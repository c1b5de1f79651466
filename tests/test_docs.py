"""The docs name only what exists: every repository file and link, every `common.NAME`, and every option of
every command they show, checked against the scripts' own parsers."""

import importlib
import re
import shlex

import pytest

import common
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {p.name for p in ROOT.glob("*.py")} | {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*")}


def doc_id(path):
    return str(path.relative_to(ROOT))


def commands(text):
    """Each `python SCRIPT.py ...` line of the text (code blocks and inline code), as (script, tokens)."""
    found = []
    for line in re.findall(r"python3? ((?:benchmarks/)?\w+\.py\b[^`\n|]*)", text):
        line = line.split("#")[0].replace("\\", " ")
        try:
            tokens = shlex.split(line)
        except ValueError:
            continue
        found.append((tokens[0], tokens[1:]))
    return found


def options_of(script):
    """The option strings a script accepts (the sweep: also every method script's, which pass through)."""
    if "/" in script:
        return None  # benchmarks: checked by name in their source
    module = importlib.import_module(script.removesuffix(".py"))
    if not hasattr(module, "get_parser"):
        return None
    if script == "figures.py":
        return {"--out"}
    accepted = {s for a in module.get_parser()._actions for s in a.option_strings}
    if script == "simulate_missing.py":
        for method in module.METHODS:
            accepted |= {s for a in importlib.import_module(method).get_parser()._actions for s in a.option_strings}
    return accepted


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_repository_file_and_link_the_docs_name_exists(doc):
    text = doc.read_text()
    missing = []
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # Markdown links to local files
        if not (doc.parent / link).exists():
            missing.append(link)
    for name in re.findall(r"`((?:docs/|benchmarks/|tests/)?\w+\.(?:py|sh))\b", text):
        if not ((ROOT / name).exists() or (doc.parent / name).exists()):
            missing.append(name)
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_common_name_the_docs_use_exists(doc):
    names = set(re.findall(r"\bcommon\.(\w+)", doc.read_text())) - {"py"}  # common.py itself
    assert [n for n in sorted(names) if not hasattr(common, n)] == []


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_option_of_every_command_the_docs_show_exists(doc):
    unknown = []
    for script, tokens in commands(doc.read_text()):
        if script == "METHOD.py":  # a placeholder for any method script
            continue
        assert script in SCRIPTS, script
        accepted = options_of(script)
        if accepted is None:
            source = (ROOT / script).read_text()
            unknown += [f"{script} {t}" for t in tokens if t.startswith("--") and f'"{t.split("=")[0]}"' not in source]
            continue
        for t in tokens:
            if t.startswith("--") and t.split("=")[0] not in accepted:
                unknown.append(f"{script} {t}")
    assert unknown == []


def test_the_docs_show_commands_at_all():
    assert sum(len(commands(d.read_text())) for d in DOCS) > 30


def test_ci_runs_the_readmes_two_commands_exactly_as_printed():
    blocks = re.findall(r"\n\n((?:    \S.*\n)+)", (ROOT / "README.md").read_text())
    install, tests = (b.strip() for b in blocks[:2])  # the front door: install and run, then the tests
    assert install.startswith("pip install -r requirements.txt") and tests.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and tests in ci
    assert ci.index(install) < ci.index(tests) < ci.index(next(line for line in ci if "pip install -q" in line))


# Words that tell how the code got here rather than what it is (git log keeps the story).
HISTORY = (
    "once escaped",
    "unchanged since",
    "is unchanged",
    "are unchanged",
    "a first pass",
    "used to",
    "no longer",
    "was lent",
    "previously",
    "the old ",
    "now reads",
    "we changed",
    "bit for bit",
)


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_the_docs_describe_the_code_as_it_is_not_its_history(doc):
    text = doc.read_text().lower()
    assert [w for w in HISTORY if re.search(rf"\b{w}\b", text)] == []


def test_every_number_the_readme_quotes_with_its_spread_is_in_the_results():
    readme, results = (ROOT / "README.md").read_text(), (ROOT / "docs" / "results.md").read_text()
    quoted = re.findall(r"\d\.\d{3} ± \d\.\d{3}", readme)
    assert quoted and [q for q in quoted if q not in results] == []


def test_the_readme_names_every_script_and_module():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in sorted(ROOT.glob("*.py")) if f"`{p.name}`" not in readme] == []


def test_the_table_of_networks_in_model_pt_names_every_method():
    import figures
    from tests.conftest import METHODS

    runs = (ROOT / "docs" / "runs.md").read_text()
    table = runs[runs.index("The networks in `model.pt`") :].split("\n\n")[1]
    assert [m for m in METHODS if f" {figures.PAPER_NAMES[m]}" not in table.replace(",", " ")] == []


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_table_is_well_formed_and_appears_once(doc):
    """A row opens and closes with '|' and has its header's columns; no table's body is printed twice."""
    tables, current = [], []
    for line in doc.read_text().splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    for table in tables:
        width = [row.replace("\\|", "").count("|") for row in table]  # an escaped \| is text
        assert [r for r, w in zip(table, width) if not r.rstrip().endswith("|") or w != width[0]] == [], table[0]
    bodies = ["\n".join(t[2:]) for t in tables if len(t) > 2]
    assert [b.splitlines()[0] for b in bodies if bodies.count(b) > 1] == []
