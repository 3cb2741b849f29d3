"""Every "spec N.N" citation in the repository resolves to a section of docs/original.md.

Pure text; no JAX.  A citation is "spec" (optionally followed by "section" or a section sign)
and a section number, plus any further numbers chained with ",", "/" or "and", e.g.
"spec 4.4, 4.5, 5.3", "spec 5.2/5.3", "spec 6 and 9.12", "spec 9.3c".  A number resolves
when docs/original.md has a Markdown heading that starts with it ("## 3. ...", "### 9.4 ...");
a trailing letter ("9.3c") additionally needs a list item "(c)" inside that heading's section.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "original.md"
SCANNED = ("adpe_jax", "configs", "benchmarks", "tests", "README.md")

_NUM = r"\d+(?:\.\d+)*[a-z]?"
CITATION = re.compile(rf"\bspec\s+(?:section\s+|§\s*)?({_NUM}(?:\s*(?:,|/|\band\b)\s*{_NUM})*)",
                      re.IGNORECASE)
_SPLIT = re.compile(rf"{_NUM}")
HEADING = re.compile(r"^(#{1,6})\s+(\d+(?:\.\d+)*)(?=[.\s])")
LETTER_ITEM = r"^\s*[-*]\s+(?:\*\*)?\({}\)"


def _files():
  for name in SCANNED:
    path = ROOT / name
    if path.is_file():
      yield path
    else:
      yield from sorted(p for p in path.rglob("*")
                        if p.suffix in (".py", ".md") and ".venv" not in p.parts)


def citations():
  """[(file:line, section)] for every cited section number."""
  found = []
  for path in _files():
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      for match in CITATION.finditer(line):
        for number in _SPLIT.findall(match.group(1)):
          found.append((f"{path.relative_to(ROOT)}:{lineno}", number))
  return found


def sections(doc_text):
  """{number: body text of that heading's section (up to the next heading of its level or above)}."""
  lines = doc_text.splitlines()
  heads = []
  for i, line in enumerate(lines):
    m = HEADING.match(line)
    if m:
      heads.append((i, len(m.group(1)), m.group(2)))
  out = {}
  for k, (i, level, number) in enumerate(heads):
    end = next((j for j, lvl, _ in heads[k + 1:] if lvl <= level), len(lines))
    out[number] = "\n".join(lines[i + 1:end])
  return out


def resolves(number, secs):
  m = re.fullmatch(r"(\d+(?:\.\d+)*)([a-z]?)", number)
  base, letter = m.group(1), m.group(2)
  if base not in secs:
    return False
  return not letter or re.search(LETTER_ITEM.format(letter), secs[base], re.MULTILINE) is not None


def test_every_spec_citation_resolves_to_a_section_of_docs_original():
  found = citations()
  # The collector itself must work: the package cites the spec dozens of times.
  assert len(found) >= 40 and {n for _, n in found} >= {"2.3", "4.4", "9.3c", "9.4"}, found
  secs = sections(DOC.read_text(encoding="utf-8"))
  missing = sorted(f"{where}: spec {n}" for where, n in found if not resolves(n, secs))
  assert not missing, "cited sections missing from docs/original.md:\n" + "\n".join(missing)
