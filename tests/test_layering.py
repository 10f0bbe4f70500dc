"""No module imports a layer above its own: config <- layers <- encoders/data <- fusion <- model <- inference <-
eval/train <- commands/demo/bench <- cli (the README's map). The config reads the model's choices from the
registries that implement them, at check time: the only downward-looking imports allowed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlm"
RANK = {
    "mlm.errors": 0, "mlm.config": 0, "mlm.config_rules": 0,
    "mlm.layers": 1, "mlm.lora": 1, "mlm.generation": 1, "mlm.compress": 1,
    "mlm.data": 2, "mlm.encoders": 2,
    "mlm.fusion": 3,
    "mlm.model": 4, "mlm.model_files": 4, "mlm.model_outputs": 4, "mlm.run_folder": 4,
    "mlm.inference": 5, "mlm.runtime": 5,
    "mlm.factory": 6, "mlm.eval": 6, "mlm.train": 6,
    "mlm.bench": 7, "mlm.demo": 7, "mlm.serve": 7, "mlm.commands": 7,
    "mlm.cli": 8, "mlm": 9,
}  # fmt: skip
ALLOWED = {("mlm.config", "mlm.generation"), ("mlm.config_rules", "mlm.layers"), ("mlm.config_rules", "mlm.encoders")}


def _group(module: str) -> str:
    parts = module.split(".")
    return next(".".join(parts[:k]) for k in (2, 1) if ".".join(parts[:k]) in RANK)


def _imports(tree: ast.AST):
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlm"):
            yield node.module if node.module != "mlm" else f"mlm.{node.names[0].name}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("mlm"))


def test_every_import_points_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        here = _group(module)
        for imported in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            there = _group(imported)
            if RANK[there] > RANK[here] and (here, there) not in ALLOWED:
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)
