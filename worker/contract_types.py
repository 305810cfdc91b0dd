"""TypedDicts for the payloads and results in contract/; a test keeps the two in step."""

# No `from __future__ import annotations` here: on Python 3.11 a TypedDict only sees
# NotRequired[...] when the annotation is evaluated, and the schema test relies on
# __required_keys__ / __optional_keys__ being right.

from typing import Any, Literal, NotRequired, TypedDict

Difficulty = Literal["beginner", "intermediate", "expert"]
Speaker = Literal["Assistant", "User"]


# --- generate-flashcards -------------------------------------------------------------


class FlashcardsPayload(TypedDict):
    content: str
    subject: str
    topic: str  # "AI Selection": detect the topics
    userId: str
    nativeLanguage: NotRequired[str]  # default "English"
    targetLanguage: NotRequired[str]  # default "English"; "en-GB" is English too
    showNativeLanguage: NotRequired[bool]  # legacy: means target English


class Flashcard(TypedDict):
    front: str
    back: str
    topic: str
    difficulty: Difficulty
    example: str
    pronunciation: str


class FlashcardsResult(TypedDict):
    success: Literal[True]
    flashcards: list[Flashcard]
    tokenUsage: int


# --- generate-lesson -----------------------------------------------------------------


class LessonPayload(TypedDict):
    content: str
    subject: str
    topic: str
    userId: str
    nativeLanguage: NotRequired[str]  # default "English"
    targetLanguage: NotRequired[str]  # default "English"
    sourceFileName: NotRequired[str]  # default "Unknown Source"


class LessonRow(TypedDict):
    """The esp_lessons columns the contract names; a row may carry more (created_at, ...)."""

    id: str | int
    user_id: str
    title: str
    subject: str
    source_pdf_name: str
    native_language: str
    chat_content: str | None  # a ConversationScript as JSON text


class LessonResult(TypedDict):
    success: Literal[True]
    lessons: list[LessonRow]
    tokenUsage: int


class KeywordsStep(TypedDict):
    keywords: list[str]


class TopicGroup(TypedDict):
    name: str
    keywords: list[str]


class TopicsStep(TypedDict):
    topics: list[TopicGroup]


class VocabularyItemEnglish(TypedDict):
    english_term: str
    definition: str
    native_translation: str
    example_sentence_target: str
    example_sentence_native: str


class VocabularyItemOther(TypedDict):
    target_term: str
    definition: str
    target_translation: str
    example_sentence_target_language: str
    example_sentence_native: str


class VocabularyStepEnglish(TypedDict):
    vocabulary: list[VocabularyItemEnglish]


class VocabularyStepOther(TypedDict):
    vocabulary: list[VocabularyItemOther]


class ConversationLine(TypedDict):
    speaker: Speaker
    message: str


class ConversationScript(TypedDict):
    conversation: list[ConversationLine]


# --- ping ----------------------------------------------------------------------------


class PingPayload(TypedDict):
    echo: NotRequired[Any]
    sleepMs: NotRequired[int]  # 0..600000


class WorkerIdentity(TypedDict):
    host: str
    pid: int
    workerId: str
    version: str


class PingResult(TypedDict):
    pong: Literal[True]
    echo: Any  # payload.echo, None when absent
    jobId: str
    attempt: int  # 1-based
    worker: WorkerIdentity


# --- process-image -------------------------------------------------------------------


class ImagePayload(TypedDict):
    userId: str
    imageUrl: NotRequired[str]  # either imageUrl or storageBucket + storagePath
    storageBucket: NotRequired[str]
    storagePath: NotRequired[str]


class ImagePoint(TypedDict):
    x: int
    y: int


class ImageWord(TypedDict):
    text: str
    confidence: float  # 0..1


class ImageLine(TypedDict):
    text: str
    boundingPolygon: list[ImagePoint]
    words: list[ImageWord]


class ImageResult(TypedDict):
    success: Literal[True]
    text: str  # the lines' text joined by newlines
    lines: list[ImageLine]


# --- assess-pronunciation ------------------------------------------------------------


class PronunciationPayload(TypedDict):
    referenceText: str
    audioFilePath: NotRequired[str]  # `<bucket>/<path>` in Supabase Storage (wins over audioUrl)
    audioUrl: NotRequired[str]
    language: NotRequired[str]  # default en-US
    userId: NotRequired[str]


class PronunciationPhoneme(TypedDict):
    phoneme: str
    accuracyScore: float


class PronunciationWord(TypedDict):
    word: str
    accuracyScore: float
    errorType: str  # None | Omission | Insertion | Mispronunciation | ...
    phonemes: list[PronunciationPhoneme]


class PronunciationAssessment(TypedDict):
    accuracyScore: float
    fluencyScore: float
    completenessScore: float
    pronunciationScore: float
    recognizedText: str
    referenceText: str
    passed: bool
    words: list[PronunciationWord]


class PronunciationResult(TypedDict):
    success: Literal[True]
    result: PronunciationAssessment


# --- generate-audio-lesson, create-simple-audio (queue audio-jobs) -------------------


class AudioLessonPayload(TypedDict):
    lessonId: str | int
    userId: str
    language: NotRequired[str]  # the voice's language; default English (Joanna, en-US)


class AudioLessonRow(TypedDict):
    """The audio_lessons row a generate-audio-lesson job returns (it may carry more columns)."""

    id: str | int
    user_id: str
    lesson_id: str | int
    title: str | None
    status: Literal["completed"]
    audio_url: str
    audio_file_path: str  # the S3 key
    audio_duration: float  # seconds


class SimpleAudioPayload(TypedDict):
    title: str
    scriptText: str  # at most 100,000 characters
    userId: str
    nativeLanguage: NotRequired[str]  # the voice's language; default English


class SimpleAudioRow(TypedDict):
    """The audio_lessons row a create-simple-audio job returns (it may carry more columns)."""

    id: str | int
    user_id: str
    title: str
    status: Literal["completed"]
    audio_url: str
    audio_file_path: str  # the path inside the Audio_Lessons bucket
    audio_duration: float  # seconds
