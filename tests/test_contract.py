"""contract/: the schemas, their examples and history, and the TypedDicts that mirror them."""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest
from jsonschema import Draft202012Validator

import worker.contract as contract_module
import worker.contract_types as ct
from worker.contract import KINDS, Contract, Kind, json_type
from worker.errors import ContractViolation, InvalidPayload, UnknownJobType

ROOT = contract_module.DEFAULT_ROOT
JOB_NAMES = [
    "assess-pronunciation",
    "create-simple-audio",
    "generate-audio-lesson",
    "generate-flashcards",
    "generate-lesson",
    "ping",
    "process-image",
]
CONTRACT = Contract.load()


def read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def example_files(validity: str) -> list[tuple[str, Kind, Path]]:
    return [
        (job, kind, path)
        for job in JOB_NAMES
        for kind in KINDS
        for path in sorted((ROOT / job / "examples" / kind / validity).glob("*.json"))
    ]


def example_documents(job: str, kind: Kind) -> list[tuple[Path, Any]]:
    """Every document an example shows, valid or not: the history tests judge them all."""
    base = ROOT / job / "examples" / kind
    valid = [(p, read(p)) for p in sorted((base / "valid").glob("*.json"))]
    invalid = [(p, read(p)["document"]) for p in sorted((base / "invalid").glob("*.json"))]
    return valid + invalid


def history_files(job: str, kind: Kind) -> list[tuple[int, Path]]:
    found = []
    for path in (ROOT / job / "history").glob(f"{kind}.v*.schema.json"):
        match = re.fullmatch(rf"{kind}\.v([1-9][0-9]*)\.schema\.json", path.name)
        assert match, f"{path.name}: history files are named {kind}.v<N>.schema.json"
        found.append((int(match[1]), path))
    return sorted(found)


def example_id(case: tuple[str, Kind, Path]) -> str:
    job, kind, path = case
    return f"{job}/{kind}/{path.stem}"


def validate(job: str, kind: Kind, document: Any) -> None:
    if kind == "payload":
        CONTRACT.validate_payload(job, document)
    else:
        CONTRACT.validate_result(job, document)


# --- the schemas ---------------------------------------------------------------------


def test_job_names() -> None:
    assert CONTRACT.job_names() == JOB_NAMES
    assert all(CONTRACT.has(name) for name in JOB_NAMES)
    assert not CONTRACT.has("node")  # the npm package's folder is not a job


