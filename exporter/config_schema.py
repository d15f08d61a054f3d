"""The config file's JSON Schema (draft 2020-12), generated from `config_models`.

What `catalog-upload-exporter schema` prints and config.schema.json holds, for editors and
CI linters. It says what JSON Schema can of the loader's rules: keys, types, ranges,
choices, patterns. The checks of the filesystem and environment (`config_preflight`) and
an id's Unicode normalization are beyond it, and the descriptions say so.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from exporter.config_models import Config

__all__ = ["json_schema"]


class _Schema(GenerateJsonSchema):
    """JSON Schema as the loader reads documents: `null` is allowed wherever a default is."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        value = super().default_schema(schema)
        default = {"default": value.pop("default")} if "default" in value else {}
        nullable = value if "anyOf" in value else {"anyOf": [value]}
        if {"type": "null"} not in nullable["anyOf"]:
            nullable["anyOf"].append({"type": "null"})
        return {**nullable, **default}


def json_schema() -> dict[str, Any]:
    """The config file's JSON Schema (draft 2020-12), as `catalog-upload-exporter schema`."""
    return Config.model_json_schema(schema_generator=_Schema)
