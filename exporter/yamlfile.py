"""Reading a YAML file safely: bounded in size, refusing repeated keys, errors as text.

`read_yaml` is yaml.safe_load with three guards the config file needs: a file over
`MAX_CONFIG_BYTES` is refused before it is parsed (by stat and a bounded read), a key
repeated in one mapping is refused naming its path and both lines (PyYAML keeps the last
silently), and every failure is a `YamlFileError` whose lines never quote the document (it
may hold secrets; a repeated key's path shows only names shaped like config keys). What the
document means is `exporter.config_models`' business, not this one's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import yaml

from exporter.config_wording import key_name

__all__ = ["MAX_CONFIG_BYTES", "YamlFileError", "read_yaml"]


class YamlFileError(Exception):
    """The file cannot be read as one YAML document; `problems` holds one line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


#: The largest config file read, in bytes. The file is refused before it is parsed: a 64 MB
#: document took 16 s and almost 1 GB to parse only to be rejected, on every reload too.
MAX_CONFIG_BYTES = 16 * 1024 * 1024

_MERGE_TAG = "tag:yaml.org,2002:merge"
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """yaml.safe_load's loader (libyaml's when PyYAML has it) that notes repeated keys.

    PyYAML keeps the last of two equal keys in a mapping without a word, so a second
    `polling:` section silently replaced the first. Each repeat is noted as (key path, first
    line, repeated line); the document is still built, and the caller refuses it.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []
        self._root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self._root = node
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # `<<: *defaults` overriding is what merge keys are for
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                self.duplicates.append(
                    (
                        self._path_of(node, key),
                        first.start_mark.line + 1,
                        key_node.start_mark.line + 1,
                    )
                )
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]

    def _path_of(self, target: yaml.Node, key: object) -> str:
        """The key path of `key` in mapping `target`, searched from the document's root.

        Names not shaped like a config key are not shown (`config_wording.key_name`): a key
        repeated may be a token pasted twice."""
        leaf = key_name(key)
        stack: list[tuple[yaml.Node, str]] = [(self._root, "")] if self._root else []
        visited: set[int] = set()
        while stack:
            node, path = stack.pop()
            if node is target:
                return f"{path}.{leaf}" if path else leaf
            if id(node) in visited:
                continue  # an alias seen before: each node is searched once
            visited.add(id(node))
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    name = (
                        key_name(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                    )
                    stack.append((value_node, f"{path}.{name}" if path else str(name)))
            elif isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        return leaf


def _read_text(name: str) -> str:
    """The file's text, refused before it is read in full when over MAX_CONFIG_BYTES."""
    too_big = (
        f"{name}: the file is larger than {MAX_CONFIG_BYTES} bytes (16 MiB), the most a "
        "config may be; list many ids in ingestions.directory or the admin API instead"
    )
    try:
        with open(name, "rb") as file:
            if os.fstat(file.fileno()).st_size > MAX_CONFIG_BYTES:
                raise YamlFileError([too_big])
            # Bounded even when the size was wrong (a FIFO, /proc) or the file grew since.
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise YamlFileError([f"{name}: cannot read the file: {error.strerror}"]) from None
    except ValueError as error:  # a NUL in the path
        raise YamlFileError([f"{name}: cannot read the file: {error}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise YamlFileError([too_big])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise YamlFileError([f"{name}: cannot read the file: {error}"]) from None


def read_yaml(path: str | os.PathLike[str]) -> object:
    """The document in the file at `path` (None when it holds none), or a YamlFileError."""
    name = os.fspath(path)
    text = _read_text(name)
    # libyaml's loader when PyYAML has it: 100,000 ids load in a fraction of the time.
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        # Our own wording: str(error) quotes the offending lines of the document.
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = error.problem or error.context or "invalid YAML"
        raise YamlFileError([f"{name}: YAML syntax error{where}: {what}"]) from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise YamlFileError([f"{name}: not valid YAML: {type(error).__name__}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise YamlFileError(
            f"{key_path}: key repeated in {name} at lines {first} and {again}; "
            "YAML would keep only the last, so say it once"
            for key_path, first, again in loader.duplicates
        )
    return data
