// Test bridge: plays the (unchanged) Node web service producer for the Python tests.
// Protocol: JSON lines. Request {"id": n, "op": "...", ...args} on stdin; one answer line
// {"id": n, "ok": true, "result": ...} or {"id": n, "ok": false, "error": "..."} on stdout.
// A job id argument is called `jobId` on the wire, because `id` is the request id.
// Nothing but protocol lines goes to stdout; diagnostics go to stderr.
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { Cluster, Redis } from 'ioredis';

// Keep stdout clean even if a library logs.
console.log = console.info = console.warn = console.debug = (...args) => console.error(...args);

const version = process.env.BULLMQ_VERSION;
if (version !== '5' && version !== '6') {
  console.error(`bridge: BULLMQ_VERSION must be 5 or 6, got ${JSON.stringify(version)}`);
  process.exit(2);
}
const pkg = `bullmq${version}`;
const { Queue, Worker } = await import(pkg);
const bullmqVersion = JSON.parse(
  readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url), 'utf8'),
).version;

// REDIS_CLUSTER=true: REDIS_URL is one node of a Redis Cluster, reached as the web service would
// reach one (ioredis `Cluster`; the queue's prefix then needs a hash tag, e.g. `{bull}`).
function connect() {
  const url = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
  if (process.env.REDIS_CLUSTER === 'true') {
    const { hostname, port } = new URL(url);
    return new Cluster([{ host: hostname, port: Number(port || 6379) }], {
      redisOptions: { maxRetriesPerRequest: null },
    });
  }
  return new Redis(url, { maxRetriesPerRequest: null });
}
const redis = connect();
redis.on('error', (err) => console.error(`bridge: redis error: ${err.message}`));

// The web service's default job options (INTEROP §1).
const DEFAULT_JOB_OPTIONS = {
  attempts: 3,
  backoff: { type: 'exponential', delay: 2000 },
  removeOnComplete: { age: 3600, count: 100 },
  removeOnFail: { age: 86400, count: 500 },
};

const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';
function makeJobId(name) {
  const length = 4 + Math.floor(Math.random() * 3); // 4..6
  let suffix = '';
  for (let i = 0; i < length; i++) suffix += BASE36[Math.floor(Math.random() * 36)];
  return `${name}-${Date.now()}-${suffix}`;
}

function jobOptions(name, opts) {
  return { ...structuredClone(DEFAULT_JOB_OPTIONS), jobId: makeJobId(name), ...(opts ?? {}) };
}

const queues = new Map();
function queueFor({ queue, prefix = 'bull' }) {
  if (typeof queue !== 'string' || !queue) throw new Error('missing "queue"');
  const key = JSON.stringify([queue, prefix]);
  if (!queues.has(key)) queues.set(key, new Queue(queue, { connection: redis, prefix }));
  return queues.get(key);
}

