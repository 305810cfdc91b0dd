// The web service's idempotency key (INTEROP §3): the worker caches a result under it and the
// web service reads it back before enqueueing, so these bytes must match the web service's exactly.
import { createHash } from 'node:crypto';

// Job types enqueued with a key. Only generate-flashcards is documented to have one; the key
// ignores targetLanguage (and would ignore sourceFileName), so adding generate-lesson would
// serve one language's cached lessons for another.
export const IDEMPOTENT_JOB_TYPES = Object.freeze(['generate-flashcards']);

/** `idempotency:<jobType>:<sha256 hex>`; payload.content must be a string. */
export function idempotencyKey(name, payload) {
  const { userId, content, subject, topic, nativeLanguage } = payload;
  if (typeof content !== 'string') throw new TypeError('idempotencyKey: payload.content must be a string');
  // Key order and JSON.stringify's dropping of undefined values are part of the format;
  // slice counts UTF-16 code units, as the web service's does.
  const basis = JSON.stringify({
    jobType: name,
    userId,
    content: content.slice(0, 1000),
    subject,
    topic,
    nativeLanguage,
  });
  return `idempotency:${name}:${createHash('sha256').update(basis, 'utf8').digest('hex')}`;
}
