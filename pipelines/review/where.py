"""``--where`` for review exports: a small filter language over the output's columns, run by Arrow.

The expression is written as a Python condition (``flagged and category == 'shoes'``,
``itm_score < 0.3 or 'caption_disagrees' in flag_reasons``), as ``audit(where=...)`` takes one,
but it is parsed with ``ast`` and **never evaluated as Python**: only column names, literals,
comparisons (``== != < <= > >=``, chained too), ``in`` / ``not in`` a list of literals,
``'reason' in flag_reasons`` (a list column), ``is None`` / ``is not None``, ``and``, ``or`` and
``not`` are accepted; anything else (calls, attributes, subscripts, arithmetic) is refused with a
message naming it. Each piece becomes a ``pyarrow.compute`` call over a batch, so a filter costs a
few vectorised kernels. The expression is checked against the output's schema before any row is
read (an unknown column, or a comparison Arrow has no kernel for, is an error up front); a null
comparison counts as false.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_LENGTH = 2000  # a filter, not a program; also keeps ast's recursion shallow

_COMPARE = {ast.Eq: "equal", ast.NotEq: "not_equal", ast.Lt: "less", ast.LtE: "less_equal",
            ast.Gt: "greater", ast.GtE: "greater_equal"}
ALLOWED = ("column names, literals, == != < <= > >=, in / not in [literals], 'value' in a list column, "
           "is None / is not None, and, or, not")


class WhereError(ValueError):
    """An expression that is not a valid filter for this output; the message says why."""


def _describe(node: ast.AST, text: str) -> str:
    return ast.get_source_segment(text, node) or type(node).__name__


@dataclass(frozen=True)
class Where:
    """A parsed filter: ``where(table)`` is a boolean array, false where the condition is null."""

    text: str
    tree: ast.AST
    columns: tuple[str, ...]

    def __call__(self, table: pa.Table) -> pa.Array:
        value = _Evaluator(self.text, table).visit(self.tree)
        if isinstance(value, _Literal):
            return pa.array(np.full(table.num_rows, bool(value.value)))
        if not pa.types.is_boolean(value.type):
            raise WhereError(f"--where {self.text!r} is not a condition (it gives {value.type}, not true/false)")
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        return value.fill_null(False)


@dataclass(frozen=True)
class _Literal:
    value: object


def parse(text: str, schema: pa.Schema) -> Where:
    """Parse and check ``text`` against ``schema``; raises ``WhereError`` naming the problem."""
    text = (text or "").strip()
    if not text:
        raise WhereError("--where is empty")
    if len(text) > MAX_LENGTH:
        raise WhereError(f"--where is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise WhereError(f"--where {text!r} is not a valid expression: {exc.msg}") from None
    names = tuple(sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}))
    unknown = [n for n in names if n not in schema.names]
    if unknown:
        raise WhereError(f"--where names unknown column(s) {', '.join(unknown)}; columns: {', '.join(schema.names)}")
    where = Where(text, tree, names)
    try:
        where(schema.empty_table())  # types are checked here, before any row is read
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise WhereError(f"--where {text!r} cannot be evaluated on this output: {str(exc).splitlines()[0]}") from None
    return where


class _Evaluator(ast.NodeVisitor):
    def __init__(self, text: str, table: pa.Table):
        self.text, self.table = text, table

    def generic_visit(self, node):
        raise WhereError(f"--where: {_describe(node, self.text)!r} is not allowed; allowed: {ALLOWED}")

    def visit_Name(self, node: ast.Name):
        return self.table.column(node.id)

    def visit_Constant(self, node: ast.Constant):
        if node.value is not None and not isinstance(node.value, (str, int, float, bool)):
            return self.generic_visit(node)
        return _Literal(node.value)

    def visit_UnaryOp(self, node: ast.UnaryOp):
        operand = self.visit(node.operand)
        if isinstance(node.op, ast.Not):
            return _Literal(not operand.value) if isinstance(operand, _Literal) else pc.invert(operand)
        if isinstance(node.op, ast.USub) and isinstance(operand, _Literal) and isinstance(operand.value, (int, float)):
            return _Literal(-operand.value)
        return self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp):
        combine = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        values = [self._boolean(self.visit(v)) for v in node.values]
        result = values[0]
        for value in values[1:]:
            result = combine(result, value)
        return result

    def _boolean(self, value):
        if isinstance(value, _Literal):
            return pa.array(np.full(self.table.num_rows, bool(value.value)))
        return value

    def visit_Compare(self, node: ast.Compare):
        result, left = None, node.left
        for op, right in zip(node.ops, node.comparators):
            step = self._compare(left, op, right)
            result = step if result is None else pc.and_kleene(result, step)
            left = right
        return result

    def _values(self, node: ast.AST) -> list:
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            raise WhereError(f"--where: the right side of 'in' must be a list of literals or a list column, "
                             f"not {_describe(node, self.text)!r}")
        values = [self.visit(element) for element in node.elts]
        if not all(isinstance(v, _Literal) for v in values):
            raise WhereError(f"--where: {_describe(node, self.text)!r} must hold literals only")
        return [v.value for v in values]

    def _compare(self, left_node, op, right_node):
        if isinstance(op, (ast.Is, ast.IsNot)):
            if not (isinstance(right_node, ast.Constant) and right_node.value is None):
                raise WhereError("--where: 'is' compares with None only (is None, is not None)")
            left = self._column(left_node, "is None")
            return pc.is_null(left) if isinstance(op, ast.Is) else pc.is_valid(left)
        if isinstance(op, (ast.In, ast.NotIn)):
            found = self._contains(left_node, right_node)
            return pc.invert(found) if isinstance(op, ast.NotIn) else found
        if type(op) not in _COMPARE:
            return self.generic_visit(op)
        left, right = self.visit(left_node), self.visit(right_node)
        if isinstance(left, _Literal) and isinstance(right, _Literal):
            raise WhereError(f"--where: {_describe(left_node, self.text)!r} compares two literals")
        kind = (right if isinstance(left, _Literal) else left).type
        return getattr(pc, _COMPARE[type(op)])(self._arrow(left, kind), self._arrow(right, kind))

    @staticmethod
    def _arrow(value, kind: pa.DataType):
        """A literal in the column's own type, so ``itm_score <= 0.6`` compares float32 with float32."""
        if not isinstance(value, _Literal):
            return value
        try:
            return pa.scalar(value.value, kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
            return pa.scalar(value.value)  # Arrow then names the mismatch

    def _column(self, node, what: str):
        value = self.visit(node)
        if isinstance(value, _Literal):
            raise WhereError(f"--where: {what} needs a column on its left")
        return value

    def _contains(self, left_node, right_node):
        if isinstance(right_node, ast.Name):  # 'reason' in flag_reasons: a list column
            column = self.table.column(right_node.id)
            if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
                raise WhereError(f"--where: column {right_node.id!r} is not a list; use  {right_node.id} == ...  or  in [...]")
            needle = self.visit(left_node)
            if not isinstance(needle, _Literal):
                raise WhereError("--where: 'in' a list column takes a literal on its left")
            lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            target = pa.scalar(needle.value, lists.type.value_type)  # a wrong type fails here, on the empty check too
            flat = pc.list_flatten(lists)
            hits = np.zeros(len(lists), dtype=bool)
            if len(flat):
                matched = pc.equal(flat, target).fill_null(False).to_numpy(zero_copy_only=False)
                parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
                hits[parents[matched]] = True
            return pa.array(hits)
        left = self._column(left_node, "'in'")
        values = self._values(right_node)
        found = pc.is_in(left, value_set=pa.array(values, left.type))
        return pc.if_else(pc.is_valid(left), found, pa.scalar(None, pa.bool_()))  # null is neither in nor out
