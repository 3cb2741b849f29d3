"""Run files go through etils.epath: a gs:// workdir (and data.dir) work, local ones as before.

(1) A static check (AST) that no builtin `open`, `os.path`, `os.makedirs`, `os.listdir`,
    `shutil`, `glob`... is left on run paths in the modules that touch run files.
(2) A real smoke run -- folder data source, config.json, metrics.jsonl, log.txt, the
    reconstruction PNG, summary.json, orbax checkpoints, a stop and the resume -- with
    `gs://` workdir and data.dir, offline: no other scheme reaches orbax's checkpoints
    (orbax gives tensorstore a `gcs` kvstore for gs:// and a local `file` one for anything
    else), so gs:// is served from a temporary directory on loopback:
      * tensorstore's own gcs driver (the arrays, OCDBT) talks HTTP to a small fake of the
        GCS JSON API below (TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING);
      * epath's gs:// backend is its fsspec one (as with EPATH_USE_TF=false: TF's GCS
        client cannot be pointed at a local endpoint) with fsspec's `gs` protocol mapped onto the same
        directory (in place of gcsfs);
      * orbax asks the bucket for its hierarchical-namespace flag through
        google-cloud-storage (not installed here): a stand-in module says "flat bucket";
      * clu's TensorBoard writer would go through TF's real GCS client: it is checked to
        receive the gs:// string and then made a logging-only writer.
    Everything is read back through gs:// (epath) and checked.
"""

import ast
import http.server
import importlib
import io
import json
import os
import pathlib
import sys
import threading
import time
import types
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from adpe_jax import storage, workdir_lock
from object_store_fake import LocalObjectStore

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "adpe_jax"

# -----------------------------------------------------------------------------------------
# (1) No local-only file call left on run paths.

def imports_storage(source: str, module: str) -> bool:
  """Whether `module` (a path under adpe_jax/) imports adpe_jax.storage, in any spelling:
  `from adpe_jax import storage`, `from adpe_jax.storage import ...`, `import
  adpe_jax.storage` or their relative forms (`from .. import storage`)."""
  package = ["adpe_jax", *pathlib.PurePosixPath(module).parent.parts]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      if any(a.name == "adpe_jax.storage" for a in node.names):
        return True
    elif isinstance(node, ast.ImportFrom):
      base = package[:len(package) - node.level + 1] if node.level else []
      name = ".".join(base + ([node.module] if node.module else []))
      if name == "adpe_jax.storage" or (
          name == "adpe_jax" and any(a.name == "storage" for a in node.names)):
        return True
  return False


# The modules that touch run files: storage itself and every module that imports it, so a
# new one is scanned without being listed here.
RUN_FILE_MODULES = ("storage.py",) + tuple(sorted(
    p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
    if imports_storage(p.read_text(), p.relative_to(PKG).as_posix())))

# os.* that name or touch a path. os.fspath / os.environ are fine: they read no file.
OS_PATH_CALLS = {"makedirs", "mkdir", "listdir", "scandir", "walk", "remove", "unlink",
                 "rename", "replace", "rmdir", "removedirs", "stat", "lstat", "open",
                 "chdir", "getcwd", "symlink", "link", "readlink", "access", "chmod"}
BANNED_MODULES = {"shutil", "glob", "pathlib", "tempfile", "os.path"}

# (module, function, call): the precise exceptions, each with its reason.
ALLOWED = {
    ("storage.py", "resolve", "os.path.abspath"):
        "the one place a local workdir is made absolute (orbax needs absolute local paths); "
        "only reached when the path has no scheme://",
    ("storage.py", "walk", "os.walk"):
        "local trees only (the remote branch uses epath's walk): torchvision's ImageFolder "
        "follows symlinked sub-folders and epath's local walk does not",
    ("checkpoint/checkpointer.py", "_identity", "os.stat"):
        "a local step directory's inode tells it from a later one of the same name; "
        "only reached when the path is not remote",
    ("checkpoint/rundir.py", "_lock_free", "os.open"):
        "whether another process holds a local lock file (flock); only reached when the "
        "path is not remote",
    ("train/wandb_log.py", None, "import tempfile"):
        "wandb writes its own files to a local directory: a gs:// run's go to a temporary one",
    ("train/wandb_log.py", "__init__", "tempfile.mkdtemp"):
        "wandb writes its own files to a local directory: a gs:// run's go to a temporary one",
}


