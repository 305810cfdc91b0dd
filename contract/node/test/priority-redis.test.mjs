// The named priorities against a real BullMQ on a real Redis: VIP is taken first.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import { test } from 'node:test';
import { Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import { PRIORITY, enqueue } from '../index.js';

const url = new URL(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379');
const connection = { host: url.hostname, port: Number(url.port || 6379) };

function redisReachable() {
  return new Promise((resolve) => {
    const socket = connect(connection);
    socket.setTimeout(1000);
    socket.once('connect', () => (socket.destroy(), resolve(true)));
    socket.once('error', () => resolve(false));
    socket.once('timeout', () => (socket.destroy(), resolve(false)));
  });
}

const TITLE = 'a BullMQ worker takes VIP, then NORMAL, then BATCH (and an unprioritized job before all)';

test(TITLE, { timeout: 20000 }, async (t) => {
  if (!(await redisReachable())) return t.skip(`no Redis at ${url.host}`);
  // bullmq 6 under ESM wants a client instance; the Worker duplicates it for its blocking reads.
  const redis = new Redis({ ...connection, maxRetriesPerRequest: null });
  // A queue of its own, removed afterwards; the rest of the server is left alone.
  const queue = new Queue(`contract-prio-${randomBytes(4).toString('hex')}`, { connection: redis });
  let worker;
  try {
    // Added worst-first, so only the priorities can put VIP first.
    await enqueue(queue, 'ping', { echo: 'BATCH' }, { priority: PRIORITY.BATCH });
    await enqueue(queue, 'ping', { echo: 'NORMAL' });
    await enqueue(queue, 'ping', { echo: 'VIP' }, { priority: PRIORITY.VIP });
    // What enqueue prevents: a job added with no priority jumps ahead of every prioritized one.
    await queue.add('ping', { echo: 'unprioritized' });

    const prioritized = await queue.getPrioritized();
    assert.deepEqual(prioritized.map((job) => job.data.echo), ['VIP', 'NORMAL', 'BATCH']);

    const taken = [];
    await new Promise((resolve, reject) => {
      worker = new Worker(
        queue.name,
        async (job) => {
          taken.push(job.data.echo);
          if (taken.length === 4) resolve();
        },
        { connection: redis, concurrency: 1 },
      );
      worker.on('error', reject);
    });
    assert.deepEqual(taken, ['unprioritized', 'VIP', 'NORMAL', 'BATCH']);
  } finally {
    await worker?.close();
    await queue.obliterate({ force: true });
    await queue.close();
    await redis.quit();
  }
});
