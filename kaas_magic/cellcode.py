"""Reading a cell: which names it needs from the notebook, which it gives back.

Found by parsing the cell (never by shipping the whole namespace):
- *reads*: every name loaded anywhere in the cell, nested functions included;
- *writes*: names bound at the cell's top level by assignment, for/with targets, def and
  class. Names bound by ``import`` stay on the worker: modules do not travel, and the
  notebook does not need the worker's frameworks.
"""

from __future__ import annotations

import ast
import functools
import symtable
from dataclasses import dataclass


@dataclass(frozen=True)
class CellInfo:
    reads: frozenset[str]
    writes: tuple[str, ...]  # in order of first binding


def _bound_names(target: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]


def _top_level_writes(body: list[ast.stmt]) -> list[str]:
    names: list[str] = []
    for stmt in body:
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for t in targets:
                names += _bound_names(t)
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            names += _bound_names(stmt.target)
            names += _top_level_writes(stmt.body) + _top_level_writes(stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                if item.optional_vars is not None:
                    names += _bound_names(item.optional_vars)
            names += _top_level_writes(stmt.body)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(stmt.name)
        elif isinstance(stmt, (ast.If, ast.While)):
            names += _top_level_writes(stmt.body) + _top_level_writes(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            names += _top_level_writes(stmt.body) + _top_level_writes(stmt.orelse)
            names += _top_level_writes(stmt.finalbody)
            for handler in stmt.handlers:
                names += _top_level_writes(handler.body)
        elif isinstance(stmt, ast.Expr):
            # walrus at top level: (y := f(x))
            names += [n.target.id for n in ast.walk(stmt) if isinstance(n, ast.NamedExpr)]
    return names


def _global_reads(table: symtable.SymbolTable) -> set[str]:
    """Names read from the cell's global scope, at top level or inside nested scopes.

    A function's parameters and locals (``def f(x): ...``) are not reads of a notebook
    variable ``x``; symtable knows scoping better than a plain AST walk.
    """
    names: set[str] = set()
    top = table.get_type() == "module"
    for sym in table.get_symbols():
        if sym.is_referenced() and (top or sym.is_global() or (sym.is_free() is False and not sym.is_local())):
            names.add(sym.get_name())
    for child in table.get_children():
        names |= _global_reads(child)
    return names


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _comprehension_only_names(tree: ast.AST) -> set[str]:
    """Names bound by a comprehension's ``for`` and never read outside such a scope."""
    bound: set[str] = set()
    free_loads: set[str] = set()

    def visit(node: ast.AST, shadowed: frozenset[str]) -> None:
        if isinstance(node, _COMPREHENSIONS):
            targets = {
                n.id for gen in node.generators for n in ast.walk(gen.target) if isinstance(n, ast.Name)
            }
            bound.update(targets)
            # The first iterable is evaluated outside the comprehension's scope.
            visit(node.generators[0].iter, shadowed)
            inner = shadowed | targets
            for index, gen in enumerate(node.generators):
                if index:
                    visit(gen.iter, inner)
                for condition in gen.ifs:
                    visit(condition, inner)
            for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
                visit(part, inner)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in shadowed:
            free_loads.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child, shadowed)

    visit(tree, frozenset())
    return bound - free_loads


def padded(source: str, line_offset: int) -> str:
    """Source shifted down so that reported line numbers are the notebook cell's."""
    return "\n" * line_offset + source


def analyse(source: str, filename: str = "<kaas-cell>", line_offset: int = 0) -> CellInfo:
    """Parse ``source``; a SyntaxError carries the cell's filename and line number.

    Cached by (source, line_offset): the text parsed is exactly ``padded(source,
    line_offset)``, and the filename only names the cell in a SyntaxError, which is never
    cached (the magics name each run ``<kaas In[n]>``, so keying on it would miss on every
    re-run of a cell)."""
    try:
        return _analysed(source, line_offset)
    except SyntaxError:
        return _analyse(source, filename, line_offset)  # fails the same way, naming the cell


@functools.lru_cache(maxsize=512)
def _analysed(source: str, line_offset: int) -> CellInfo:
    return _analyse(source, "<kaas-cell>", line_offset)


analyse.cache_info = _analysed.cache_info  # type: ignore[attr-defined]
analyse.cache_clear = _analysed.cache_clear  # type: ignore[attr-defined]


def _analyse(source: str, filename: str, line_offset: int) -> CellInfo:
    tree = ast.parse(padded(source, line_offset), filename=filename, mode="exec")
    reads = _global_reads(symtable.symtable(padded(source, line_offset), filename, "exec"))
    # Python 3.12 inlines comprehensions (PEP 709): symtable then reports their loop
    # variables as module-level references. They are reads only if used outside.
    reads -= _comprehension_only_names(tree)
    # symtable does not count `k += 1` as a reference, but it reads k.
    reads |= {
        n.target.id for n in ast.walk(tree) if isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name)
    }
    writes = tuple(dict.fromkeys(_top_level_writes(tree.body)))
    return CellInfo(reads=frozenset(reads), writes=writes)
