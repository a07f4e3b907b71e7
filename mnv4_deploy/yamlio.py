"""YAML the user writes (recipes, calibration sets, zoo files): safe loader only, and one line per mistake that
keeps the file, the line and the cause (PyYAML's first line, "while parsing a block mapping", has neither).
A key given twice in one mapping is refused rather than silently won by the last one.
"""
from __future__ import annotations

from typing import Any, Optional

import yaml

from .errors import UserError


def _line(mark: Any) -> Optional[int]:
    return None if mark is None else mark.line + 1


def syntax_error(exc: yaml.YAMLError, source: str) -> UserError:
    """`source:LINE: not valid YAML: <cause> (<context> at line N)`."""
    problem = getattr(exc, "problem", None)
    line = _line(getattr(exc, "problem_mark", None))
    context = getattr(exc, "context", None)
    cause = problem or str(exc).splitlines()[0]
    if context:
        ctx_line = _line(getattr(exc, "context_mark", None))
        cause += f" ({context}{f' at line {ctx_line}' if ctx_line else ''})"
    where = f"{source}:{line}" if line else source
    return UserError(f"{where}: not valid YAML: {cause}")


def compose(text: str, source: str) -> Optional[yaml.Node]:
    """The document's node tree (safe loader), with duplicate keys refused; None for an empty document."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise syntax_error(exc, source) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise UserError(f"{source}: nests too deeply to be read") from None
    if node is not None:
        refuse_duplicate_keys(node, source)
    return node


def refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    """A mapping that gives a key twice is a mistake (the last one would win silently)."""
    stack, seen_nodes = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # anchors/aliases share nodes (and can form cycles)
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, yaml.Node] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                    if key_node.value in keys:
                        first = keys[key_node.value].start_mark.line + 1
                        raise UserError(f"{source}:{key_node.start_mark.line + 1}: key '{key_node.value}' is given "
                                        f"twice (first at line {first}): keep one")
                    keys[key_node.value] = key_node
                stack += [key_node, value_node]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


# What PyYAML's safe constructors raise for a value they cannot build: a tag they refuse (!!python/object) is a
# YAMLError, but an explicit tag on the wrong text is a bare ValueError (`!!float null`, `!!int x`), IndexError
# (`!!float ''`), KeyError (`!!bool maybe`) or AttributeError (`!!timestamp x`).
CONSTRUCT_ERRORS = (yaml.YAMLError, ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError)


def cannot_read(exc: BaseException) -> str:
    """'cannot be read by the safe YAML loader (<why>): write it plainly' for one of CONSTRUCT_ERRORS."""
    why = getattr(exc, "problem", None) or (str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return f"cannot be read by the safe YAML loader ({why}): write it as plain YAML"


def construct(node: yaml.Node, source: str) -> Any:
    """The Python value of a composed node (safe loader); one line naming its line when it cannot be built."""
    try:
        return yaml.SafeLoader("").construct_document(node)
    except CONSTRUCT_ERRORS as exc:
        line = _line(getattr(exc, "problem_mark", None)) or node.start_mark.line + 1
        raise UserError(f"{source}:{line}: a value {cannot_read(exc)}") from None
    except RecursionError:
        raise UserError(f"{source}: nests too deeply to be read") from None


def safe_load(text: str, source: str) -> Any:
    """Plain data from YAML text: safe loader, duplicate keys refused, one line per mistake."""
    node = compose(text, source)
    return None if node is None else construct(node, source)
