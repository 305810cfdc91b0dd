// The Node BullMQ worker of the benchmark: bullmq 6.7.0 with the options our Python worker uses
// (worker/consumer.py: lockDuration, stalledInterval, maxStalledCount, drainDelay 5 s, limiter).
//
//   node bench/node_worker.mjs --queue Q --concurrency 3 --processor noop|sleep|openai
//        [--sleep-ms 50] [--limiter 10/1000] [--expect N] [--rss-at 1000,10000]
//        [--openai-url http://127.0.0.1:PORT/v1] [--no-starts]
//
// stdout: one line {"ready": true, ...} once connected, then one line with the measurements when
// `--expect` jobs have finished, or on SIGTERM. Timestamps are epoch milliseconds (fractional).
// The same protocol as bench/py_worker.py; bench/run.py reads both.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Worker } from 'bullmq';
import { redisOptions } from './redis.mjs';

const { values: args } = parseArgs({
  options: {
    queue: { type: 'string' },
    prefix: { type: 'string', default: 'bull' },
    redis: { type: 'string', default: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' },
    concurrency: { type: 'string', default: '3' },
    processor: { type: 'string', default: 'noop' },
    'sleep-ms': { type: 'string', default: '50' },
    limiter: { type: 'string', default: '' },
    expect: { type: 'string', default: '0' },
    'rss-at': { type: 'string', default: '' },
    'openai-url': { type: 'string', default: '' },
    'no-starts': { type: 'boolean', default: false },
  },
});

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function procStatus() {
  const text = readFileSync('/proc/self/status', 'utf8');
  const kb = (field) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0);
  return { vmRssKb: kb('VmRSS'), vmHwmKb: kb('VmHWM') };
}

const keepStarts = !args['no-starts'];
const starts = []; // [jobId, start ms] in start order
const ends = []; // [jobId, completed/failed event ms]
const rssAt = new Set(args['rss-at'].split(',').filter(Boolean).map(Number));
const rssCheckpoints = {};
let finished = 0;
let failed = 0;
let firstStart = null;
let lastEnd = null;

const cpuMs = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
};
let cpuAtFirstStart = 0;

function started(job) {
  const t = now();
  if (firstStart === null) {
    firstStart = t;
    cpuAtFirstStart = cpuMs();
  }
  if (keepStarts) starts.push([job.id, t]);
}

const processors = {
  async noop(job) {
    started(job);
    return { ok: true };
  },
  async sleep(job) {
    started(job);
    await sleep(Number(args['sleep-ms']));
    return { ok: true };
  },
  // The I/O path of generate-flashcards without the SDK: one chat completion, JSON reply.
  async openai(job) {
    started(job);
    const response = await fetch(`${args['openai-url']}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer sk-bench' },
      body: JSON.stringify({
        model: 'gpt-4o-mini',
        messages: [{ role: 'user', content: job.data.content }],
      }),
    });
    if (!response.ok) throw new Error(`openai stand-in answered ${response.status}`);
    const body = await response.json();
    const { flashcards } = JSON.parse(body.choices[0].message.content);
    return { success: true, flashcards, tokenUsage: body.usage.total_tokens };
  },
};
const processor = processors[args.processor];
if (!processor) throw new Error(`unknown --processor ${args.processor}`);

const opts = {
  // Commands wait out a Redis outage instead of failing after ioredis' 20 retries.
  connection: { ...redisOptions(args.redis), maxRetriesPerRequest: null },
  prefix: args.prefix,
  concurrency: Number(args.concurrency),
  lockDuration: 30_000,
  stalledInterval: 30_000,
  maxStalledCount: 1,
  drainDelay: 5,
};
if (args.limiter) {
  const [max, duration] = args.limiter.split('/').map(Number);
  opts.limiter = { max, duration };
}

const worker = new Worker(args.queue, processor, opts);
worker.on('error', (err) => console.error(`node_worker: ${err?.stack ?? err}`));

const expect = Number(args.expect);
let done;
const allDone = new Promise((resolve) => {
  done = resolve;
});
function ended(job) {
  finished += 1;
  lastEnd = now();
  if (keepStarts) ends.push([job?.id, lastEnd]);
  if (rssAt.has(finished)) rssCheckpoints[finished] = procStatus().vmRssKb;
  if (expect && finished >= expect) done();
}
worker.on('completed', ended);
worker.on('failed', (job, err) => {
  failed += 1;
  console.error(`node_worker: job ${job?.id} failed: ${err?.message}`);
  ended(job);
});
process.on('SIGTERM', () => done());

await worker.waitUntilReady();
process.stdout.write(`${JSON.stringify({ ready: true, pid: process.pid })}\n`);

await allDone;
const status = procStatus(); // before close: the working set of a running worker
const cpu = cpuMs() - cpuAtFirstStart;
await worker.close();
process.stdout.write(
  `${JSON.stringify({
    impl: 'node',
    pid: process.pid,
    finished,
    failed,
    firstStart,
    lastEnd,
    starts,
    ends,
    rssCheckpointsKb: rssCheckpoints,
    cpuMsSinceFirstStart: cpu,
    ...status,
  })}\n`,
  () => process.exit(0),
);
