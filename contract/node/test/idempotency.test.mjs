import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { examples, idempotencyKey } from '../index.js';

// INTEROP §3's test vector.
const VECTOR = {
  content: 'Idempotency test content. Medical terms: cardiology, pathology, radiology.',
  subject: 'Medicine',
  topic: 'Medical Specialties',
  userId: 'test-idempotency-user',
  nativeLanguage: 'English',
};
const EXPECTED =
  'idempotency:generate-flashcards:a24ac08a97b3e40de6cd10fe1b0abdd26a6324b613a4a4758d4b0947e3ced2f4';

test('the INTEROP test vector', () => {
  assert.equal(idempotencyKey('generate-flashcards', VECTOR), EXPECTED);
});

test('the contract example of the vector hashes to the same key', () => {
  const { document } = examples('generate-flashcards', 'payload', 'valid').find(
    (e) => e.file === 'interop-test-vector.json',
  );
  assert.equal(idempotencyKey('generate-flashcards', document), EXPECTED);
});

test('targetLanguage, legacy flags and unknown fields are not part of the key', () => {
  const payload = { ...VECTOR, targetLanguage: 'Spanish', showNativeLanguage: true, extra: 1 };
  const key = idempotencyKey('generate-flashcards', payload);
  assert.equal(key, EXPECTED);
});

test('only the first 1000 UTF-16 code units of content count', () => {
  const long = { ...VECTOR, content: 'x'.repeat(1000) };
  const longer = { ...long, content: `${long.content}tail` };
  assert.equal(idempotencyKey('generate-flashcards', longer), idempotencyKey('generate-flashcards', long));
});

test('an absent nativeLanguage is dropped, not written as null', () => {
  const { nativeLanguage, ...rest } = VECTOR;
  const { userId, content, subject, topic } = rest;
  const basis = JSON.stringify({ jobType: 'ping', userId, content, subject, topic });
  const expected = `idempotency:ping:${createHash('sha256').update(basis).digest('hex')}`;
  assert.equal(idempotencyKey('ping', rest), expected);
  assert.notEqual(idempotencyKey('generate-flashcards', rest), EXPECTED);
});

test('non-ASCII content is hashed as UTF-8', () => {
  const payload = { ...VECTOR, content: 'Größe 心臓 🫀' };
  const basis =
    '{"jobType":"generate-flashcards","userId":"test-idempotency-user","content":"Größe 心臓 🫀",' +
    '"subject":"Medicine","topic":"Medical Specialties","nativeLanguage":"English"}';
  const expected = createHash('sha256').update(Buffer.from(basis, 'utf8')).digest('hex');
  assert.equal(idempotencyKey('generate-flashcards', payload), `idempotency:generate-flashcards:${expected}`);
});