def _dotted(node) -> str | None:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
    return ".".join(reversed(parts))
  return None


def _is_bytesio(node, buffers) -> bool:
  return ((isinstance(node, ast.Call) and _dotted(node.func) in ("io.BytesIO", "BytesIO"))
          or (isinstance(node, ast.Name) and node.id in buffers))


def local_file_calls(source: str, module: str) -> list[str]:
  """'module:line: what' for every local-only file call outside ALLOWED."""
  tree = ast.parse(source)
  out = []
  buffers = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
             and _is_bytesio(n.value, ()) for t in n.targets if isinstance(t, ast.Name)}

  def visit(node, func):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      func = node.name
    what = None
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES
               or a.name in BANNED_MODULES]
      what = f"import {', '.join(names)}" if names else None
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ""
      if mod in BANNED_MODULES or mod.split(".")[0] in BANNED_MODULES or (
          mod == "os" and any(a.name == "path" or a.name in OS_PATH_CALLS for a in node.names)):
        what = f"from {mod} import ..."
    elif isinstance(node, ast.Attribute) and _dotted(node):
      name = _dotted(node)
      if name.startswith("os.path.") or name.split(".")[0] in BANNED_MODULES - {"os.path"} or name.startswith("os.") and name.split(".")[1] in OS_PATH_CALLS:
        what = name
    elif isinstance(node, ast.Call):
      name = _dotted(node.func)
      if name in ("open", "io.open"):
        what = f"{name}()"
      elif name in ("Image.open", "PIL.Image.open") and not (
          node.args and _is_bytesio(node.args[0], buffers)):
        what = f"{name}(<path>)"  # PIL reading a path itself (local only)
      elif (isinstance(node.func, ast.Attribute) and node.func.attr == "save"
            and "Image" in ast.unparse(node.func.value)
            and not (node.args and _is_bytesio(node.args[0], buffers))):
        what = "PIL .save(<path>)"
    if what and (module, func, what.rstrip("()")) not in ALLOWED:
      out.append(f"{module}:{node.lineno}: {what}")
    for child in ast.iter_child_nodes(node):
      if what and isinstance(node, ast.Attribute):
        break  # os.path.join: report once, not also os.path
      visit(child, func)

  visit(tree, None)
  return out


def test_the_scanned_modules_are_those_that_import_storage():
  # The derivation must find the package's run-file modules (seven were listed by hand).
  assert len(RUN_FILE_MODULES) >= 7 and {
      "storage.py", "checkpoint/checkpointer.py", "checkpoint/rundir.py", "data/folder.py",
      "data/sources.py"} <= set(RUN_FILE_MODULES), RUN_FILE_MODULES
  for snippet, module in [("from adpe_jax import parallel, storage\n", "x.py"),
                          ("from adpe_jax.storage import resolve\n", "x.py"),
                          ("import adpe_jax.storage\n", "x.py"),
                          ("from .. import storage\n", "train/x.py"),
                          ("from . import storage\n", "x.py"),
                          ("from ..storage import resolve\n", "data/x.py"),
                          ("def f():\n  from adpe_jax import storage\n", "x.py")]:
    assert imports_storage(snippet, module), snippet
  for snippet, module in [("from google.cloud import storage\n", "storage.py"),
                          ("from . import storage\n", "train/x.py"),  # adpe_jax.train.storage
                          ("import storage\n", "x.py"),
                          ("from adpe_jax import parallel\n", "x.py")]:
    assert not imports_storage(snippet, module), snippet


