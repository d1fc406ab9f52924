"""The repository's documents can be rerun by a reader: no path of one machine in them, and every script they cite
is committed (issue #33)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# an absolute path into a home, a temporary or a work folder of some machine
MACHINE_PATH = re.compile(r"(?<![\w.~-])(/(?:home|Users|root|tmp|work|mnt|scratch|var/folders|private/var)/"
                          r"[^\s`'\")]*)")
SCRIPT = re.compile(r"\b((?:studies|benchmarks|examples)/[\w./-]+\.py)\b")


def test_no_document_names_a_path_of_one_machine():
    found = [f"{doc.relative_to(ROOT)}:{n}: {m.group(1)}" for doc in DOCUMENTS
             for n, line in enumerate(doc.read_text().splitlines(), 1) for m in MACHINE_PATH.finditer(line)]
    assert not found, "write paths relative to the repository (outputs under runs/):\n" + "\n".join(found)


def test_every_script_a_document_cites_is_committed():
    cited = {(doc.relative_to(ROOT), m.group(1)) for doc in DOCUMENTS for m in SCRIPT.finditer(doc.read_text())}
    assert any(doc.name == "RESULTS.md" for doc, _ in cited)  # the pattern finds RESULTS.md's commands
    missing = sorted(f"{doc}: {script}" for doc, script in cited if not (ROOT / script).is_file())
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_the_path_pattern_catches_machine_paths_and_spares_relative_ones():
    for text in ("out /tmp/run1 here", "see /home/ana/memloc/runs", "(/work/main/RESULTS.md)", "`/Users/x/y`"):
        assert MACHINE_PATH.search(text), text
    for text in ("runs/tmp/x", "../shared/data/MNIST/raw", "a/home/b", "~/tmp", "and/or", "1/2 of /s"):
        assert not MACHINE_PATH.search(text), text