async function readJob(args) {
  const job = await queueFor(args).getJob(args.jobId);
  if (!job) return null;
  return {
    id: job.id,
    name: job.name,
    data: job.data,
    opts: job.opts,
    state: await job.getState(),
    returnvalue: job.returnvalue ?? null,
    progress: job.progress ?? null,
    failedReason: job.failedReason ?? null,
    attemptsMade: job.attemptsMade ?? null,
    attemptsStarted: job.attemptsStarted ?? null,
    stalledCounter: job.stalledCounter ?? null,
    finishedOn: job.finishedOn ?? null,
    processedOn: job.processedOn ?? null,
    timestamp: job.timestamp ?? null,
    stacktrace: job.stacktrace ?? null,
    processedBy: job.processedBy ?? null,
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The contract package (contract/node, @ai-jobs/contract), by relative path as the web service
// would use it; its ajv resolves from contract/node/node_modules. Imported on first use, so the
// other ops work even where that package's dependencies are not installed.
let contractPackage;
const contract = () => (contractPackage ??= import('../../contract/node/index.js'));

// Node workers started by `startWorker`: the old Node worker consuming beside ours.
const workers = new Map();
async function stopWorker({ queue, prefix = 'bull' }) {
  const key = JSON.stringify([queue, prefix]);
  const entry = workers.get(key);
  if (!entry) throw new Error(`no Node worker on ${key}`);
  workers.delete(key);
  await entry.worker.close();
  await entry.connection.quit().catch(() => entry.connection.disconnect());
  return { completed: entry.completed, jobIds: entry.jobIds };
}

let closing;
function closeAll() {
  closing ??= (async () => {
    await Promise.allSettled([...workers.values()].map(({ worker }) => worker.close()));
    await Promise.allSettled([...queues.values()].map((q) => q.close()));
    await redis.quit().catch(() => redis.disconnect());
  })();
  return closing;
}

const ops = {
  async add(args) {
    const opts = jobOptions(args.name, args.opts);
    const addedAt = Date.now();
    const job = await queueFor(args).add(args.name, args.data ?? {}, opts);
    return { id: job.id, addedAt };
  },

  async addBulk(args) {
    const jobs = (args.jobs ?? []).map(({ name, data, opts }) => ({
      name,
      data: data ?? {},
      opts: jobOptions(name, opts),
    }));
    const added = await queueFor(args).addBulk(jobs);
    return { ids: added.map((job) => job.id) };
  },

  getJob: readJob,

  // The package's enqueue(queue, name, payload, opts): validates, then queue.add with the web
  // service's options. A payload the package refuses answers {rejected: true, message, errors}
  // (nothing reached Redis); any other failure is an ok:false answer as usual.
  async contractEnqueue(args) {
    const { enqueue, ContractError } = await contract();
    // A null payload arrives as a missing key (the Python client drops None arguments).
    const payload = args.payload ?? null;
    try {
      const job = await enqueue(queueFor(args), args.name, payload, args.opts ?? {});
      return { id: job.id };
    } catch (err) {
      if (!(err instanceof ContractError)) throw err;
      return { rejected: true, message: err.message, errors: err.errors };
    }
  },

  // The package's validatePayload / validateResult: {valid, errors: [{path, problem, keyword}]}.
  async validate({ kind, name, value }) {
    const { validatePayload, validateResult } = await contract();
    const validators = { payload: validatePayload, result: validateResult };
    if (!Object.hasOwn(validators, kind)) {
      throw new Error(`kind must be "payload" or "result", got ${JSON.stringify(kind)}`);
    }
    return validators[kind](name, value ?? null);
  },

  async counts(args) {
    const counts = await queueFor(args).getJobCounts();
    // The web service's /api/queue/stats total (INTEROP §2).
    const total = ['waiting', 'active', 'completed', 'failed', 'delayed']
      .reduce((sum, type) => sum + (counts[type] ?? 0), 0);
    return { ...counts, total };
  },

  // The web service's GET /api/queue/stats body (INTEROP §2), without its timestamp.
  async webStats(args) {
    const counts = await queueFor(args).getJobCounts();
    const total = Object.values(counts).reduce((sum, n) => sum + n, 0);
    const { waiting, active, completed, failed, delayed } = counts;
    return { queue: args.queue, waiting, active, completed, failed, delayed, total };
  },

  // The web service's POST for a job (INTEROP §3): compute the idempotency key, GET it, and
  // on a hit answer from the cache without enqueueing; otherwise queue.add with the key.
  async webEnqueue(args) {
    const { idempotencyKey } = await contract();
    const key = idempotencyKey(args.name, args.data);
    const cached = await redis.get(key);
    if (cached !== null) {
      const { jobId, result } = JSON.parse(cached);
      return { cached: true, jobId, result, key };
    }
    const added = await ops.add({ ...args, opts: { ...(args.opts ?? {}), idempotencyKey: key } });
    return { cached: false, id: added.id, key };
  },

  async idempotency({ key }) {
    const buf = await redis.getBuffer(key);
    if (buf === null) return null;
    const raw = buf.toString('utf8');
    const parsed = JSON.parse(raw);
    return { raw, parsed, restringified: JSON.stringify(parsed) };
  },

  async waitFinished(args) {
    const timeoutMs = args.timeoutMs ?? 10000;
    const deadline = Date.now() + timeoutMs;
    let last = 'not_found';
    for (;;) {
      const job = await readJob(args);
      last = job ? job.state : 'not_found';
      // getJob reads the hash before getState runs: a job that finished in between shows
      // state 'completed' with the hash of an active job. Read it again once it is final.
      if (last === 'completed' || last === 'failed') return readJob(args);
      if (Date.now() >= deadline) {
        throw new Error(`job ${args.jobId} not finished after ${timeoutMs} ms (last state: ${last})`);
      }
      await sleep(25);
    }
  },

  // A Node BullMQ worker on the queue, as the old worker ran (INTEROP §1: concurrency, the
  // queue-wide limiter), serving `ping` with the Python processor's result shape.
  async startWorker({ queue, prefix = 'bull', concurrency = 20, limiter, name }) {
    const key = JSON.stringify([queue, prefix]);
    if (workers.has(key)) throw new Error(`a Node worker already runs on ${key}`);
    const connection = new Redis(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379', {
      maxRetriesPerRequest: null,
    });
    const entry = { connection, completed: 0, jobIds: [] };
    const processor = async (job) => {
      if (job.name !== 'ping') throw new Error(`Unknown job type: ${job.name}`);
      await job.updateProgress(100);
      entry.jobIds.push(job.id);
      return {
        pong: true,
        echo: job.data.echo ?? null,
        jobId: job.id,
        attempt: job.attemptsMade + 1,
        worker: { runtime: 'node' },
      };
    };
    entry.worker = new Worker(queue, processor, { connection, prefix, concurrency, limiter, name });
    entry.worker.on('completed', () => {
      entry.completed += 1;
    });
    entry.worker.on('error', (err) => console.error(`bridge: Node worker: ${err.message}`));
    await entry.worker.waitUntilReady();
    workers.set(key, entry);
    return null;
  },

  stopWorker,

  // What Bull Board and Taskforce read: the workers listed from CLIENT LIST, a job's log
  // lines, the per-minute metrics and BullMQ's own Prometheus text.
  async getWorkers(args) {
    const workers = await queueFor(args).getWorkers();
    return workers.map(({ name, rawname }) => ({ name, rawname }));
  },

  async getJobLogs(args) {
    return queueFor(args).getJobLogs(args.jobId, args.start ?? 0, args.end ?? -1, args.asc ?? true);
  },

  async getMetrics(args) {
    return queueFor(args).getMetrics(args.type, args.start ?? 0, args.end ?? -1);
  },

  async exportPrometheusMetrics(args) {
    return queueFor(args).exportPrometheusMetrics();
  },

  async obliterate(args) {
    await queueFor(args).obliterate({ force: true });
    return null;
  },

  async close() {
    await Promise.allSettled([...inFlight]); // let earlier requests answer first
    await closeAll();
    return null;
  },
};

function send(message, callback) {
  process.stdout.write(`${JSON.stringify(message)}\n`, callback);
}

async function handle(line) {
  let request;
  try {
    request = JSON.parse(line);
  } catch (err) {
    console.error(`bridge: unparsable request line ${JSON.stringify(line)}: ${err.message}`);
    return;
  }
  const { id, op, ...args } = request;
  try {
    if (!Object.hasOwn(ops, op)) throw new Error(`unknown op ${JSON.stringify(op)}`);
    const result = await ops[op](args);
    if (op === 'close') {
      send({ id, ok: true, result }, () => process.exit(0));
      return;
    }
    send({ id, ok: true, result: result ?? null });
  } catch (err) {
    console.error(`bridge: op ${op} (id ${id}) failed: ${err?.stack ?? err}`);
    send({ id, ok: false, error: String(err?.message ?? err) });
  }
}

await redis.ping();
send({ ready: true, bullmq: bullmqVersion });

const inFlight = new Set();
const input = createInterface({ input: process.stdin, crlfDelay: Infinity });
input.on('line', (line) => {
  if (!line.trim()) return;
  // Not awaited: requests run concurrently. `close` snapshots inFlight synchronously inside
  // handle(), before its own promise is added, so it waits for earlier requests only.
  const request = handle(line);
  inFlight.add(request);
  request.finally(() => inFlight.delete(request));
});
input.on('close', async () => {
  // stdin closed without a close op (the test process went away): clean up and leave.
  await closeAll();
  process.exit(0);
});
