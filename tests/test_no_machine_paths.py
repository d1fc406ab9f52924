"""Every number in the documents can be rerun from the repository (issue #33, "Every number rerunnable").

Two checks over RESULTS.md, BENCHMARKS.md, README.md and docs/*.md:

* no absolute path of one machine: a home folder (/home/NAME, /Users/NAME, /root), a temporary folder (/tmp,
  /var/tmp, /var/folders, /private/var), a work or scratch folder (/work, /scratch, /mnt) or a Windows drive
  (C:\\...). A reader's machine has none of them, so a number whose script or output lives there cannot be rerun:
  cite the committed script and write outputs under a relative runs/ folder. Allowed: URLs (stripped first), paths
  that only contain such a word (runs/tmp, src/work), the home shorthand ~/ (a place every machine has, e.g. a
  cache), and placeholders such as /path/to/model, which name no machine's folder. A placeholder must not look like
  a real one: write /path/to/x, not /home/you/x.
* every studies/NAME.py and benchmarks/NAME.py the documents cite is a file of the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md", ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# a path starts where no path or word character comes before it: "runs/tmp" and "src/work" are not absolute
REST = r"[^\s`'\")\]]*"  # the rest of the path, for the message
MACHINE_PATH = re.compile(
    r"(?<![\w./~-])("
    r"/(?:home|Users)/[^\s/`'\")\]]+" + REST  # a home folder: /home/alice, /Users/alice
    + r"|/root(?=[/\s`'\").,:;\]]|$)" + REST
    + r"|/(?:tmp|var/tmp|var/folders|private/var|work|scratch|mnt)(?=[/\s`'\").,:;\]-]|$)" + REST
    + r"|[A-Za-z]:\\\\?" + REST  # C:\Users\..., C:\\Users
    + r")")
SCRIPT = re.compile(r"(?<![\w./-])((?:studies|benchmarks)/[\w./-]*?\w\.py)\b")


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every absolute path of a machine in `text`, URLs left out."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in MACHINE_PATH.finditer(URL.sub(" ", line)):
            found.append((number, match.group(1)))
    return found


def cited_scripts(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every studies/*.py or benchmarks/*.py in `text`."""
    return [(number, m.group(1)) for number, line in enumerate(text.splitlines(), 1) for m in SCRIPT.finditer(line)]


def test_the_documents_are_there():
    names = {p.name for p in DOCUMENTS}
    assert {"RESULTS.md", "BENCHMARKS.md", "README.md", "index.md"} <= names


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_absolute_path_of_a_machine(doc: Path):
    found = machine_paths(doc.read_text(encoding="utf-8"))
    assert not found, (f"{doc.relative_to(ROOT)} cites a folder of one machine (line: path): {found}; cite the "
                       "committed script and a relative runs/ folder instead")


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_script_is_committed(doc: Path):
    missing = [(n, p) for n, p in cited_scripts(doc.read_text(encoding="utf-8")) if not (ROOT / p).is_file()]
    assert not missing, f"{doc.relative_to(ROOT)} cites scripts the repository does not have: {missing}"


@pytest.mark.parametrize("text", [
    "script `/work/runs/run_posthoc.py`, out `/work/runs/posthoc-plain.json`",  # what RESULTS.md once said
    "out /tmp/bench", "(`/tmp`-style micro-benchmarks)", "cd /home/alice/memloc", "/Users/bob/x.npz",
    "HF_HOME=/root/.cache", "see /var/folders/xy/T/run", "/scratch/runs", "C:\\Users\\me\\runs", "/mnt/data",
])
def test_machine_paths_are_found(text: str):
    assert machine_paths(text), text


@pytest.mark.parametrize("text", [
    "https://github.com/home/tmp/work", "runs/tmp/x", "src/memloc/work", "memloc audit /path/to/model",
    "~/.cache/huggingface", "runs/bench-localize-tinymem2-r4", "a/b 1:2", "hf:./models/gpt2", "file:///tmp/x",
])
def test_other_paths_are_not(text: str):
    assert not machine_paths(text), text


def test_cited_scripts_are_found():
    text = "`python studies/weight_units.py --layers 2` and benchmarks/lm_scale.py; not my_studies/x.py"
    assert [p for _, p in cited_scripts(text)] == ["studies/weight_units.py", "benchmarks/lm_scale.py"]
