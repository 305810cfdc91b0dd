import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  AUDIO_QUEUE,
  ContractError,
  DEFAULT_JOB_OPTIONS,
  PRIORITY,
  enqueueCreateSimpleAudio,
  enqueueGenerateAudioLesson,
  examples,
} from '../index.js';
import { fakeQueue } from './support/fake-queue.mjs';

const valid = (name) => examples(name, 'payload', 'valid').map((e) => e.document);
const helpers = [
  ['generate-audio-lesson', enqueueGenerateAudioLesson],
  ['create-simple-audio', enqueueCreateSimpleAudio],
];

test('the audio job types go to the audio-jobs queue', () => {
  assert.equal(AUDIO_QUEUE, 'audio-jobs');
});

for (const [name, helper] of helpers) {
  test(`${helper.name}: web service job id and defaults, no idempotency key`, async () => {
    for (const payload of valid(name)) {
      const queue = fakeQueue(AUDIO_QUEUE);
      const job = await helper(queue, payload);
      const [{ name: added, data, opts }] = queue.added;
      assert.equal(added, name);
      assert.deepEqual(data, payload);
      assert.equal(job.id, opts.jobId);
      assert.match(opts.jobId, new RegExp(`^${name}-\\d{13}-[0-9a-z]{4,6}$`));
      assert.deepEqual(opts, {
        attempts: 3,
        backoff: { type: 'exponential', delay: 2000 },
        removeOnComplete: { age: 3600, count: 100 },
        removeOnFail: { age: 86400, count: 500 },
        jobId: opts.jobId,
        priority: PRIORITY.NORMAL,
      });
      assert.equal('idempotencyKey' in opts, false);
      assert.notEqual(opts.backoff, DEFAULT_JOB_OPTIONS.backoff);
    }
  });

  test(`${helper.name}: caller options win`, async () => {
    const queue = fakeQueue(AUDIO_QUEUE);
    await helper(queue, valid(name)[0], { attempts: 5, priority: 'BATCH', jobId: 'mine' });
    const { opts } = queue.added[0];
    assert.equal(opts.attempts, 5);
    assert.equal(opts.priority, PRIORITY.BATCH);
    assert.equal(opts.jobId, 'mine');
  });

  test(`${helper.name}: an invalid payload never reaches the queue`, async () => {
    for (const { file, document, path } of examples(name, 'payload', 'invalid')) {
      const queue = fakeQueue(AUDIO_QUEUE);
      await assert.rejects(helper(queue, document), (error) => {
        assert.ok(error instanceof ContractError, file);
        assert.ok(error.errors.some((e) => e.path === path), file);
        return true;
      });
      assert.equal(queue.added.length, 0, file);
    }
  });
}
