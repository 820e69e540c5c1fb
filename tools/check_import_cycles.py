#!/usr/bin/env python3
"""Fails if the modules of the flashattn library depend on each other in a cycle; lists every cycle found.

Usage: python3 tools/check_import_cycles.py [--src DIR] [--graph] [--with-tests]

The graph. A node is a module that has a file of its own (`lib.rs` is `crate`, `cuda/mod.rs` is `crate::cuda`,
`cuda/fwd.rs` is `crate::cuda::fwd`); a module written inline (`mod plain { ... }`) belongs to its file's node but
is followed when `super::` is resolved. Module A depends on B when A's code names a path into B:
  - `use` declarations anywhere (at the top, inside functions and blocks), every leaf of a `{...}` tree;
  - paths in code (`crate::problem::validate(..)`, `super::launch::zero(..)`, `super::super::x`);
  - paths that start with a child module's name (`fwd::variant_for` in `cuda/mod.rs`).
`mod x;` declares a child and is not an edge by itself: a parent and its children are ordinary nodes, so a child
that calls its parent's functions while the parent calls the child's is a cycle.

Re-exports. A path that names an item through a re-export (`pub use`, `pub(crate) use`, `pub(super) use`) counts
as a dependency on the module that defines the item, not on the re-exporting module: `use crate::Tuning` in
`crate::cuda::fwd` is an edge to `crate::tuning`, and `super::Variant` in `crate::cuda::fwd` is an edge to
`crate::cuda::compile`. A re-export is a second name for one item, not code of the module that spells it. The
re-exporting module itself depends on the module it re-exports from (its `pub use` line is an edge).

Not counted: comments (doc links included) and string literals; paths into other crates (`cudarc::`, `std::`);
unit tests (inline modules under `#[cfg(test)]`: they are clients of the module they test; `--with-tests` counts
them too).

Exit status: 0 no cycle, 1 cycles (for each group of modules that reach each other, cycles that cover every
dependency inside it, each dependency with a line that makes it), 2 usage errors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def strip_comments_and_strings(text: str) -> str:
    """`text` with comments, string literals and char literals blanked (newlines kept, so line numbers hold)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:  # a lifetime or a label
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def file_module(src: str, path: str) -> tuple[str, ...]:
    """The module path of a source file: `lib.rs` -> (), `cuda/mod.rs` -> ("cuda",), `cuda/fwd.rs` ->
    ("cuda", "fwd")."""
    rel = os.path.relpath(path, src).replace(os.sep, "/")[: -len(".rs")]
    parts = rel.split("/")
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def name(mod: tuple[str, ...]) -> str:
    return "::".join(("crate",) + mod)


class Scope:
    """An inline module region of a file: `[start, end)` offsets, its module path, whether it is test code."""

    def __init__(self, start: int, end: int, mod: tuple[str, ...], test: bool):
        self.start, self.end, self.mod, self.test = start, end, mod, test


def inline_scopes(code: str, base: tuple[str, ...]) -> list[Scope]:
    """Every inline `mod x { ... }` of a file (nested ones too), with its full path and test flag."""
    scopes: list[Scope] = []

    def walk(lo: int, hi: int, mod: tuple[str, ...], test: bool) -> None:
        pat = re.compile(r"((?:#\[[^\]]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*\{")
        pos = lo
        while True:
            m = pat.search(code, pos, hi)
            if not m:
                return
            depth, j = 1, m.end()
            while j < hi and depth:
                depth += {"{": 1, "}": -1}.get(code[j], 0)
                j += 1
            is_test = test or "cfg(test)" in m.group(1).replace(" ", "")
            sub = mod + (m.group(2),)
            scopes.append(Scope(m.end(), j, sub, is_test))
            walk(m.end(), j, sub, is_test)
            pos = j

    walk(0, len(code), base, False)
    return scopes