@pytest.mark.parametrize("module", RUN_FILE_MODULES)
def test_no_local_only_file_calls_on_run_paths(module):
  found = local_file_calls((PKG / module).read_text(), module)
  assert not found, "local-only file calls on run paths (use adpe_jax.storage):\n" + \
      "\n".join(found)


@pytest.mark.parametrize("snippet,expected", [
    ("def f(w):\n  with open(w + '/x') as h:\n    return h.read()\n", "open()"),
    ("import os\ndef f(w):\n  return os.path.join(w, 'x')\n", "os.path.join"),
    ("import os\ndef f(w):\n  os.makedirs(w, exist_ok=True)\n", "os.makedirs"),
    ("import os\ndef f(w):\n  return os.listdir(w)\n", "os.listdir"),
    ("import shutil\ndef f(w):\n  shutil.rmtree(w)\n", "import shutil"),
    ("import glob\ndef f(w):\n  return glob.glob(w)\n", "import glob"),
    ("from os.path import join\n", "from os.path import ..."),
    ("from PIL import Image\ndef f(p):\n  return Image.open(p)\n", "Image.open(<path>)"),
    ("from PIL import Image\ndef f(a, p):\n  Image.fromarray(a).save(p)\n", "PIL .save(<path>)"),
    ("import os\ndef other(w):\n  return os.path.abspath(w)\n", "os.path.abspath"),
])
def test_the_static_check_catches_each_call(snippet, expected):
  for module in RUN_FILE_MODULES:  # also where one exception exists (storage.py)
    found = local_file_calls((PKG / module).read_text() + "\n\n" + snippet, module)
    assert any(f.endswith(expected) for f in found), (module, found)
  # The allowed forms stay allowed.
  ok = ("import io\nfrom PIL import Image\ndef f(a, data):\n  b = io.BytesIO()\n"
        "  Image.fromarray(a).save(b, format='PNG')\n"
        "  return Image.open(io.BytesIO(data))\n")
  assert local_file_calls(ok, "x.py") == []


# -----------------------------------------------------------------------------------------
# storage.resolve: local paths as before, scheme:// paths untouched.


def test_resolve_local_and_remote(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(storage.resolve("run")) == os.path.join(str(tmp_path), "run")
  assert os.fspath(storage.resolve(tmp_path / "a")) == str(tmp_path / "a")
  assert os.fspath(storage.resolve("gs://bucket/dir/run")) == "gs://bucket/dir/run"
  assert os.fspath(storage.resolve("gs://bucket/run") / "checkpoints") == \
      "gs://bucket/run/checkpoints"
  from adpe_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="memory://"):  # never a local dir named memory:
    storage.resolve("memory://run")
  assert not any(tmp_path.iterdir())


def test_local_append_and_read(tmp_path):
  p = tmp_path / "sub" / "log.txt"
  storage.makedirs(p.parent)
  assert storage.read_text(p) is None
  storage.append_text(p, "a\n")
  storage.append_text(p, "b\n")
  assert p.read_text() == "a\nb\n" and storage.read_text(p) == "a\nb\n"


# -----------------------------------------------------------------------------------------
# (2) gs:// served from a local directory: a fake GCS JSON API for tensorstore, fsspec for
# epath, both on the same files.


