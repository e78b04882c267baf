"""The names a notebook cell reads, assigns and imports, found by an AST pass.

``%%remote`` ships the names a cell reads and brings back the names it
assigns; function, lambda, class and comprehension scopes are followed so that
a function's parameters or a comprehension's loop variable are neither.
"""
from __future__ import annotations

import ast


class _Scope:
    def __init__(self, kind: str, parent: "_Scope | None") -> None:
        self.kind = kind            # module, function, class, comprehension
        self.parent = parent
        self.loads: set[str] = set()
        self.stores: set[str] = set()
        self.declared_global: set[str] = set()
        self.imports: set[str] = set()


class _Analyzer(ast.NodeVisitor):
    """Collects, for the module scope, the names read (including free names of nested
    scopes), assigned (including ``global`` assignments in functions) and imported."""

    def __init__(self) -> None:
        self.module = _Scope("module", None)
        self.scope = self.module

    # scopes
    def _enter(self, kind: str, params: set[str] = frozenset()) -> _Scope:
        s = _Scope(kind, self.scope)
        s.stores |= set(params)
        self.scope = s
        return s

    def _leave(self, s: _Scope) -> None:
        self.scope = s.parent
        free = s.loads - (s.stores - s.declared_global)
        for name in s.stores & s.declared_global:
            self.module.stores.add(name)
        for name in free:
            (self.module if name in s.declared_global else self.scope).loads.add(name)

    def _binding_scope(self) -> _Scope:
        s = self.scope
        while s.kind == "comprehension":   # := in a comprehension binds outside it
            s = s.parent
        return s

    # names
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.scope.loads.add(node.id)
        else:
            self.scope.stores.add(node.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.scope.loads.add(node.target.id)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._binding_scope().stores.add(node.target.id)

    def visit_Global(self, node: ast.Global) -> None:
        self.scope.declared_global.update(node.names)

    visit_Nonlocal = visit_Global

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            name = a.asname or a.name.split(".")[0]
            self.scope.stores.add(name)
            self.scope.imports.add(name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            if a.name != "*":
                self.scope.stores.add(a.asname or a.name)
                self.scope.imports.add(a.asname or a.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.scope.stores.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node) -> None:
        if node.name:
            self.scope.stores.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node) -> None:
        if node.name:
            self.scope.stores.add(node.name)

    def visit_MatchMapping(self, node) -> None:
        if node.rest:
            self.scope.stores.add(node.rest)
        self.generic_visit(node)

    # nested scopes
    def _arguments(self, args: ast.arguments) -> set[str]:
        for d in list(args.defaults) + [d for d in args.kw_defaults if d is not None]:
            self.visit(d)
        every = args.posonlyargs + args.args + args.kwonlyargs
        every += [a for a in (args.vararg, args.kwarg) if a is not None]
        for a in every:
            if a.annotation is not None:
                self.visit(a.annotation)
        return {a.arg for a in every}

    def visit_FunctionDef(self, node) -> None:
        for d in node.decorator_list:
            self.visit(d)
        if node.returns is not None:
            self.visit(node.returns)
        params = self._arguments(node.args)
        self.scope.stores.add(node.name)
        s = self._enter("function", params)
        for stmt in node.body:
            self.visit(stmt)
        self._leave(s)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        params = self._arguments(node.args)
        s = self._enter("function", params)
        self.visit(node.body)
        self._leave(s)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(d)
        self.scope.stores.add(node.name)
        s = self._enter("class")
        for stmt in node.body:
            self.visit(stmt)
        self._leave(s)

    def _comprehension(self, node, parts: list) -> None:
        gens = node.generators
        self.visit(gens[0].iter)           # evaluated in the enclosing scope
        s = self._enter("comprehension")
        for i, g in enumerate(gens):
            self.visit(g.target)
            if i:
                self.visit(g.iter)
            for cond in g.ifs:
                self.visit(cond)
        for p in parts:
            self.visit(p)
        self._leave(s)

    def visit_ListComp(self, node) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node) -> None:
        self._comprehension(node, [node.key, node.value])


def analyze(code: str) -> tuple[set[str], set[str], set[str]]:
    """(names read, names assigned, names imported) at the top level of a cell.

    Reads include the free names of functions, lambdas, classes and
    comprehensions defined in the cell; assigns include ``global`` names a
    function of the cell assigns.  Raises SyntaxError for a cell that does not parse.
    """
    a = _Analyzer()
    a.visit(ast.parse(code))
    m = a.module
    return m.loads, m.stores, m.imports
