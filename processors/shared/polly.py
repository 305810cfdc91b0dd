"""Text to one MP3 with Amazon Polly: a voice by language, the text in chunks, the chunks joined.

- **Voice**: `voice_for(language)` takes a language name ("Spanish") or code ("es", "es-MX")
  and picks a Polly voice, neural where the language has one (VOICES). A language without a
  voice falls back to DEFAULT_VOICE, the old worker's Joanna (en-US), now neural.
- **Chunks**: SynthesizeSpeech takes at most 3,000 billed characters per request; INTEROP §7
  keeps each chunk at most MAX_CHUNK_CHARS (2,800). `split_text` cuts at sentence ends,
  packing whole sentences; a sentence longer than a chunk is cut at a clause mark, else at a
  space, else hard.
- **Calls**: one SynthesizeSpeech per chunk (MP3, 24 kHz), each in a thread (boto3 blocks)
  under Polly's shared breaker and rate limit (worker.providers, provider `polly`); each call's
  characters (Polly's `x-amzn-RequestCharacters`) are reported with `ctx.provider_usage`.
- **Join**: processors.shared.mp3 checks every chunk's frames and joins them into one stream
  whose duration is counted from its frames.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from processors.shared import mp3
from processors.shared.aws import classify
from worker.context import JobContext
from worker.errors import PermanentJobError, RetryableJobError
from worker.providers import POLLY, Provider

SERVICE = "Amazon Polly"
MAX_CHUNK_CHARS = 2800
SAMPLE_RATE = "24000"
NEURAL, STANDARD = "neural", "standard"


@dataclass(frozen=True)
class Voice:
    language_code: str
    voice_id: str
    engine: str

    def describe(self) -> str:
        return f"{self.voice_id} ({self.language_code}, {self.engine})"


# Polly's voice list (docs "Available voices"): one voice per language, neural where one exists.
VOICES: dict[str, Voice] = {
    v.language_code.lower(): v
    for v in (
        Voice("en-US", "Joanna", NEURAL),
        Voice("en-GB", "Amy", NEURAL),
        Voice("en-AU", "Olivia", NEURAL),
        Voice("en-IN", "Kajal", NEURAL),
        Voice("es-ES", "Lucia", NEURAL),
        Voice("es-MX", "Mia", NEURAL),
        Voice("es-US", "Lupe", NEURAL),
        Voice("fr-FR", "Lea", NEURAL),
        Voice("fr-CA", "Gabrielle", NEURAL),
        Voice("de-DE", "Vicki", NEURAL),
        Voice("it-IT", "Bianca", NEURAL),
        Voice("pt-BR", "Camila", NEURAL),
        Voice("pt-PT", "Ines", NEURAL),
        Voice("nl-NL", "Laura", NEURAL),
        Voice("pl-PL", "Ola", NEURAL),
        Voice("sv-SE", "Elin", NEURAL),
        Voice("nb-NO", "Ida", NEURAL),
        Voice("da-DK", "Sofie", NEURAL),
        Voice("fi-FI", "Suvi", NEURAL),
        Voice("tr-TR", "Burcu", NEURAL),
        Voice("ja-JP", "Kazuha", NEURAL),
        Voice("ko-KR", "Seoyeon", NEURAL),
        Voice("cmn-CN", "Zhiyu", NEURAL),
        Voice("yue-CN", "Hiujin", NEURAL),
        Voice("hi-IN", "Kajal", NEURAL),
        Voice("ar-AE", "Hala", NEURAL),
        Voice("arb", "Zeina", STANDARD),
        Voice("ru-RU", "Tatyana", STANDARD),
        Voice("ro-RO", "Carmen", STANDARD),
        Voice("cy-GB", "Gwyneth", STANDARD),
        Voice("is-IS", "Dora", STANDARD),
    )
}
DEFAULT_VOICE = VOICES["en-us"]
# Language names and bare codes as the app sends them (`nativeLanguage: "Spanish"`).
_ALIASES = {
    "english": "en-us", "en": "en-us", "american english": "en-us",
    "british english": "en-gb", "australian english": "en-au",
    "spanish": "es-es", "es": "es-es", "mexican spanish": "es-mx",
    "french": "fr-fr", "fr": "fr-fr", "german": "de-de", "de": "de-de",
    "italian": "it-it", "it": "it-it",
    # Brazilian Portuguese: the larger share of learners; "pt-PT" picks Inês.
    "portuguese": "pt-br", "pt": "pt-br", "brazilian portuguese": "pt-br",
    "dutch": "nl-nl", "nl": "nl-nl", "polish": "pl-pl", "pl": "pl-pl",
    "swedish": "sv-se", "sv": "sv-se", "norwegian": "nb-no", "no": "nb-no", "nb": "nb-no",
    "danish": "da-dk", "da": "da-dk", "finnish": "fi-fi", "fi": "fi-fi",
    "turkish": "tr-tr", "tr": "tr-tr", "japanese": "ja-jp", "ja": "ja-jp",
    "korean": "ko-kr", "ko": "ko-kr",
    "chinese": "cmn-cn", "mandarin": "cmn-cn", "zh": "cmn-cn", "zh-cn": "cmn-cn",
    "cantonese": "yue-cn", "hindi": "hi-in", "hi": "hi-in",
    "arabic": "arb", "ar": "arb", "russian": "ru-ru", "ru": "ru-ru",
    "romanian": "ro-ro", "ro": "ro-ro", "welsh": "cy-gb", "cy": "cy-gb",
    "icelandic": "is-is", "is": "is-is",
}  # fmt: skip


def voice_for(language: str | None) -> tuple[Voice, bool]:
    """(the voice, True when the language was known; False: DEFAULT_VOICE stands in)."""
    key = (language or "").strip().lower().replace("_", "-")
    if not key:
        return DEFAULT_VOICE, True
    voice = VOICES.get(_ALIASES.get(key, key))
    return (voice, True) if voice is not None else (DEFAULT_VOICE, False)


# A sentence ends at . ! ? … (and their CJK forms) with what closes it (quotes, brackets),
# followed by space or the end; a line break ends one too.
_SENTENCE = re.compile(r"[^\n]*?(?:[.!?…。！？]+[\"'”’)\]]*(?=\s|$)|\n|$)", re.S)
_CLAUSE = re.compile(r"[,;:、，；：]\s")


def split_text(text: str, limit: int = MAX_CHUNK_CHARS) -> list[str]:
    """Whole sentences packed into chunks of at most `limit` characters (none empty)."""
    chunks: list[str] = []
    current = ""
    for sentence in _sentences(text):
        for piece in _fit(sentence, limit):
            joined = f"{current} {piece}" if current else piece
            if len(joined) <= limit:
                current = joined
            else:
                chunks.append(current)
                current = piece
    if current:
        chunks.append(current)
    return chunks


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _fit(sentence: str, limit: int) -> list[str]:
    """A sentence cut into pieces of at most `limit`: at clause marks, spaces, else hard."""
    pieces: list[str] = []
    rest = sentence
    while len(rest) > limit:
        window = rest[: limit + 1]
        cut = max((m.end() for m in _CLAUSE.finditer(window)), default=0)
        if cut == 0:
            cut = window.rfind(" ") + 1
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


@dataclass(frozen=True)
class Speech:
    """One joined MP3 and what it cost."""

    audio: bytes
    duration_s: float
    characters: int
    usd: float
    chunks: int
    voice: Voice

    @property
    def unit(self) -> str:
        return f"characters-{self.voice.engine}"


class Synthesizer:
    """SynthesizeSpeech chunk by chunk through one boto3 Polly client and the `polly` provider."""

    def __init__(self, client: Any, provider: Provider) -> None:
        self.client = client
        self.provider = provider

    async def read_aloud(self, text: str, language: str | None, ctx: JobContext) -> Speech:
        """`speak` in the voice for `language`, with the job's log line: characters, cost."""
        voice, known = voice_for(language)
        if not known:
            ctx.log.warning("No Polly voice for language {!r}; using {}", language,
                            voice.describe())  # fmt: skip
        speech = await self.speak(text, voice, ctx)
        ctx.log.info(
            "Polly: {} characters ({}) in {} chunk(s), ~${:.4f}, {:.1f} s of audio, voice {}",
            speech.characters,
            speech.unit,
            speech.chunks,
            speech.usd,
            speech.duration_s,
            voice.describe(),
        )
        return speech

    async def speak(self, text: str, voice: Voice, ctx: JobContext) -> Speech:
        chunks = split_text(text)
        if not chunks:
            raise PermanentJobError("There is no text to turn into speech")
        pieces: list[bytes] = []
        characters = 0
        usd = 0.0
        for chunk in chunks:
            audio, billed = await self._synthesize(chunk, voice, ctx)
            pieces.append(audio)
            characters += billed
            usd += ctx.provider_usage(POLLY, f"characters-{voice.engine}", billed)
        try:
            # Parsing every frame takes ~0.17 s per 30 min of audio: off the event loop, where
            # it would hold up every other job and lock renewal.
            joined = await asyncio.to_thread(mp3.join, pieces)
        except mp3.InvalidMp3 as exc:  # not ours to fix, and maybe not Polly's next time
            raise RetryableJobError(f"{SERVICE} returned audio that is not MP3: {exc}") from exc
        if joined.frame_count == 0:
            raise RetryableJobError(f"{SERVICE} returned no audio frames")
        return Speech(joined.frames, joined.duration_s, characters, usd, len(chunks), voice)

    async def _synthesize(self, text: str, voice: Voice, ctx: JobContext) -> tuple[bytes, int]:
        async with self.provider.call(ctx.redis) as permit:
            try:
                # boto3 blocks: the call and the read of its stream run in a thread.
                audio, billed = await asyncio.to_thread(self._call, text, voice)
            except Exception as exc:
                raise await permit.failed(classify(exc, SERVICE, POLLY)) from exc
            await permit.succeeded()
        return audio, billed

    def _call(self, text: str, voice: Voice) -> tuple[bytes, int]:
        reply = self.client.synthesize_speech(
            Engine=voice.engine,
            LanguageCode=voice.language_code,
            OutputFormat="mp3",
            SampleRate=SAMPLE_RATE,
            Text=text,
            TextType="text",
            VoiceId=voice.voice_id,
        )
        with reply["AudioStream"] as stream:
            audio = stream.read()
        return audio, int(reply.get("RequestCharacters") or len(text))
