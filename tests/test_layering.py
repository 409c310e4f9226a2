"""The package's layering, read from the source (every import statement, function-local ones included):

    rank 0  mhc_kernels, mhc_train.errors                      import nothing of mhc_train
    rank 1  mhc_train.config, mhc_train.io (atomic writes, locks, the run directory, the logger; the error base only)
    rank 2  mhc_train.ops
    rank 3  mhc_train.model, mhc_train.data
    rank 4  mhc_train.optim
    rank 5  mhc_train.parallel
    rank 6  mhc_train.checkpoint (used by train and infer)
    rank 7  mhc_train.train
    rank 8  mhc_train.analysis, mhc_train.infer (generate / export / eval; only mhc_train.cli
            imports infer), mhc_train.plan (the dry run)
    rank 9  mhc_train.cli
    rank 10 entry points (`__main__` modules: `python -m mhc_train.train` runs the CLI)

A module may import its own group or a lower rank only, nothing imports `tools/` (planning tools and oracles live
outside the product), and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANKS = {
    "mhc_kernels": 0,
    "mhc_train.errors": 0,
    "mhc_train.config": 1,
    "mhc_train.io": 1,
    "mhc_train.ops": 2,
    "mhc_train.model": 3,
    "mhc_train.data": 3,
    "mhc_train.optim": 4,
    "mhc_train.parallel": 5,
    "mhc_train.checkpoint": 6,
    "mhc_train.train": 7,
    "mhc_train.analysis": 8,
    "mhc_train.infer": 8,
    "mhc_train.plan": 8,
    "mhc_train.cli": 9,
    "__main__": 10,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for root, name in ((REPO / "mhc_train", "mhc_train"), (REPO / "mhc_kernels", "mhc_kernels")):
        for path in root.rglob("*.py"):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules `module` imports (a `from pkg import name` counts as pkg.name where that is a module)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in ("mhc_train", "mhc_kernels", "tools")}
    return out - {module}


def _group(module: str) -> str | None:
    if module.endswith(".__main__"):
        return "__main__"
    best = None
    for g in RANKS:
        if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best)):
            best = g
    return best


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        ga = _group(a)
        for b in targets:
            gb = _group(b)
            if b.split(".")[0] == "tools":
                bad.append(f"{a} imports {b}: tools/ is not part of the product package")
            elif a == "mhc_train" or b == "mhc_train":
                continue  # the top-level package file holds nothing
            elif ga is None or gb is None:
                bad.append(f"{a} -> {b}: a module outside the layer table; add it to RANKS")
            elif ga != gb and RANKS[gb] >= RANKS[ga]:
                bad.append(f"{a} (rank {RANKS[ga]}) imports {b} (rank {RANKS[gb]}): only lower ranks may be imported")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_cycles_and_upward_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    bad = violations({"mhc_train.model.x": {"mhc_train.parallel.y"}, "mhc_train.config": {"mhc_train.ops"}})
    assert len(bad) == 2, bad
    assert violations({"mhc_train.parallel.y": {"tools.measure"}})
    assert not violations({"mhc_train.train.t": {"mhc_train.parallel.y", "mhc_train.config", "mhc_kernels.gates"}})


def test_the_package_graph_is_layered_and_acyclic():
    edges = graph()
    assert "mhc_train.parallel.build" in edges and "mhc_kernels" in edges  # the walk found the package
    assert edges["mhc_train.errors"] == set(), edges["mhc_train.errors"]
    assert {m for m in edges["mhc_train.io.log"]} <= {"mhc_train.errors"}
    assert violations(edges) == []
    assert cycles(edges) == []


def test_only_the_cli_imports_infer():
    importers = {a for a, targets in graph().items() if any(_group(b) == "mhc_train.infer" for b in targets)}
    assert {a for a in importers if _group(a) != "mhc_train.infer"} == {"mhc_train.cli"}, importers


def test_infer_never_imports_train_and_checkpoint_serves_both():
    """Inference reads checkpoints through mhc_train.checkpoint, never through the training loop's package."""
    edges = graph()
    infer_to_train = {(a, b) for a, targets in edges.items() if _group(a) == "mhc_train.infer"
                      for b in targets if _group(b) == "mhc_train.train"}  # fmt: skip
    assert infer_to_train == set(), infer_to_train
    assert any(_group(b) == "mhc_train.checkpoint" for b in edges["mhc_train.infer.load"])
    assert not any(_group(b) in ("mhc_train.train", "mhc_train.infer") for a, t in edges.items()
                   if _group(a) == "mhc_train.checkpoint" for b in t)  # fmt: skip


COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather", "gather_object", "scatter", "barrier",
    "send", "recv", "isend", "irecv", "all_to_all", "monitored_barrier",
}  # fmt: skip


def collective_calls(path: Path) -> list[str]:
    """Calls of a method named like a torch.distributed collective (whatever it is called on) and imports of one,
    as 'line: name'."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(a.name == "distributed" for a in node.names)
        ):
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)  # any owner: `self._dist.all_reduce` counts as well
            found.append(f"{node.lineno}: {owner}.{node.func.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [
                f"{node.lineno}: from torch.distributed import {a.name}" for a in node.names if a.name in COLLECTIVES
            ]
    return found


def test_the_collective_checker_sees_calls_through_any_name(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch.distributed as d\ndef f(self, t):\n    self._dist.all_reduce(t)\n    d.barrier()\n")
    assert collective_calls(sample) == ["3: self._dist.all_reduce", "4: d.barrier"]


def test_every_collective_of_ours_goes_through_parallel_dist():
    """The trainer, checkpoints and engines issue collectives only through mhc_train/parallel/dist.py, which puts
    every tensor on the compute device (NCCL refuses CPU tensors); torch's and DeepSpeed's own stay theirs."""
    assert collective_calls(REPO / "mhc_train/parallel/dist.py"), "the checker finds dist.py's own collectives"
    outside = {
        str(p.relative_to(REPO)): calls
        for p in (REPO / "mhc_train").rglob("*.py")
        if p != REPO / "mhc_train/parallel/dist.py" and (calls := collective_calls(p))
    }
    assert outside == {}, outside
