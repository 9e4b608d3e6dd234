"""The bundle's YAML files (fields.yaml, cover.yaml), parsed so that every value knows its line.

A security officer reading a refusal wants `fields.yaml:42`, not a Python traceback: mappings keep
the line of each key, and every problem found while reading one is a `MapError` naming file and line.
"""

from __future__ import annotations

from typing import Any

import yaml


class MapError(ValueError):
    """A problem in one of the bundle's YAML files, with the line it sits on."""

    def __init__(self, line: int | None, message: str, file: str = "fields.yaml") -> None:
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")
        self.file = file
        self.line = line
        self.detail = message


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    lines: dict[Any, int]
    line: int


class _LineLoader(yaml.SafeLoader):
    file = "fields.yaml"


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping()
    mapping.lines = {}
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in mapping
        except TypeError:  # a list or a mapping as a key
            raise MapError(key_node.start_mark.line + 1, "a key must be a name", loader.file) from None
        if duplicate:
            raise MapError(key_node.start_mark.line + 1, f"duplicate key {key!r}", loader.file)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, file: str = "fields.yaml") -> Any:
    """Parse YAML keeping line numbers on mappings, so every error can cite `file:line`."""
    loader = _LineLoader(text)
    loader.file = file
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise MapError(line, f"invalid YAML: {exc.problem}", file) from None
    except yaml.YAMLError as exc:
        raise MapError(None, f"invalid YAML: {type(exc).__name__}", file) from None
    finally:
        loader.dispose()


def load_rules(text: str, file: str, keys: frozenset[str] | set[str]) -> dict[str, Any] | None:
    """An officers' rules file: None when empty, else its top-level mapping, every key one of `keys`
    (a `MapError` at the line of the first that is not, or when the file is not a mapping)."""
    doc = load_yaml(text, file)
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise MapError(1, f"expected a mapping with {', '.join(sorted(keys))}", file)
    unknown = sorted(set(doc) - set(keys))
    if unknown:
        raise MapError(line_of(doc, unknown[0]), f"unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})",
                       file)
    return doc


def line_of(mapping: Any, key: Any) -> int | None:
    if isinstance(mapping, _Mapping):
        return mapping.lines.get(key, mapping.line)
    return None


def decode(raw: bytes, file: str) -> str:
    """A bundle file's text; bytes that are not UTF-8 are a finding at their line, never a crash."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise MapError(line, f"not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8", file) from None
