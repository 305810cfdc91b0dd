// The benchmark's producer: adds jobs the way the web service does (tests/node/bridge.mjs: the
// same default job options and job id shape), with bullmq 6.7.0.
//
//   node bench/producer.mjs bulk    --queue Q --name N --count 2000 [--data JSON]
//   node bench/producer.mjs trickle --queue Q --name N --count 200 --interval-ms 20 [--data JSON]
//
// bulk: addBulk in chunks, before the worker starts (a backlog).
// trickle: one queue.add at a time, `interval-ms` apart, each timestamped just before the add
// (epoch ms, fractional) so pickup latency = processor start - sentAt.
// stdout: one JSON line, {"added": n, "ms": ...} or {"added": n, "sent": [[jobId, sentAt], ...]}.
import { parseArgs } from 'node:util';
import { Queue } from 'bullmq';
import { redisOptions } from './redis.mjs';

const { positionals, values: args } = parseArgs({
  allowPositionals: true,
  options: {
    queue: { type: 'string' },
    prefix: { type: 'string', default: 'bull' },
    redis: { type: 'string', default: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379' },
    name: { type: 'string', default: 'bench-noop' },
    count: { type: 'string', default: '1' },
    data: { type: 'string', default: '{}' },
    chunk: { type: 'string', default: '1000' },
    'interval-ms': { type: 'string', default: '20' },
  },
});

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The web service's default job options (INTEROP §1).
const DEFAULT_JOB_OPTIONS = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 2000 },
  removeOnComplete: { age: 3600, count: 100 },
  removeOnFail: { age: 86400, count: 500 },
};

// `${name}-${Date.now()}-${base36}` like the web service, but with a sequence number in the
// suffix: thousands of ids made within one millisecond must not collide (a duplicate id is
// silently not added, and the run would wait for a job that never comes).
const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';
let seq = 0;
function makeJobId(name) {
  let suffix = '';
  for (let i = 0; i < 4; i++) suffix += BASE36[Math.floor(Math.random() * 36)];
  seq += 1;
  return `${name}-${Date.now()}-${seq.toString(36)}${suffix}`;
}

const queue = new Queue(args.queue, { connection: redisOptions(args.redis), prefix: args.prefix });
await queue.waitUntilReady();
const count = Number(args.count);
const data = JSON.parse(args.data);
const opts = () => ({ ...structuredClone(DEFAULT_JOB_OPTIONS), jobId: makeJobId(args.name) });

let result;
if (positionals[0] === 'bulk') {
  const t0 = now();
  const chunk = Number(args.chunk);
  for (let i = 0; i < count; i += chunk) {
    const n = Math.min(chunk, count - i);
    await queue.addBulk(Array.from({ length: n }, () => ({ name: args.name, data, opts: opts() })));
  }
  result = { added: count, ms: now() - t0 };
} else if (positionals[0] === 'trickle') {
  const interval = Number(args['interval-ms']);
  const sent = [];
  for (let i = 0; i < count; i++) {
    const jobOpts = opts();
    const sentAt = now();
    await queue.add(args.name, data, jobOpts);
    sent.push([jobOpts.jobId, sentAt]);
    await sleep(interval);
  }
  result = { added: count, sent };
} else {
  throw new Error(`mode must be bulk or trickle, got ${JSON.stringify(positionals[0])}`);
}
await queue.close();
process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
