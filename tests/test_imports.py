"""The import graph of the package: no cycles, no upward imports, and the compiled steps free of the
heavy input, MIDI and checkpoint libraries, read from the source (function-level imports included).
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "musicgen_jax"
# Lowest layer first: a module may import only modules before it.
LAYERS = ("errors", "paths", "atomic", "rundir", "config", "store", "events", "distributions", "fused_lstm",
          "cudnn_lstm", "models", "losses", "optimizers", "config_checks", "steps", "sampling", "input_pipeline",
          "checkpointing", "runlock", "prepare", "generate", "plots", "train", "evaluate", "stats", "audio", "demo",
          "menu", "cli")
STEPS_LIBRARIES = {"jax", "flax", "optax", "numpy", "ml_collections"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
  """The package modules and the other top-level modules that a source file imports anywhere in it."""
  own, other = set(), set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      top, _, rest = node.module.partition(".")
      if top != "musicgen_jax":
        other.add(top)
      elif rest:
        own.add(rest.split(".")[0])
      else:
        own.update(alias.name for alias in node.names if alias.name != "__version__")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        top, _, rest = alias.name.partition(".")
        if top != "musicgen_jax":
          other.add(top)
        elif rest:
          own.add(rest.split(".")[0])
  return own, other


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """Each module's package imports, and its other imports."""
  parsed = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
  return {name: own for name, (own, _) in parsed.items()}, {name: other for name, (_, other) in parsed.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as the list of its modules (first repeated last), or None."""
  done, path = set(), []

  def visit(node: str) -> list[str] | None:
    if node in path:
      return path[path.index(node):] + [node]
    if node in done:
      return None
    path.append(node)
    for successor in sorted(graph.get(node, ())):
      cycle = visit(successor)
      if cycle:
        return cycle
    path.pop()
    done.add(node)
    return None

  return next(filter(None, map(visit, sorted(graph))), None)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo.extend(graph.get(node, ()))
  return seen


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
  own, _ = import_graph()
  assert find_cycle(own) is None


def test_every_module_imports_only_lower_layers():
  own, _ = import_graph()
  assert set(own) == set(LAYERS), "add the new module to LAYERS (and to the README's module list)"
  upward = {name: sorted(dep for dep in deps if LAYERS.index(dep) >= LAYERS.index(name)) for name, deps in own.items()}
  assert not {name: deps for name, deps in upward.items() if deps}


def test_steps_needs_only_jax_flax_optax_numpy_and_ml_collections():
  own, other = import_graph()
  modules = reachable(own, "steps")
  libraries = set().union(*(other[name] for name in modules)) - set(sys.stdlib_module_names) - {"__future__"}
  assert libraries <= STEPS_LIBRARIES, libraries
  assert not libraries & {"grain", "note_seq", "orbax", "tensorboardX", "mido", "matplotlib"}


@pytest.mark.parametrize("module", ["musicgen_jax", "musicgen_jax.config", "musicgen_jax.rundir"])
def test_light_modules_import_no_jax(module):
  import subprocess

  code = f"import sys, {module}; print(sorted(m for m in ('jax', 'flax', 'grain', 'orbax') if m in sys.modules))"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent)
  assert result.stdout.strip() == "[]"