def scope_at(scopes: list[Scope], offset: int, base: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """The innermost module containing `offset` and whether it is test code."""
    best = None
    for s in scopes:
        if s.start <= offset < s.end and (best is None or len(s.mod) > len(best.mod)):
            best = s
    return (best.mod, best.test) if best else (base, False)


def use_leaves(tree: str) -> list[tuple[list[str], str]]:
    """The leaves of a `use` tree with the name each one binds: `a::{b, c::{d as e, self}}` ->
    ([a, b], b), ([a, c, d], e), ([a, c], c). A glob leaf (`a::*`) ends in `*`."""
    tree = re.sub(r"\s+as\s+", "@", tree.strip())
    tree = re.sub(r"\s+", "", tree)

    def split_top(s: str) -> list[str]:
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            cur += ch
        if cur:
            parts.append(cur)
        return parts

    def expand(prefix: list[str], s: str) -> list[tuple[list[str], str]]:
        if not s:
            return []
        brace = s.find("{")
        if brace < 0:
            path, _, alias = s.partition("@")
            segs = prefix + [x for x in path.split("::") if x]
            if segs and segs[-1] == "self":
                segs = segs[:-1]
            return [(segs, alias or (segs[-1] if segs else ""))]
        head = [x for x in s[:brace].split("::") if x]
        out = []
        for part in split_top(s[brace + 1 : s.rfind("}")]):
            out.extend(expand(prefix + head, part))
        return out

    return expand([], tree)


USE_RE = re.compile(r"(?:\bpub(?:\s*\([^)]*\))?\s+)?\buse\s+([^;]+);")
PATH_RE = re.compile(r"(?<![\w:])((?:[A-Za-z_]\w*)(?:\s*::\s*(?:[A-Za-z_]\w*|\*))+)")


class Crate:
    def __init__(self, src: str, with_tests: bool):
        self.src = src
        self.with_tests = with_tests
        self.files: dict[tuple[str, ...], tuple[str, str]] = {}  # module -> (path, code)
        self.modules: set[tuple[str, ...]] = set()  # file modules and inline modules
        self.owner: dict[tuple[str, ...], tuple[str, ...]] = {}  # any module -> the file module holding it
        self.reexports: dict[tuple[str, ...], dict[str, list[str]]] = {}  # module -> exported name -> path
        self.scopes: dict[tuple[str, ...], list[Scope]] = {}
        for root, _dirs, names in os.walk(src):
            for f in sorted(names):
                if f.endswith(".rs"):
                    path = os.path.join(root, f)
                    mod = file_module(src, path)
                    with open(path, encoding="utf-8") as fh:
                        code = strip_comments_and_strings(fh.read())
                    self.files[mod] = (path, code)
                    self.modules.add(mod)
                    self.owner[mod] = mod
        for mod, (_path, code) in self.files.items():
            self.scopes[mod] = inline_scopes(code, mod)
            for s in self.scopes[mod]:
                self.modules.add(s.mod)
                self.owner[s.mod] = mod
        for mod, (_path, code) in self.files.items():
            for m in USE_RE.finditer(code):
                if not m.group(0).lstrip().startswith("pub"):
                    continue
                at, _test = scope_at(self.scopes[mod], m.start(), mod)
                for leaf, alias in use_leaves(m.group(1)):
                    if leaf and leaf[-1] == "*":
                        continue
                    target = self.absolute(leaf, at)
                    if target is not None:
                        self.reexports.setdefault(at, {})[alias] = target

    def absolute(self, segs: list[str], at: tuple[str, ...]) -> list[str] | None:
        """`segs` as a path from the crate root, or None when it leads outside the crate."""
        segs = [s for s in segs if s]
        if not segs:
            return None
        base: list[str]
        if segs[0] == "crate":
            base, rest = [], segs[1:]
        elif segs[0] in ("super", "self"):
            base, rest = list(at), segs
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    if not base:
                        return None
                    base = base[:-1]
                rest = rest[1:]
        elif at + (segs[0],) in self.modules:
            base, rest = list(at), segs
        else:
            return None
        return base + rest

    def resolve(self, path: list[str], depth: int = 0) -> tuple[str, ...] | None:
        """The file module a crate-rooted path leads into, following re-exports to the defining module."""
        mod: tuple[str, ...] = ()
        i = 0
        while i < len(path) and mod + (path[i],) in self.modules:
            mod = mod + (path[i],)
            i += 1
        if i < len(path) and depth < 16:
            target = self.reexports.get(mod, {}).get(path[i])
            if target is not None:
                return self.resolve(target + path[i + 1 :], depth + 1)
        return self.owner.get(mod)

    def edges(self) -> dict[tuple[tuple[str, ...], tuple[str, ...]], str]:
        """(from, to) -> a `file:line` that makes the edge (its first `use`, else its first path in code)."""
        out: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}

        def add(src_mod: tuple[str, ...], offset: int, at: tuple[str, ...], segs: list[str]) -> None:
            path = self.absolute(segs, at)
            if path is None:
                return
            target = self.resolve(path)
            if target is None or target == src_mod:
                return
            fpath, code = self.files[src_mod]
            line = code.count("\n", 0, offset) + 1
            out.setdefault((src_mod, target), f"{os.path.relpath(fpath)}:{line}")

        for mod, (_path, code) in sorted(self.files.items()):
            scopes = self.scopes[mod]
            used = []
            for m in USE_RE.finditer(code):
                at, test = scope_at(scopes, m.start(), mod)
                used.append((m.start(), m.end()))
                if test and not self.with_tests:
                    continue
                for leaf, _alias in use_leaves(m.group(1)):
                    add(mod, m.start(), at, [s for s in leaf if s != "*"])
            for m in PATH_RE.finditer(code):
                if any(a <= m.start() < b for a, b in used):
                    continue
                at, test = scope_at(scopes, m.start(), mod)
                if test and not self.with_tests:
                    continue
                segs = [s.strip() for s in m.group(1).split("::")]
                add(mod, m.start(), at, [s for s in segs if s != "*"])
        return out


