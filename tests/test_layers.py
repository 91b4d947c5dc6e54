"""Imports go one way: no import cycles and no import against the layer order.

Every module under vlm_jax/ is parsed with ast, never imported; imports inside functions and
`if TYPE_CHECKING:` blocks count too. The layers are listed in vlm_jax/__init__.py.
"""

import ast
import pathlib
from collections.abc import Mapping, Set

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vlm_jax"

LAYERS = {  # group prefix -> rank; a module imports only lower ranks or its own group
  "vlm_jax.errors": 0,
  "vlm_jax.files": 0.5,
  "vlm_jax.xla_options": 0.75,
  "vlm_jax.config": 1,
  "vlm_jax.models": 2,
  "vlm_jax.data": 2,  # independent of each other
  "vlm_jax.losses": 1.5,  # jax only; below models, which use it (models.contrastive)
  "vlm_jax.parallel": 3,
  "vlm_jax.tasks": 4,
  "vlm_jax.build": 4.5,  # building a run from a config
  "vlm_jax.train": 5,
  "vlm_jax.infer": 5,  # independent of each other
  "vlm_jax.eval": 5.5,  # may use infer, never train
  "vlm_jax.convert": 6,  # Hugging Face in and out
  "vlm_jax.aot": 6.5,  # the train and generation programs compiled for a target (vlm-jax compile)
  "vlm_jax.api": 7,
  "vlm_jax": 7.25,  # the package __init__ (vlm_jax.load) is the api's front door
  "vlm_jax.chat": 7.4,  # the terminal conversation over a loaded model
  "vlm_jax.lmms": 7.4,  # lmms-eval's model interface over a loaded model
  "vlm_jax.cli": 7.5,
}
NO_JAX = {"jax", "flax", "optax", "orbax"}  # data is host-side: numpy and PIL only


def read_package() -> tuple[dict[str, str], set[str]]:
  """{module name: source} for every module under vlm_jax/, and the names that are packages."""
  sources, packages = {}, set()
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
      packages.add(".".join(parts))
    sources[".".join(parts)] = path.read_text()
  return sources, packages


def imported_names(module: str, source: str, is_package: bool) -> set[str]:
  """Absolute dotted names imported anywhere in a module; `from X import n` gives "X.n"."""
  names = set()
  for node in ast.walk(ast.parse(source, filename=module)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: a package's own name is its anchor, a module's is its parent
        parts = module.split(".")
        anchor = ".".join(parts[: len(parts) - node.level + is_package])
        base = ".".join(filter(None, (anchor, node.module)))
      names.update(f"{base}.{alias.name}" for alias in node.names)
  return names


def dependencies(sources: Mapping[str, str], packages: Set[str]) -> dict[str, set[str]]:
  """Module -> the modules of `sources` it imports: the longest module prefix of each name."""
  graph = {}
  for module, source in sources.items():
    graph[module] = set()
    for name in imported_names(module, source, module in packages):
      while name and name not in sources:
        name = name.rpartition(".")[0]
      if name and name != module:
        graph[module].add(name)
  return graph


def cycles(graph: Mapping[str, Set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module, and self-loops (Tarjan)."""
  index, low, stack, found = {}, {}, [], []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    for target in graph.get(node, ()):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
      if len(component) > 1 or node in graph.get(node, ()):
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return sorted(found)


def group(module: str) -> str | None:
  """The longest LAYERS prefix of module; the prefix "vlm_jax" names only the package itself."""
  if module == "vlm_jax":
    return module
  matches = [p for p in LAYERS if p != "vlm_jax" and (module == p or module.startswith(p + "."))]
  return max(matches, key=len, default=None)


def upward_imports(graph: Mapping[str, Set[str]]) -> list[str]:
  """Each import of a module whose group is of the same or a higher rank than the importer's."""
  found = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      a, b = group(module), group(target)
      if a and b and a != b and LAYERS[b] >= LAYERS[a]:
        found.append(f"{module} -> {target} (rank {LAYERS[a]} -> {LAYERS[b]})")
  return found


def jax_in_data(sources: Mapping[str, str], packages: Set[str]) -> list[str]:
  """Each import of jax, flax, optax or orbax by a module of vlm_jax.data."""
  return sorted(
    f"{module} -> {name}"
    for module, source in sources.items()
    if group(module) == "vlm_jax.data"
    for name in imported_names(module, source, module in packages)
    if name.split(".")[0] in NO_JAX
  )


def _listing(title: str, lines: list[str]) -> str:
  return f"{title}:\n  " + "\n  ".join(lines)


@pytest.fixture(scope="module")
def package() -> tuple[dict[str, str], set[str]]:
  return read_package()


def test_every_module_has_a_layer(package):
  missing = sorted(module for module in package[0] if group(module) is None)
  assert not missing, _listing("modules in no layer (place them in LAYERS)", missing)


def test_no_import_cycles(package):
  found = [", ".join(c) for c in cycles(dependencies(*package))]
  assert not found, _listing("import cycles (the modules of each, sorted)", found)


def test_imports_go_down_the_layers(package):
  found = upward_imports(dependencies(*package))
  assert not found, _listing("imports against the layer order", found)


def test_data_imports_no_jax(package):
  found = jax_in_data(*package)
  assert not found, _listing("vlm_jax.data imports jax/flax/optax/orbax", found)


def test_checker_catches_violations():
  sources = {
    "vlm_jax": "def load():\n  from vlm_jax.api import load\n",
    "vlm_jax.api": "import vlm_jax.models.x\n",
    "vlm_jax.models": "",
    "vlm_jax.models.x": "def f():\n  from vlm_jax.train import y\n",
    "vlm_jax.train": "",
    "vlm_jax.train.y": "from ..models import x\n",
    "vlm_jax.data": "from . import pipeline\n",
    "vlm_jax.data.pipeline": "if TYPE_CHECKING:\n  import jax.numpy\n  from vlm_jax.models import VLM\n",
    "vlm_jax.stray": "",
  }
  packages = {"vlm_jax", "vlm_jax.models", "vlm_jax.train", "vlm_jax.data"}
  graph = dependencies(sources, packages)
  assert graph["vlm_jax.data"] == {"vlm_jax.data.pipeline"}
  assert cycles(graph) == [["vlm_jax.models.x", "vlm_jax.train.y"]]
  assert cycles({"a": {"a"}}) == [["a"]]
  assert upward_imports(graph) == [
    "vlm_jax.data.pipeline -> vlm_jax.models (rank 2 -> 2)",
    "vlm_jax.models.x -> vlm_jax.train.y (rank 2 -> 5)",
  ]
  assert jax_in_data(sources, packages) == ["vlm_jax.data.pipeline -> jax.numpy"]
  assert [m for m in sources if group(m) is None] == ["vlm_jax.stray"]
