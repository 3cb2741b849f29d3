"""The docs' claims: every "spec N.N" citation resolves to a section of docs/original.md;
README.md is a front page whose links (and those of docs/) resolve; docs/configuration.md
documents every field of every task's default config with its default; docs/architecture.md
names every module of the package.

Pure text, but for the config check, which imports adpe_jax.config.  A citation is "spec"
(optionally followed by "section" or a section sign) and a section number, plus any further
numbers chained with ",", "/" or "and", e.g.
"spec 4.4, 4.5, 5.3", "spec 5.2/5.3", "spec 6 and 9.12", "spec 9.3c".  A number resolves
when docs/original.md has a Markdown heading that starts with it ("## 3. ...", "### 9.4 ...");
a trailing letter ("9.3c") additionally needs a list item "(c)" inside that heading's section.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "original.md"
SCANNED = ("adpe_jax", "configs", "benchmarks", "tests", "docs", "launch", "README.md")

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


# -- README.md as a front page, and every link of the docs ------------------------------------

README = ROOT / "README.md"
README_LIMIT = 12_000   # bytes (issue 27: a front page; the rest lives in docs/)
LINKED = [README, ROOT / "launch" / "README.md", ROOT / "benchmarks" / "README.md",
          *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
  text = re.sub(r"[`*_]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: pathlib.Path) -> set:
  return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$",
                                                path.read_text(encoding="utf-8"), re.MULTILINE)}


def test_readme_is_a_front_page_with_the_commands():
  text = README.read_text(encoding="utf-8")
  assert len(text.encode("utf-8")) <= README_LIMIT, f"README.md is {len(text.encode())} bytes"
  for command in ("make demo", "make test", "make lint"):
    assert command in text, command
  assert "docs/" in text


def test_every_relative_link_of_the_docs_resolves():
  broken = []
  for page in LINKED:
    for lineno, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
      for target in LINK.findall(line):
        if re.match(r"[a-z]+:", target):
          continue  # https:, mailto: ...
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        where = f"{page.relative_to(ROOT)}:{lineno}: {target}"
        if not dest.exists():
          broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
          broken.append(f"{where} (no such heading)")
  assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_links_each_page_of_docs():
  text = README.read_text(encoding="utf-8")
  missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in text]
  assert not missing, f"README.md's table of contents lacks {missing}"


# -- docs/configuration.md: every field of every task's default config ----------------------

CONFIG_DOC = ROOT / "docs" / "configuration.md"
TASKS = ("pretrain", "finetune", "linprobe", "knn")   # the doc's default columns, in order
ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|(.*)\|\s*$")


def default_configs() -> dict:
  # Imported here: the rest of this module is pure text.
  from adpe_jax.config import finetune, pretrain, probe
  return {"pretrain": pretrain.base_config(), "finetune": finetune.finetune_config(),
          "linprobe": probe.linprobe_config(), "knn": probe.knn_config()}


def flat(config, prefix="") -> dict:
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def documented(text: str) -> dict:
  """{field: [default cell per task]} of the field tables (a row per field)."""
  rows = {}
  for line in text.splitlines():
    m = ROW.match(line)
    if m:
      cells = [c.strip() for c in m.group(2).split("|")]
      if len(cells) == len(TASKS) + 1:
        rows[m.group(1)] = cells[:len(TASKS)]
  return rows


def cell_matches(cell: str, value) -> bool:
  """The doc's default against the config's; "--" = the task has no such field."""
  text = cell.strip("`")
  if cell == "--":
    return False
  if isinstance(value, (tuple, list)):
    return True   # names (e.g. eval.evaluators): documented, not compared
  if isinstance(value, bool):
    return text == str(value)
  if isinstance(value, str):
    return text == (value or '""')
  try:
    return float(text) == float(value)
  except ValueError:
    return False


def config_doc_errors(text: str) -> list:
  rows = documented(text)
  errors = []
  for column, (task, config) in enumerate(default_configs().items()):
    for field, value in flat(config).items():
      if field not in rows:
        errors.append(f"{task}: {field} is not documented")
      elif not cell_matches(rows[field][column], value):
        errors.append(f"{task}: {field} documented as {rows[field][column]}, default {value!r}")
  return errors


def test_every_config_field_of_every_task_is_documented_with_its_default():
  errors = config_doc_errors(CONFIG_DOC.read_text(encoding="utf-8"))
  assert not errors, "docs/configuration.md:\n" + "\n".join(errors)


def test_a_field_missing_from_the_config_doc_is_caught():
  text = CONFIG_DOC.read_text(encoding="utf-8")
  without = "\n".join(l for l in text.splitlines() if not l.startswith("| `mask_ratio` |"))
  assert "pretrain: mask_ratio is not documented" in config_doc_errors(without)
  changed = text.replace("| `num_crops` | 4 |", "| `num_crops` | 8 |")
  assert any(e.startswith("pretrain: num_crops documented as 8") for e in
             config_doc_errors(changed))


# -- docs/architecture.md: every module of the package -----------------------------------------

ARCHITECTURE = ROOT / "docs" / "architecture.md"


def test_every_module_of_the_package_is_in_the_architecture_map():
  text = ARCHITECTURE.read_text(encoding="utf-8")
  missing = []
  for path in sorted((ROOT / "adpe_jax").rglob("*.py")):
    rel = path.relative_to(ROOT)
    name = f"{rel.parent.as_posix()}/" if path.name == "__init__.py" else rel.as_posix()
    if not re.search(rf"(?<![\w/]){re.escape(name)}(?![\w/])", text):
      missing.append(name)
  assert not missing, "docs/architecture.md does not name:\n" + "\n".join(missing)


def test_every_package_path_the_docs_name_exists():
  """A module moved or renamed leaves no stale path in the front page, docs/ or launch/."""
  pages = [README, ROOT / "launch" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  stale = sorted({f"{page.relative_to(ROOT)}: {name}"
                  for page in pages
                  for name in re.findall(r"adpe_jax/[\w/]+(?:\.py|/)", page.read_text("utf-8"))
                  if not (ROOT / name).exists()})
  assert not stale, "paths that do not exist:\n" + "\n".join(stale)