class _FakeGcsHandler(http.server.BaseHTTPRequestHandler):
  """The part of the GCS JSON API tensorstore's `gcs` kvstore uses: media upload with
  ifGenerationMatch, media / metadata GET with ifGeneration(Not)Match and Range, list with
  prefix / startOffset / endOffset, DELETE. Objects are files under `root/<bucket>/`."""

  protocol_version = "HTTP/1.1"
  root: pathlib.Path
  generations: dict = {}  # file -> (generation, mtime_ns it was written with)
  requests: list = []
  lock = threading.Lock()

  def log_message(self, *args):
    pass

  def _send(self, code, body=b"", headers=None, ctype="application/json"):
    if isinstance(body, dict):
      body = json.dumps(body).encode()
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, str(v))
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _generation(self, f: pathlib.Path) -> int:
    if not f.is_file():
      return 0
    gen, mtime = self.generations.get(str(f), (None, None))
    mtime_now = f.stat().st_mtime_ns
    return gen if mtime == mtime_now else mtime_now  # written by epath's side: its mtime

  def _meta(self, bucket, name, f):
    return {"kind": "storage#object", "bucket": bucket, "name": name, "metageneration": "1",
            "generation": str(self._generation(f)), "size": str(f.stat().st_size)}

  def _target(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    parts = url.path.split("/")
    self.requests.append((self.command, urllib.parse.unquote(url.path), query))
    return parts, query

  def _precondition(self, f, query):
    gen = self._generation(f)
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != gen:
      return 412
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == gen:
      return 304
    return None

  def do_GET(self):
    parts, query = self._target()
    if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
      return self._send(400, {"error": f"not faked: GET {self.path}"})
    bucket = parts[4]
    if len(parts) == 6 or parts[6:] == [""]:
      return self._list(bucket, query)
    name = urllib.parse.unquote("/".join(parts[6:]))
    f = self.root / bucket / name
    with self.lock:
      if not f.is_file():
        return self._send(404, {"error": {"code": 404}})
      code = self._precondition(f, query)
      if code:
        return self._send(code, b"" if code == 304 else {"error": {"code": code}})
      if query.get("alt") != "media":
        return self._send(200, self._meta(bucket, name, f))
      gen, data = self._generation(f), f.read_bytes()
    headers = {"x-goog-generation": gen}
    if self.headers.get("Range"):
      first, last = self.headers["Range"].split("=")[1].split("-")
      first, last = int(first), (int(last) if last else len(data) - 1)
      headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
      return self._send(206, data[first:last + 1], headers, "application/octet-stream")
    return self._send(200, data, headers, "application/octet-stream")

  def _list(self, bucket, query):
    base, names = self.root / bucket, []
    for dirpath, _, files in os.walk(base):
      for fn in files:
        n = os.path.relpath(os.path.join(dirpath, fn), base)
        if (n.startswith(query.get("prefix", "")) and n >= query.get("startOffset", "")
            and ("endOffset" not in query or n < query["endOffset"])):
          names.append(n)
    with self.lock:
      items = [self._meta(bucket, n, base / n) for n in sorted(names)]
    self._send(200, {"kind": "storage#objects", "items": items})

  def do_POST(self):
    parts, query = self._target()
    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    if parts[1:5] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != "media":
      return self._send(400, {"error": f"not faked: POST {self.path}"})
    bucket, name = parts[5], query["name"]
    f = self.root / bucket / name
    with self.lock:
      if self._precondition(f, query):
        return self._send(412, {"error": {"code": 412}})
      f.parent.mkdir(parents=True, exist_ok=True)
      tmp = f.with_name(f.name + ".upload")
      tmp.write_bytes(data)
      os.replace(tmp, f)
      self.generations[str(f)] = (time.time_ns(), f.stat().st_mtime_ns)
      return self._send(200, self._meta(bucket, name, f))

  def do_DELETE(self):
    parts, query = self._target()
    f = self.root / parts[4] / urllib.parse.unquote("/".join(parts[6:]))
    with self.lock:
      if not f.is_file():
        return self._send(404, {"error": {"code": 404}})
      if self._precondition(f, query):
        return self._send(412, {"error": {"code": 412}})
      f.unlink()
    self._send(204)


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
  """Serves gs://<bucket>/... from a local directory to tensorstore, epath and orbax."""
  import fsspec
  from etils.epath import backend as epath_backend
  from etils.epath import gpath as epath_gpath
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  from orbax.checkpoint._src.path import gcs_utils

  fsspec_registry = importlib.import_module("fsspec.registry")  # fsspec.registry: a view
  root = tmp_path_factory.mktemp("fake_gcs")
  _FakeGcsHandler.root = root
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeGcsHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()

  class FakeGcsFileSystem(DirFileSystem):
    """fsspec `gs://bucket/key` -> `root/bucket/key` (what gcsfs would be on a TPU VM)."""
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):  # noqa: ARG002 (gcsfs options)
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

  class FlatBucket:
    hierarchical_namespace_enabled = False

  cloud_storage = types.ModuleType("google.cloud.storage")
  cloud_storage.Client = lambda *a, **k: types.SimpleNamespace(
      get_bucket=lambda name: FlatBucket())

  saved = {k: fsspec_registry._registry.get(k) for k in ("gs", "gcs")}
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{server.server_address[1]}")
    mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "offline")
    # epath's fsspec backend for gs:// (as EPATH_USE_TF=false; epath caches that flag).
    mp.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    mp.setitem(sys.modules, "google.cloud.storage", cloud_storage)
    # The workdir lease (adpe_jax.workdir_lock) in a local fake object store: this fake
    # google.cloud.storage has no blobs.
    lease_root = tmp_path_factory.mktemp("fake_gcs_leases")
    mp.setattr(workdir_lock, "object_store_for", lambda workdir: (
        LocalObjectStore(lease_root),
        workdir.split("://", 1)[1].rstrip("/") + "/" + workdir_lock.LOCK_NAME))
    for proto in ("gs", "gcs"):
      fsspec.register_implementation(proto, FakeGcsFileSystem, clobber=True)
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    gcs_utils.get_bucket.cache_clear()
    try:
      yield types.SimpleNamespace(root=root, requests=_FakeGcsHandler.requests)
    finally:
      for proto, impl in saved.items():
        if impl is None:
          fsspec_registry._registry.pop(proto, None)
        else:
          fsspec.register_implementation(proto, impl, clobber=True)
      epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
      gcs_utils.get_bucket.cache_clear()
      server.shutdown()
      server.server_close()