def strongly_connected(nodes: list, succ: dict) -> list[list]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict = {}
    low: dict = {}
    on_stack: set = set()
    stack: list = []
    comps: list[list] = []
    counter = [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ.get(root, ())))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(comp)
    return comps


def short_cycles(members: set, succ: dict) -> list[list]:
    """Cycles that cover every edge of a strongly connected group: the shortest cycle through each edge
    (breadth-first back to its start), shortest first, each kept only if it has an edge no earlier one has."""
    found: dict[tuple, list] = {}
    for a in sorted(members):
        for b in succ.get(a, ()):
            if b not in members:
                continue
            prev = {b: None}
            queue = [b]
            while queue and a not in prev:
                nxt = []
                for v in queue:
                    for w in succ.get(v, ()):
                        if w in members and w not in prev:
                            prev[w] = v
                            nxt.append(w)
                queue = nxt
            path = [a]
            v = prev[a] if a != b else None
            while v is not None:
                path.append(v)
                v = prev[v]
            cycle = [a] + path[1:][::-1] if a != b else [a]
            k = cycle.index(min(cycle))
            key = tuple(cycle[k:] + cycle[:k])
            found.setdefault(key, list(key))
    covered: set = set()
    out = []
    for cycle in sorted(found.values(), key=lambda c: (len(c), c)):
        pairs = set(zip(cycle, cycle[1:] + cycle[:1]))
        if not pairs <= covered:
            covered |= pairs
            out.append(cycle)
    return out


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.path.join(here, "..", "crates", "flashattn", "src"))
    ap.add_argument("--graph", action="store_true", help="print every edge with the line that makes it")
    ap.add_argument("--with-tests", action="store_true", help="count #[cfg(test)] modules too")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.src, "lib.rs")):
        print(f"no lib.rs under {args.src}", file=sys.stderr)
        return 2
    crate = Crate(args.src, args.with_tests)
    edges = crate.edges()
    succ: dict = {}
    for a, b in sorted(edges):
        succ.setdefault(a, []).append(b)
    if args.graph:
        for (a, b), where in sorted(edges.items()):
            print(f"{name(a)} -> {name(b)}  ({where})")
    cycles = [sorted(c) for c in strongly_connected(sorted(crate.files), succ) if len(c) > 1]
    if not cycles:
        print(f"no import cycle among {len(crate.files)} modules ({len(edges)} dependencies)")
        return 0
    print(
        f"import cycles among the library's modules ({len(cycles)} group(s) of modules that reach each other):",
        file=sys.stderr,
    )
    for comp in sorted(cycles):
        members = set(comp)
        print("  group: " + ", ".join(name(m) for m in comp), file=sys.stderr)
        for cycle in short_cycles(members, succ):
            pairs = list(zip(cycle, cycle[1:] + cycle[:1]))
            print("    cycle: " + " -> ".join(name(m) for m in cycle + cycle[:1]), file=sys.stderr)
            for a, b in pairs:
                print(f"        {name(a)} -> {name(b)}: {edges[(a, b)]}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
