"""A predictor's inputs as `cog build` publishes them, read the way it reads them.

`cog build` never imports the predictor: it parses the file with tree-sitter and takes each
`Input(...)` keyword from the syntax (cog's `pkg/schema/python`, `inputs.go`, `literals.go`,
`module_scope.go`). A string is the source text between its first and last quote, with no
escapes or joining, so `"a " "b"` is published as `a " "b`; a bound is a number literal only;
a name is looked up among the module's top-level assignments, read by the same rules. This
module follows those rules (tree-sitter-python from PyPI, a dev-only dependency imported
inside the functions), says what Python means by the same expressions, and writes the
OpenAPI document that `cog build` stores as `.cog/openapi_schema.json` (cog's
`pkg/schema/openapi_spec.go`), which coglet validates every request against.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

# cog's JSON types of the annotations a predictor here uses (pkg/schema/types.go, JSONType).
JSON_TYPES = {
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "str": {"type": "string"},
    "bool": {"type": "boolean"},
    "Path": {"type": "string", "format": "uri"},
}
FIELDS = ("description", "default", "ge", "le", "min_length", "max_length", "choices")


class SchemaError(ValueError):
    """A predictor that `cog build` would refuse, or that this reader does not cover."""


class _Ordered(dict):
    """A JSON object whose keys keep their order (cog's ordered maps); Go sorts the others."""


def _parse(path: Path):
    import tree_sitter
    import tree_sitter_python

    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_python.language()))
    return parser.parse(path.read_bytes()).root_node


def _text(node) -> str:
    return node.text.decode()


def _string(node) -> str | None:
    """cog's parseStringLiteral: the text inside the outer quotes, escapes and joins kept."""
    text = _text(node)
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else None
    if text.startswith(('"', "'")):
        return text[1:-1] if len(text) >= 2 else None
    if text.startswith(('r"', "r'")):
        return text[2:-1] if len(text) >= 3 else None
    return None


def _number(text: str) -> int | float | None:
    """Go's ParseInt(text, 0, 64), else ParseFloat(text, 64); None where both refuse."""
    text = text.strip()
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


_MISSING = object()


def _value(node) -> Any:
    """cog's parseDefaultValue: a literal's value, or _MISSING where cog cannot read it."""
    kind = node.type
    if kind in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[kind]
    if kind in ("integer", "float", "unary_operator"):
        number = _number(_text(node))
        return _MISSING if number is None else number
    if kind in ("string", "concatenated_string"):
        text = _string(node)
        return _MISSING if text is None else text
    if kind in ("list", "set", "tuple"):
        items = [_value(child) for child in node.named_children]
        if kind != "tuple" and _MISSING in items:
            return _MISSING
        return [item for item in items if item is not _MISSING]
    if kind == "dictionary":
        pairs = [
            (_value(p.child_by_field_name("key")), _value(p.child_by_field_name("value")))
            for p in node.named_children
            if p.type == "pair"
        ]
        return {k: v for k, v in pairs if _MISSING not in (k, v)}
    return _MISSING


def _module_scope(root) -> dict[str, Any]:
    """cog's collectModuleScope: top-level `NAME = literal` assignments, read as literals."""
    scope = {}
    for statement in root.named_children:
        if statement.type != "expression_statement" or statement.named_child_count != 1:
            continue
        assignment = statement.named_children[0]
        if assignment.type != "assignment":
            continue
        left, right = (assignment.child_by_field_name(f) for f in ("left", "right"))
        if left is None or right is None or left.type != "identifier":
            continue
        value = _value(right)
        if value is not _MISSING:
            scope[_text(left)] = value
    return scope


def _run_method(root, predictor: str):
    for statement in root.named_children:
        node = statement
        if node.type == "decorated_definition":
            node = node.child_by_field_name("definition")
        if node.type == "class_definition" and _text(node.child_by_field_name("name")) == predictor:
            methods = {}
            for item in node.child_by_field_name("body").named_children:
                if item.type == "decorated_definition":
                    item = item.child_by_field_name("definition")
                if item.type == "function_definition":
                    methods[_text(item.child_by_field_name("name"))] = item
            for name in ("run", "predict"):
                if name in methods:
                    return methods[name]
            raise SchemaError(f"class {predictor} has no run() or predict() method")
    raise SchemaError(f"no class {predictor} at the top level")


def _input_call(node) -> bool:
    return (
        node is not None
        and node.type == "call"
        and _text(node.child_by_field_name("function")) == "Input"
    )


