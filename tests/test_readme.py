"""The README's "Paper step → code" table names functions that exist, row by row in the order their files
define them, so a reader can follow the table and the file side by side.

Run: python -m pytest -q tests/test_readme.py
"""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def table_references():
    """-> [(module, name)] in the order the table names them."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("## Paper step → code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    return [tuple(ref.split(".")) for row in rows for ref in re.findall(r"`(\w+\.\w+)`", row)]


def definition_lines(module):
    """{name: line} of a module's top-level functions and classes."""
    tree = ast.parse((REPO / f"{module}.py").read_text(encoding="utf-8"))
    return {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_the_paper_to_code_table_names_functions_in_the_order_their_files_define_them():
    refs = table_references()
    assert len(refs) > 20
    last = {}
    for module, name in refs:
        lines = definition_lines(module)
        assert name in lines, f"{module}.{name} is in the README's table but not defined in {module}.py"
        assert lines[name] > last.get(module, 0), f"{module}.{name} is listed after a function defined below it"
        last[module] = lines[name]