SCHEMA_FILES = sorted(ROOT.glob("*/**/*.schema.json"))


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_schema_is_valid_draft_2020_12(path: Path) -> None:
    schema = read(path)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("job", JOB_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_version_is_carried_and_snapshotted(job: str, kind: Kind) -> None:
    version = CONTRACT.version(job, kind)
    assert CONTRACT.schema(job, kind)["$id"] == f"urn:ai-jobs:{job}:{kind}:v{version}"
    history = history_files(job, kind)
    # Every released version is kept, v1..vN with none missing, and N is the current one.
    assert [v for v, _ in history] == list(range(1, version + 1))
    for v, path in history:
        snapshot = read(path)
        assert (snapshot["x-version"], snapshot["$id"]) == (v, f"urn:ai-jobs:{job}:{kind}:v{v}")


def test_schema_returns_a_copy() -> None:
    CONTRACT.schema("ping", "payload")["properties"].clear()
    CONTRACT.validate_payload("ping", {"sleepMs": 1})
    with pytest.raises(InvalidPayload):
        CONTRACT.validate_payload("ping", {"sleepMs": -1})


def test_validators_are_built_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    contract = Contract.load()

    def no_new_validators(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a validator was built per call")

    monkeypatch.setattr(contract_module, "Draft202012Validator", no_new_validators)
    contract.validate_payload("ping", {})
    contract.validate_result("ping", read(ROOT / "ping/examples/result/valid/typical.json"))


def test_unknown_job_name() -> None:
    with pytest.raises(UnknownJobType, match=r"^Unknown job type: nope$"):
        CONTRACT.validate_payload("nope", {})
    with pytest.raises(UnknownJobType):
        CONTRACT.validate_result("nope", {})


def test_load_refuses_a_job_with_one_schema(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "ping", tmp_path / "ping")
    (tmp_path / "ping" / "result.schema.json").unlink()
    with pytest.raises(ValueError, match=r"result\.schema\.json: missing"):
        Contract.load(tmp_path)


def test_load_refuses_a_version_mismatch(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "ping", tmp_path / "ping")
    path = tmp_path / "ping" / "payload.schema.json"
    path.write_text(json.dumps({**read(path), "x-version": 2}), encoding="utf-8")
    with pytest.raises(ValueError, match="x-version"):
        Contract.load(tmp_path)


def test_structured_output_defs_list_every_property_as_required() -> None:
    # OpenAI strict structured output requires every property of every object to be required.
    def objects(node: Any) -> list[dict[str, Any]]:
        if isinstance(node, list):
            return [o for item in node for o in objects(item)]
        if not isinstance(node, dict):
            return []
        found = [node] if "properties" in node else []
        return found + [o for value in node.values() for o in objects(value)]

    for job in ("generate-flashcards", "generate-lesson"):
        for name, definition in CONTRACT.schema(job, "result")["$defs"].items():
            for obj in objects(definition):
                assert sorted(obj["required"]) == sorted(obj["properties"]), f"{job} $defs/{name}"


# --- the examples --------------------------------------------------------------------


@pytest.mark.parametrize("job", JOB_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_schema_has_valid_and_invalid_examples(job: str, kind: Kind) -> None:
    for validity in ("valid", "invalid"):
        folder = ROOT / job / "examples" / kind / validity
        assert list(folder.glob("*.json")), f"no examples in {folder}"


def test_interop_test_vector_is_a_valid_example() -> None:
    # INTEROP §3's test vector, verbatim: the Node package hashes this same file.
    assert read(ROOT / "generate-flashcards/examples/payload/valid/interop-test-vector.json") == {
        "content": "Idempotency test content. Medical terms: cardiology, pathology, radiology.",
        "subject": "Medicine",
        "topic": "Medical Specialties",
        "userId": "test-idempotency-user",
        "nativeLanguage": "English",
    }


@pytest.mark.parametrize("case", example_files("valid"), ids=example_id)
def test_valid_example(case: tuple[str, Kind, Path]) -> None:
    job, kind, path = case
    validate(job, kind, read(path))


@pytest.mark.parametrize("case", example_files("invalid"), ids=example_id)
def test_invalid_example(case: tuple[str, Kind, Path]) -> None:
    job, kind, path = case
    example = read(path)
    assert set(example) == {"reason", "path", "document"} and example["reason"].strip()
    expected = InvalidPayload if kind == "payload" else ContractViolation
    with pytest.raises(expected) as caught:
        validate(job, kind, example["document"])
    error = caught.value
    assert isinstance(error, InvalidPayload | ContractViolation)
    assert error.path == example["path"], str(error)
    assert error.problem and not error.problem[0].isupper()  # a clause after "field: "


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing-user-id", "userId: is required"),
        ("content-not-string", "content: expected string, got integer"),
        ("empty-content", "content: must not be empty"),
        ("blank-content", "content: must not be blank"),
        ("not-an-object", "(payload): expected object, got array"),
    ],
)
def test_payload_error_messages(name: str, message: str) -> None:
    document = read(ROOT / f"generate-flashcards/examples/payload/invalid/{name}.json")["document"]
    with pytest.raises(InvalidPayload) as caught:
        CONTRACT.validate_payload("generate-flashcards", document)
    assert str(caught.value) == f"Invalid payload for generate-flashcards: {message}"


def test_result_error_messages() -> None:
    def message(name: str) -> str:
        path = ROOT / f"generate-flashcards/examples/result/invalid/{name}.json"
        document = read(path)["document"]
        with pytest.raises(ContractViolation) as caught:
            CONTRACT.validate_result("generate-flashcards", document)
        return str(caught.value)

    assert message("card-bad-difficulty") == (
        "Bug: result of generate-flashcards breaks the contract at flashcards/0/difficulty:"
        " must be one of beginner, intermediate, expert"
    )
    assert message("success-false").endswith("at success: must be true")
    assert message("token-usage-negative").endswith("at tokenUsage: must be >= 0")


# --- the history: how a schema may change --------------------------------------------


@pytest.mark.parametrize("job", JOB_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_what_an_earlier_version_accepted_is_still_accepted(job: str, kind: Kind) -> None:
    # Jobs (and results) written against any earlier version may still be in Redis, or come
    # from a side not yet deployed: the current schema must accept all of them.
    current = Draft202012Validator(CONTRACT.schema(job, kind))
    for version, path in history_files(job, kind):
        earlier = Draft202012Validator(read(path))
        for example, document in example_documents(job, kind):
            if earlier.is_valid(document):
                assert current.is_valid(document), f"{example.name}: valid in v{version}, not now"


@pytest.mark.parametrize("job", JOB_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_within_a_version_older_readers_accept_new_documents(job: str, kind: Kind) -> None:
    # Within one version both sides may run old and new code at once (a rolling deploy):
    # what the current schema calls valid must pass the version's first release too.
    version = CONTRACT.version(job, kind)
    released = Draft202012Validator(read(ROOT / job / "history" / f"{kind}.v{version}.schema.json"))
    for path in sorted((ROOT / job / "examples" / kind / "valid").glob("*.json")):
        assert released.is_valid(read(path)), f"{path.name} is rejected by the released v{version}"


# --- the TypedDicts ------------------------------------------------------------------

# (TypedDict, job, kind, JSON pointer of the object schema inside that file)
TYPED: list[tuple[type, str, Kind, str]] = [
    (ct.FlashcardsPayload, "generate-flashcards", "payload", ""),
    (ct.FlashcardsResult, "generate-flashcards", "result", ""),
    (ct.Flashcard, "generate-flashcards", "result", "/$defs/card"),
    (ct.LessonPayload, "generate-lesson", "payload", ""),
    (ct.LessonResult, "generate-lesson", "result", ""),
    (ct.LessonRow, "generate-lesson", "result", "/$defs/lessonRow"),
    (ct.KeywordsStep, "generate-lesson", "result", "/$defs/keywordsStep"),
    (ct.TopicsStep, "generate-lesson", "result", "/$defs/topicsStep"),
    (ct.TopicGroup, "generate-lesson", "result", "/$defs/topicsStep/properties/topics/items"),
    (ct.VocabularyItemEnglish, "generate-lesson", "result", "/$defs/vocabularyItemEnglish"),
    (ct.VocabularyItemOther, "generate-lesson", "result", "/$defs/vocabularyItemOther"),
    (ct.VocabularyStepEnglish, "generate-lesson", "result", "/$defs/vocabularyStepEnglish"),
    (ct.VocabularyStepOther, "generate-lesson", "result", "/$defs/vocabularyStepOther"),
    (ct.ConversationScript, "generate-lesson", "result", "/$defs/conversationScript"),
    (
        ct.ConversationLine,
        "generate-lesson",
        "result",
        "/$defs/conversationScript/properties/conversation/items",
    ),
    (ct.PingPayload, "ping", "payload", ""),
    (ct.PingResult, "ping", "result", ""),
    (ct.ImagePayload, "process-image", "payload", ""),
    (ct.ImageResult, "process-image", "result", ""),
    (ct.ImagePoint, "process-image", "result", "/$defs/point"),
    (ct.ImageLine, "process-image", "result", "/$defs/line"),
    (ct.ImageWord, "process-image", "result", "/$defs/line/properties/words/items"),
    (ct.WorkerIdentity, "ping", "result", "/properties/worker"),
    (ct.PronunciationPayload, "assess-pronunciation", "payload", ""),
    (ct.PronunciationResult, "assess-pronunciation", "result", ""),
    (ct.PronunciationAssessment, "assess-pronunciation", "result", "/properties/result"),
    (ct.PronunciationWord, "assess-pronunciation", "result", "/$defs/word"),
    (
        ct.PronunciationPhoneme,
        "assess-pronunciation",
        "result",
        "/$defs/word/properties/phonemes/items",
    ),
    (ct.AudioLessonPayload, "generate-audio-lesson", "payload", ""),
    (ct.AudioLessonRow, "generate-audio-lesson", "result", ""),
    (ct.SimpleAudioPayload, "create-simple-audio", "payload", ""),
    (ct.SimpleAudioRow, "create-simple-audio", "result", ""),
]

TYPED_IDS = [typed.__name__ for typed, *_ in TYPED]


def resolve(schema: dict[str, Any], pointer: str) -> Any:
    node: Any = schema
    for part in pointer.lstrip("#").split("/")[1:]:
        node = node[part]
    return node


Admits = tuple[set[str] | None, set[Any] | None]  # (JSON types, allowed values); None: any


def schema_types(schema: dict[str, Any], node: dict[str, Any]) -> Admits:
    """What a property schema admits."""
    if "$ref" in node:
        return schema_types(schema, resolve(schema, node["$ref"]))
    if "const" in node:
        return {json_type(node["const"])}, {node["const"]}
    declared = node.get("type")
    kinds = None if declared is None else {declared} if isinstance(declared, str) else set(declared)
    return kinds, set(node["enum"]) if "enum" in node else None


def python_types(tp: Any) -> Admits:
    """The same for a Python annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return None, None
    if origin is Literal:
        values = set(get_args(tp))
        return {json_type(v) for v in values}, values
    if origin in (Union, types.UnionType):
        parts = [python_types(arg)[0] for arg in get_args(tp)]
        return (None if None in parts else set().union(*parts)), None  # type: ignore[arg-type]
    simple = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
    if tp in simple:
        return {simple[tp]}, None
    if origin is list:
        return {"array"}, None
    if is_typeddict(tp):
        return {"object"}, None
    raise AssertionError(f"no JSON type known for {tp!r}")


@pytest.mark.parametrize(
    ("typed", "job", "kind", "pointer"), TYPED, ids=[t[0].__name__ for t in TYPED]
)
def test_typeddict_matches_schema(typed: type, job: str, kind: Kind, pointer: str) -> None:
    schema = CONTRACT.schema(job, kind)
    node = resolve(schema, pointer)
    properties, required = node["properties"], set(node.get("required", []))
    assert set(typed.__annotations__) == set(properties)
    assert typed.__required_keys__ == required  # type: ignore[attr-defined]
    assert typed.__optional_keys__ == set(properties) - required  # type: ignore[attr-defined]
    for key, annotation in get_type_hints(typed).items():
        assert python_types(annotation) == schema_types(schema, properties[key]), key
        if get_origin(annotation) is list:
            (item,) = get_args(annotation)
            items = properties[key]["items"]
            assert python_types(item)[0] == schema_types(schema, items)[0], f"{key}[]"


def test_every_typeddict_and_schema_object_is_paired() -> None:
    paired = {typed for typed, *_ in TYPED}
    declared = {v for v in vars(ct).values() if is_typeddict(v) and v.__module__ == ct.__name__}
    assert declared == paired
    roots = {(job, kind) for _, job, kind, pointer in TYPED if pointer == ""}
    assert roots == {(job, kind) for job in JOB_NAMES for kind in KINDS}
    for job in JOB_NAMES:
        for kind in KINDS:
            for name in CONTRACT.schema(job, kind).get("$defs", {}):
                assert (job, kind, f"/$defs/{name}") in {(j, k, p) for _, j, k, p in TYPED}
