import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  AUDIO_QUEUE,
  ContractError,
  DEFAULT_JOB_OPTIONS,
  PRIORITY,
  enqueue,
  enqueueAssessPronunciation,
  enqueueProcessImage,
  examples,
  idempotencyKey,
  makeJobId,
} from '../index.js';
import { fakeQueue } from './support/fake-queue.mjs';

const flashcards = examples('generate-flashcards', 'payload', 'valid').find(
  (e) => e.file === 'interop-test-vector.json',
).document;
const JOB_ID = /^generate-flashcards-\d{13}-[0-9a-z]{4,6}$/;

test('adds with the default job options, a job id, NORMAL priority and the idempotency key', async () => {
  const queue = fakeQueue();
  const job = await enqueue(queue, 'generate-flashcards', flashcards);
  const [{ name, data, opts }] = queue.added;
  assert.equal(name, 'generate-flashcards');
  assert.equal(data, flashcards);
  assert.match(opts.jobId, JOB_ID);
  assert.equal(job.id, opts.jobId);
  assert.deepEqual(opts, {
    attempts: 3,
    backoff: { type: 'exponential', delay: 2000 },
    removeOnComplete: { age: 3600, count: 100 },
    removeOnFail: { age: 86400, count: 500 },
    jobId: opts.jobId,
    priority: PRIORITY.NORMAL,
    idempotencyKey: idempotencyKey('generate-flashcards', flashcards),
  });
  assert.notEqual(opts.backoff, DEFAULT_JOB_OPTIONS.backoff, 'each job gets its own copy');
});

test('job types without an idempotency key get none', async () => {
  const queue = fakeQueue();
  await enqueue(queue, 'ping', { echo: 'hi' });
  assert.equal('idempotencyKey' in queue.added[0].opts, false);
  assert.match(queue.added[0].opts.jobId, /^ping-\d{13}-[0-9a-z]{4,6}$/);
});

test('caller options win; a priority may be given by name', async () => {
  const queue = fakeQueue();
  await enqueue(queue, 'generate-flashcards', flashcards, {
    attempts: 1,
    jobId: 'mine',
    priority: 'VIP',
    idempotencyKey: 'idempotency:custom',
  });
  const { opts } = queue.added[0];
  assert.equal(opts.attempts, 1);
  assert.equal(opts.jobId, 'mine');
  assert.equal(opts.priority, PRIORITY.VIP);
  assert.equal(opts.idempotencyKey, 'idempotency:custom');
  await assert.rejects(enqueue(queue, 'ping', {}, { priority: 'URGENT' }), RangeError);
});

test('an invalid payload never reaches the queue', async () => {
  for (const { file, document, path } of examples('generate-flashcards', 'payload', 'invalid')) {
    const queue = fakeQueue();
    await assert.rejects(enqueue(queue, 'generate-flashcards', document), (error) => {
      assert.ok(error instanceof ContractError, file);
      assert.ok(error.errors.some((e) => e.path === path), file);
      return true;
    });
    assert.equal(queue.added.length, 0, file);
  }
  await assert.rejects(enqueue(fakeQueue(), 'generate-flashcards', { ...flashcards, userId: 7 }), {
    message: 'Invalid payload for generate-flashcards: userId: expected string, got integer',
  });
  await assert.rejects(enqueue(fakeQueue(), 'nope', {}), { message: 'Unknown job type: nope' });
});

test('job ids: <name>-<Date.now()>-<4 to 6 base-36 chars>', () => {
  const lengths = new Set();
  for (let i = 0; i < 500; i++) {
    const id = makeJobId('generate-flashcards', 1760380000000);
    assert.match(id, /^generate-flashcards-1760380000000-[0-9a-z]{4,6}$/);
    lengths.add(id.split('-').at(-1).length);
  }
  assert.deepEqual([...lengths].sort(), [4, 5, 6]);
});

test('enqueueProcessImage: web service job id and defaults, no idempotency key', async () => {
  const queue = fakeQueue();
  const payload = { userId: 'u-1', imageUrl: 'https://images.example/page.png' };
  await enqueueProcessImage(queue, payload);
  const [{ name, data, opts }] = queue.added;
  assert.equal(name, 'process-image');
  assert.deepEqual(data, payload);
  assert.match(opts.jobId, /^process-image-\d{13}-[0-9a-z]{4,6}$/);
  assert.equal(opts.attempts, DEFAULT_JOB_OPTIONS.attempts);
  assert.equal(opts.priority, PRIORITY.NORMAL);
  assert.equal(opts.idempotencyKey, undefined);
  await assert.rejects(enqueueProcessImage(fakeQueue(), { userId: 'u-1' }), ContractError);
});

test('assess-pronunciation goes to audio-jobs', () => {
  assert.equal(AUDIO_QUEUE, 'audio-jobs');
});

test('enqueueAssessPronunciation: web service job id and defaults, no idempotency key', async () => {
  const queue = fakeQueue();
  const payload = { referenceText: 'Good morning', audioFilePath: 'recordings/u-1/take-1.wav' };
  const job = await enqueueAssessPronunciation(queue, payload);
  const [{ name, data, opts }] = queue.added;
  assert.equal(name, 'assess-pronunciation');
  assert.deepEqual(data, payload);
  assert.match(opts.jobId, /^assess-pronunciation-\d{13}-[0-9a-z]{4,6}$/);
  assert.equal(job.id, opts.jobId);
  assert.deepEqual(opts, {
    ...DEFAULT_JOB_OPTIONS,
    jobId: opts.jobId,
    priority: PRIORITY.NORMAL,
  });
  assert.equal('idempotencyKey' in opts, false);
});

test('enqueueAssessPronunciation: caller options win', async () => {
  const queue = fakeQueue();
  await enqueueAssessPronunciation(
    queue,
    { referenceText: 'Hi', audioUrl: 'https://cdn.example/a.ogg', language: 'en-GB' },
    { attempts: 5, priority: 'VIP' },
  );
  assert.equal(queue.added[0].opts.attempts, 5);
  assert.equal(queue.added[0].opts.priority, PRIORITY.VIP);
});

test('enqueueAssessPronunciation: an invalid payload never reaches the queue', async () => {
  for (const { file, document, path } of examples('assess-pronunciation', 'payload', 'invalid')) {
    const queue = fakeQueue();
    await assert.rejects(enqueueAssessPronunciation(queue, document), (error) => {
      assert.ok(error instanceof ContractError, file);
      assert.ok(error.errors.some((e) => e.path === path), file);
      return true;
    });
    assert.equal(queue.added.length, 0, file);
  }
});
