"""The structure budget, read from the code with `ast` (docs/ARCHITECTURE.md): no module over 400 lines
(train.py 250), no function over 60 lines (40 in train.py and engine/), a Trainer that builds its
components in a few lines, a step with no branch on the config, an epoch loop with only the log and stop
cadences, and no import cycle (imports inside functions counted)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "dist_resnet"
FILE_MAX, TRAIN_MAX = 400, 250
FN_MAX, CORE_FN_MAX = 60, 40


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if p.name == "__init__.py" else parts)] = p
    return out


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def is_core(path: Path) -> bool:
    return path.name == "train.py" or "engine" in path.relative_to(PACKAGE).parts


def test_no_module_or_function_over_its_budget():
    over = []
    for name, p in modules().items():
        lines = len(p.read_text().splitlines())
        budget = TRAIN_MAX if p.name == "train.py" else FILE_MAX
        if lines > budget:
            over.append(f"{p.relative_to(ROOT)}: {lines} lines (budget {budget})")
        for node in ast.walk(tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n, limit = node.end_lineno - node.lineno + 1, CORE_FN_MAX if is_core(p) else FN_MAX
                if n > limit:
                    over.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines (budget {limit})")
    assert not over, "\n".join(over)


def trainer_class() -> ast.ClassDef:
    return next(n for n in tree(PACKAGE / "train.py").body if isinstance(n, ast.ClassDef) and n.name == "Trainer")


def self_attributes(node: ast.AST) -> set[str]:
    """The attributes of `self` that `node` assigns."""
    out = set()
    for n in ast.walk(node):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, (ast.AugAssign,
                                                                                             ast.AnnAssign)) else []
        for t in targets:
            for e in ast.walk(t):
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    out.add(e.attr)
    return out


def test_the_trainer_is_built_in_a_few_lines_with_few_attributes():
    cls = trainer_class()
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    lines = init.end_lineno - init.lineno + 1
    attributes = self_attributes(cls)
    print(f"Trainer.__init__: {lines} lines; Trainer sets {len(attributes)} attributes: {sorted(attributes)}")
    assert lines <= 30 and len(attributes) <= 15
    assert self_attributes(init) == attributes  # every attribute is set when the trainer is built


def mentions_config(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Name, ast.Attribute)) and (getattr(n, "id", None) == "cfg" or
                                                              getattr(n, "attr", None) == "cfg")
               for n in ast.walk(node))


def branches(node: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(node) if isinstance(n, (ast.If, ast.IfExp))]


def test_the_step_has_no_branch_on_the_config_and_the_epoch_loop_only_cadences():
    step = next(n for n in tree(PACKAGE / "engine" / "step.py").body if isinstance(n, ast.ClassDef) and n.name == "Step")
    hot = [f for f in step.body if isinstance(f, ast.FunctionDef) and f.name != "__init__"]
    assert {f.name for f in hot} >= {"__call__", "forward_backward", "micro_batch", "apply"}
    assert not any(mentions_config(f) for f in hot)  # the step never sees the config: it was resolved at build
    conditions = [ast.unparse(b.test) for f in hot for b in branches(f)]
    assert conditions == ["not self.loss_scale.step(self.optimizer)"], conditions  # a skipped fp16 step only
    epoch = next(f for f in trainer_class().body if isinstance(f, ast.FunctionDef) and f.name == "train_epoch")
    loop = max((n for n in ast.walk(epoch) if isinstance(n, ast.For)), key=lambda n: n.end_lineno - n.lineno)
    cadences = [ast.unparse(b.test) for b in branches(loop)]
    print("the epoch loop's branches:", cadences)
    assert len(cadences) == 3 and "log_every" in cadences[0] and "stop_check_every" in cadences[1]
    assert cadences[2].startswith("self.checkpointer.due(")  # train.checkpoint_every: the checkpointer's own cadence


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in it (inside functions too)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in mods and c != name and not name.startswith(c + ".")}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, p, mods) for name, p in mods.items()}


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in g[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_cycle_and_the_commands_do_not_import_the_trainer():
    g = graph()
    cycles = [name for name in g if name in reachable(g, name)]
    assert not cycles, f"modules on an import cycle: {cycles}"
    for command in ("evaluate", "predict", "export", "plot"):
        assert "dist_resnet.train" not in reachable(g, f"dist_resnet.{command}"), command
    assert sum(len(v) for v in g.values()) > 50  # the graph was read: a broken reader would find no arrow
