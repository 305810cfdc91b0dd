import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  JOB_TYPES,
  KINDS,
  UnknownJobTypeError,
  examples,
  schemaVersion,
  validatePayload,
  validateResult,
} from '../index.js';

const validators = { payload: validatePayload, result: validateResult };

test('job types are the folders of the contract', () => {
  assert.deepEqual(JOB_TYPES, [
    'assess-pronunciation',
    'create-simple-audio',
    'generate-audio-lesson',
    'generate-flashcards',
    'generate-lesson',
    'ping',
    'process-image',
  ]);
  assert.ok(Object.isFrozen(JOB_TYPES));
});

test('every schema carries its version', () => {
  for (const name of JOB_TYPES) {
    for (const kind of KINDS) {
      const version = schemaVersion(name, kind);
      assert.ok(Number.isInteger(version) && version >= 1, `${name} ${kind}`);
    }
  }
});

for (const name of JOB_TYPES) {
  for (const kind of KINDS) {
    const validate = validators[kind];
    describe(`${name} ${kind}`, () => {
      for (const { file, document } of examples(name, kind, 'valid')) {
        test(`valid: ${file}`, () => {
          assert.deepEqual(validate(name, document), { valid: true, errors: [] });
        });
      }
      for (const { file, document, path, reason } of examples(name, kind, 'invalid')) {
        test(`invalid: ${file} (${reason})`, () => {
          const { valid, errors } = validate(name, document);
          assert.equal(valid, false);
          assert.ok(
            errors.some((error) => error.path === path),
            `no error at ${JSON.stringify(path)}: ${JSON.stringify(errors)}`,
          );
        });
      }
    });
  }
}

test('errors name the field and say what was wrong, worded as the Python worker words them', () => {
  const { errors } = validatePayload('generate-flashcards', {
    content: 42,
    subject: 'Medicine',
    topic: 'Cardiology',
    nativeLanguage: null,
  });
  assert.deepEqual(
    errors.map(({ path, problem }) => `${path}: ${problem}`).sort(),
    [
      'content: expected string, got integer',
      'nativeLanguage: expected string, got null',
      'userId: is required',
    ],
  );
  const card = { front: '', back: 'b', topic: 't', difficulty: 'advanced', example: 'e', pronunciation: '' };
  const broken = { success: false, flashcards: [card], tokenUsage: -1 };
  const result = validateResult('generate-flashcards', broken);
  assert.deepEqual(
    result.errors.map(({ path, problem }) => `${path}: ${problem}`).sort(),
    [
      'flashcards/0/difficulty: must be one of beginner, intermediate, expert',
      'flashcards/0/front: must not be empty',
      'success: must be true',
      'tokenUsage: must be >= 0',
    ],
  );
  assert.deepEqual(validatePayload('generate-flashcards', []).errors, [
    { path: '', problem: 'expected object, got array', keyword: 'type' },
  ]);
});

test('an unknown job name throws, with the worker\'s wording', () => {
  assert.throws(() => validatePayload('nope', {}), UnknownJobTypeError);
  assert.throws(() => validateResult('nope', {}), { message: 'Unknown job type: nope' });
});