def _write_image_folder(url: str, per_class: int = 8) -> None:
  """url/train/<class>/<k>.png: smooth 28x28 RGB pictures, written through epath."""
  rng = np.random.default_rng(0)
  for c in range(2):
    for k in range(per_class):
      base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
      picture = np.kron(base, np.ones((7, 7, 1), np.uint8))
      buf = io.BytesIO()
      Image.fromarray(picture).save(buf, format="PNG")
      storage.makedirs(f"{url}/train/class_{c}")
      storage.write_bytes(f"{url}/train/class_{c}/{k}.png", buf.getvalue())


def test_smoke_run_stop_and_resume_on_gs(fake_gcs, tmp_path, monkeypatch):
  from adpe_jax.config import pretrain as pretrain_config
  from adpe_jax.checkpoint import Checkpointer
  from adpe_jax.train.pretrain import run_metadata, train_and_evaluate
  from test_tf_free import read_event_file

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a gs:// path must never become a local directory here

  data_url, work = "gs://adpe-test/data", "gs://adpe-test/runs/smoke"
  _write_image_folder(data_url)
  c = pretrain_config.apply_smoke(pretrain_config.base_config())
  c.data.source, c.data.dir = "folder", data_url
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 1, 2
  c.max_steps_per_run = 2

  first = train_and_evaluate(c, work)
  assert first["summary"]["status"] == "stopped" and first["summary"]["steps"] == 2
  wd = storage.resolve(work)
  assert json.loads(storage.read_text(wd / "summary.json"))["status"] == "stopped"
  second = train_and_evaluate(c, work)  # the same command continues from the checkpoint
  assert [r["step"] for r in second["history"]] == [3, 4]

  # Everything read back through gs:// (epath).
  assert json.loads(storage.read_text(wd / "config.json"))["data"]["dir"] == data_url
  records = [json.loads(line) for line in storage.read_text(wd / "metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert [r["loss"] for r in records[2:]] == [r["loss"] for r in second["history"]]
  log_lines = storage.read_text(wd / "log.txt").splitlines()
  assert [line.split(" step=")[1].split()[0] for line in log_lines] == ["1", "2", "3", "4"]
  summary = json.loads(storage.read_text(wd / "summary.json"))
  assert summary["status"] == "finished" and summary["steps"] == 4
  assert summary["final_loss"] == records[-1]["loss"]
  png = Image.open(io.BytesIO(storage.read_bytes(wd / "reconstructions.png")))
  assert png.format == "PNG" and png.mode == "RGB" and png.size[0] > 0
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir())
  assert steps == [2, 4]
  assert all((wd / "checkpoints" / str(s) / "commit_success.txt").exists() for s in steps)
  ck = Checkpointer(work, every_steps=2, metadata=run_metadata(c))
  assert ck.latest_step() == 4 and str(ck.step_path(4)) == f"{work}/checkpoints/4"
  assert ck.read_metadata()["data_step"] == 4
  ck.close()

  # The arrays went through tensorstore's gcs driver (HTTP), the rest through epath.
  uploads = [q.get("name", "") for m, _, q in fake_gcs.requests if m == "POST"]
  assert any(n.startswith("runs/smoke/checkpoints/4/state/") for n in uploads), uploads[:5]
  # TensorBoard: rolled event objects (an object cannot be appended to), one set per run,
  # each object a complete event file; together they hold every logged loss.
  names = sorted(p.name for p in wd.iterdir() if p.name.startswith("events.out.tfevents."))
  assert len(names) >= 4 and all(n.rsplit(".", 1)[1].isdigit() for n in names), names
  events = [e for n in names for e in read_event_file(storage.read_bytes(wd / n))]
  assert all(read_event_file(storage.read_bytes(wd / n))[0].file_version == "brain.Event:2"
             for n in names)
  losses = [(e.step, v.simple_value) for e in events for v in e.summary.value
            if v.tag == "loss"]
  assert [s for s, _ in losses] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in records], rtol=1e-6)
  assert not any(cwd.iterdir()), list(cwd.iterdir())  # no local `gs:` directory

  # A finished run re-run changes nothing (summary read back through gs://).
  finished = storage.read_text(wd / "summary.json")
  again = train_and_evaluate(c, work)
  assert again["history"] == [] and storage.read_text(wd / "summary.json") == finished