def published_inputs(path: Path, predictor: str = "Predictor") -> dict[str, dict[str, Any]]:
    """Each input of `predictor`'s run() in the file at `path`, as `cog build` publishes it.

    Returns {input name: fields}, in the signature's order. `fields` always has "type", the
    annotation's name ("int", "float", "str", "bool" or "Path"), and has each of
    "description", "default", "ge", "le", "min_length", "max_length" and "choices" that cog
    publishes, with its value:
    a description is the string cog reads (escapes and adjacent literals left as written),
    a bound a float (cog reads every bound as one), a length an int, choices a list. cog
    quietly drops a description or a bound it cannot read, so those are then absent; a
    default it cannot read it publishes as None.
    A required input (no default) has no "default". Raises SchemaError where `cog build`
    would stop (choices it cannot read, a parameter without an annotation) or where the
    annotation is one this project does not use.
    """
    root = _parse(path)
    scope = _module_scope(root)
    inputs = {}
    for param in _run_method(root, predictor).child_by_field_name("parameters").named_children:
        if param.type in ("identifier", "comment"):
            continue  # self, and comments, which cog's extractInputs passes over too
        if param.type not in ("typed_parameter", "typed_default_parameter"):
            raise SchemaError(f"{path.name}: parameter {_text(param)!r} needs a type annotation")
        if param.type == "typed_parameter":
            name, annotation, value = _text(param.named_children[0]), param.named_children[-1], None
        else:
            name = _text(param.child_by_field_name("name"))
            annotation, value = (
                param.child_by_field_name("type"),
                param.child_by_field_name("value"),
            )
        kind = _text(annotation)
        if _base_type(kind) not in JSON_TYPES:
            raise SchemaError(f"{path.name}: {name}: annotation {kind!r} is not read here")
        fields: dict[str, Any] = {"type": kind}
        if _input_call(value):
            fields |= _input_fields(name, value, scope, path)
        elif value is not None:
            default = _value(value)
            if default is _MISSING and value.type == "identifier":
                default = scope.get(_text(value), _MISSING)
            if default is _MISSING:
                message = f"{path.name}: {name}: cog cannot read the default {_text(value)}"
                raise SchemaError(message)
            fields["default"] = default
        inputs[name] = fields
    return inputs


def _input_fields(name: str, call, scope: dict[str, Any], path: Path) -> dict[str, Any]:
    """cog's parseInputCall: the keywords of one Input(...) as cog reads them."""
    fields: dict[str, Any] = {}
    for argument in call.child_by_field_name("arguments").named_children:
        if argument.type != "keyword_argument":
            continue
        key, node = (
            _text(argument.child_by_field_name("name")),
            argument.child_by_field_name("value"),
        )
        named = scope.get(_text(node), _MISSING) if node.type == "identifier" else _MISSING
        if key == "default":
            value = _value(node)
            value = named if value is _MISSING else value
            fields["default"] = None if value is _MISSING else value
        elif key == "description":
            value = _string(node)
            if value is None and isinstance(named, str):
                value = named
            if value is not None:
                fields["description"] = value
        elif key in ("ge", "le"):
            value = _number(_text(node))
            if value is not None:
                fields[key] = float(value)
        elif key in ("min_length", "max_length"):
            value = _number(_text(node))
            if value is not None:
                fields[key] = int(value)  # cog: uint64(parseNumberLiteral)
        elif key == "choices":
            value = _value(node) if node.type == "list" else named
            if not isinstance(value, list):
                message = f"{path.name}: {name}: cog cannot read the choices {_text(node)}"
                raise SchemaError(message)
            fields["choices"] = value
    return dict(sorted(fields.items(), key=lambda item: FIELDS.index(item[0])))


def python_inputs(path: Path, predictor: str = "Predictor") -> dict[str, dict[str, Any]]:
    """What Python means by the same fields: published_inputs' shape, each expression evaluated.

    Keywords are evaluated as literals, a name as the module's top-level assignment of it
    (what `cog build` could at best resolve); bounds are floats as cog publishes them.
    Raises SchemaError for an expression that is neither.
    """
    tree = ast.parse(path.read_text())
    scope = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    with contextlib.suppress(ValueError):
                        scope[target.id] = ast.literal_eval(node.value)

    def evaluate(name: str, node: ast.expr) -> Any:
        if isinstance(node, ast.Name) and node.id in scope:
            return scope[node.id]
        try:
            return ast.literal_eval(node)
        except ValueError:
            message = f"{path.name}: {name}: {ast.unparse(node)} is not a literal"
            raise SchemaError(message) from None

    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == predictor)
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    run = methods.get("run") or methods["predict"]
    args = run.args.args[1:]
    defaults = [None] * (len(args) - len(run.args.defaults)) + list(run.args.defaults)
    inputs = {}
    for arg, default in zip(args, defaults, strict=True):
        fields: dict[str, Any] = {"type": ast.unparse(arg.annotation)}
        if isinstance(default, ast.Call) and ast.unparse(default.func) == "Input":
            keywords = {k.arg: evaluate(arg.arg, k.value) for k in default.keywords}
            for key in FIELDS:
                if key in keywords:
                    value = keywords[key]
                    fields[key] = float(value) if key in ("ge", "le") else value
        elif default is not None:
            fields["default"] = evaluate(arg.arg, default)
        inputs[arg.arg] = fields
    return inputs


def _title(name: str) -> str:
    """cog's TitleCase: `sync_weight` -> `Sync Weight`."""
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _base_type(annotation: str) -> str:
    """The type of an annotation, without `| None` (an Optional input's): `Path | None` -> Path."""
    return annotation.removesuffix(" | None")


