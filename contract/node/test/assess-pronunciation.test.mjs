import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  AUDIO_JOBS_QUEUE,
  ContractError,
  DEFAULT_JOB_OPTIONS,
  PRIORITY,
  enqueueAssessPronunciation,
  examples,
} from '../index.js';

// Stands in for a bullmq Queue named `audio-jobs`: records what would have been added.
function fakeQueue() {
  const added = [];
  const add = async (name, data, opts) => {
    added.push({ name, data, opts });
    return { id: opts.jobId, name, data, opts };
  };
  return { name: AUDIO_JOBS_QUEUE, added, add };
}

test('the queue is audio-jobs', () => {
  assert.equal(AUDIO_JOBS_QUEUE, 'audio-jobs');
});

test('web service job id and defaults, no idempotency key', async () => {
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

test('caller options win', async () => {
  const queue = fakeQueue();
  await enqueueAssessPronunciation(
    queue,
    { referenceText: 'Hi', audioUrl: 'https://cdn.example/a.ogg', language: 'en-GB' },
    { attempts: 5, priority: 'VIP' },
  );
  assert.equal(queue.added[0].opts.attempts, 5);
  assert.equal(queue.added[0].opts.priority, PRIORITY.VIP);
});

test('an invalid payload never reaches the queue', async () => {
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