def test_checkpoints_on_gs_need_google_cloud_storage(fake_gcs, monkeypatch):
  from adpe_jax.checkpoint import CheckpointError, Checkpointer
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)  # not installed
  with pytest.raises(CheckpointError, match="pip install google-cloud-storage"):
    Checkpointer("gs://adpe-test/runs/other", every_steps=1)


def test_a_gs_checkpoint_is_complete_once_its_commit_file_is_written(fake_gcs):
  """On gs:// orbax writes `<step>` directly and commit_success.txt last (no atomic rename):
  the one listing of complete checkpoints (`checkpoint.rundir`) counts what orbax counts."""
  from adpe_jax.checkpoint import Checkpointer, rundir
  work = "gs://adpe-test/runs/listing"
  ckdir = rundir.checkpoints_dir(work)
  for name, done in (("3", True), ("5", False), ("7.orbax-checkpoint-tmp", False)):
    storage.makedirs(ckdir / name / "state")
    if done:
      storage.write_text(ckdir / name / rundir.COMMIT_FILE, "")
  assert rundir.complete_steps(ckdir) == [3]
  assert str(rundir.newest_checkpoint(work)) == f"{work}/checkpoints/3"
  with Checkpointer(work, every_steps=1) as ck:
    assert ck.all_steps() == [3]