def _input_schema(inputs: dict[str, dict[str, Any]]) -> tuple[dict, list[tuple[str, dict]]]:
    """cog's buildInputSchema: the Input component, and an enum component per choices."""
    properties, required, enums = _Ordered(), [], []
    for order, (name, fields) in enumerate(inputs.items()):
        json_type = JSON_TYPES[_base_type(fields["type"])]
        optional = fields["type"] != _base_type(fields["type"])
        prop: dict[str, Any] = {"x-order": order}
        if fields.get("choices"):
            enum = {"title": name, "description": "An enumeration.", "type": json_type["type"]}
            enums.append((name, enum | {"enum": fields["choices"]}))
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop |= {"title": _title(name), **json_type}
        # A default of None on a non-Optional input is no default: the input is required. An
        # Optional one (`X | None`) may be left out, and may be null (cog's Repetition.OPTIONAL).
        if fields.get("default") is not None:
            prop["default"] = fields["default"]
        elif not optional:
            required.append(name)
        if optional:
            prop["nullable"] = True
        if "description" in fields:
            prop["description"] = fields["description"]
        for key, schema_key in (
            ("ge", "minimum"),
            ("le", "maximum"),
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
        ):
            if key in fields:
                prop[schema_key] = fields[key]
        properties[name] = prop
    schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def openapi_schema(path: Path, predictor: str = "Predictor") -> dict[str, Any]:
    """The OpenAPI 3.0.2 document `cog build` generates for the predictor (returning a Path)."""
    root = _parse(path)
    returns = _run_method(root, predictor).child_by_field_name("return_type")
    if returns is None or _text(returns) != "Path":
        raise SchemaError(f"{path.name}: only a run() that returns Path is read here")
    return openapi_document(published_inputs(path, predictor))


def openapi_document(inputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI document of a run() returning Path whose inputs cog publishes as `inputs`
    (published_inputs' shape)."""
    inputs_schema, enums = _input_schema(inputs)
    components = _Ordered(Input=inputs_schema, Output={**JSON_TYPES["Path"], "title": "Output"})
    components |= dict(enums)
    components["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {
            "id": {"title": "Id", "type": "string"},
            "input": {"$ref": "#/components/schemas/Input"},
        },
    }
    stamp = {"type": "string", "format": "date-time"}
    components["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", **stamp},
            "started_at": {"title": "Started At", **stamp},
            "completed_at": {"title": "Completed At", **stamp},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    components["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    components["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            }
        },
    }
    components["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": importlib.metadata.version("cog")},
        "paths": _paths(),
        "components": {"schemas": components},
    }


def _paths() -> dict[str, Any]:
    """cog's fixed paths for a predictor: root, health check, predictions and cancel."""

    def answer(schema: dict) -> dict:
        return {"content": {"application/json": {"schema": schema}}}

    ok = {"200": {"description": "Successful Response", **answer({})}}
    invalid = {
        "422": {
            "description": "Validation Error",
            **answer({"$ref": "#/components/schemas/HTTPValidationError"}),
        }
    }
    predict = {
        "summary": "Predict",
        "description": "Run a single prediction on the model",
        "operationId": "predict_predictions_post",
        "requestBody": answer({"$ref": "#/components/schemas/PredictionRequest"}),
        "responses": {
            "200": {
                "description": "Successful Response",
                **answer({"$ref": "#/components/schemas/PredictionResponse"}),
            },
            **invalid,
        },
    }
    cancel = {
        "summary": "Cancel",
        "operationId": "cancel_predictions__prediction_id__cancel_post",
        "parameters": [
            {
                "required": True,
                "schema": {"title": "Prediction Id", "type": "string"},
                "name": "prediction_id",
                "in": "path",
            }
        ],
        "responses": {**ok, **invalid},
    }
    return _Ordered(
        {
            "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": ok}},
            "/health-check": {
                "get": {
                    "summary": "Healthcheck",
                    "operationId": "healthcheck_health_check_get",
                    "responses": ok,
                }
            },
            "/predictions": {"post": predict},
            "/predictions/{prediction_id}/cancel": {"post": cancel},
        }
    )


def _go_json(value: Any) -> Any:
    """The value as Go's encoding/json writes it: plain maps sorted, floats like 20 not 20.0."""
    if isinstance(value, dict):
        items = value.items() if isinstance(value, _Ordered) else sorted(value.items())
        return {k: _go_json(v) for k, v in items}
    if isinstance(value, list):
        return [_go_json(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def openapi_text(document: dict[str, Any]) -> str:
    """The document as `cog build` writes it: Go's encoding/json, compact."""
    text = json.dumps(_go_json(document), separators=(",", ":"), ensure_ascii=False)
    # Go escapes these three for HTML; they only occur inside strings.
    for char in "<>&":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def write_openapi_schema(path: Path, out: Path, predictor: str = "Predictor") -> Path:
    """Write the predictor's document as `cog build` writes `.cog/openapi_schema.json`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(openapi_text(openapi_schema(path, predictor)))
    return out
