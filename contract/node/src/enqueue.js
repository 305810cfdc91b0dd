// enqueue(): the web service's queue.add, with the contract checked first.
import { randomInt } from 'node:crypto';
import { IDEMPOTENT_JOB_TYPES, idempotencyKey } from './idempotency.js';
import { PRIORITY, priorityOf } from './priority.js';
import { validatePayload } from './schemas.js';

/** The web service's default job options (INTEROP §1). */
export const DEFAULT_JOB_OPTIONS = Object.freeze({
  attempts: 3,
  backoff: Object.freeze({ type: 'exponential', delay: 2000 }),
  removeOnComplete: Object.freeze({ age: 3600, count: 100 }),
  removeOnFail: Object.freeze({ age: 86400, count: 500 }),
});

export class ContractError extends Error {
  constructor(name, errors) {
    const [first] = errors;
    // Worded like the worker's InvalidPayload, so a log reads the same on either side.
    super(`Invalid payload for ${name}: ${first.path || '(payload)'}: ${first.problem}`);
    this.name = 'ContractError';
    this.jobName = name;
    this.errors = errors;
  }
}

const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';

/** `<name>-<Date.now()>-<4 to 6 base-36 chars>`, the web service's job id format. */
export function makeJobId(name, now = Date.now()) {
  const length = randomInt(4, 7);
  let suffix = '';
  for (let i = 0; i < length; i++) suffix += BASE36[randomInt(36)];
  return `${name}-${now}-${suffix}`;
}

/**
 * Validate `payload`, then `queue.add(name, payload, opts)` with the default job options, a job
 * id, priority NORMAL and, for job types that have one, `opts.idempotencyKey`. Caller `opts`
 * win over all of these; `opts.priority` may be a PRIORITY name. Throws ContractError (with
 * `.errors` as validatePayload gives them) before anything reaches Redis. Returns the Job.
 */
export async function enqueue(queue, name, payload, opts = {}) {
  const { valid, errors } = validatePayload(name, payload);
  if (!valid) throw new ContractError(name, errors);
  const jobOpts = {
    ...structuredClone(DEFAULT_JOB_OPTIONS),
    jobId: makeJobId(name),
    // Never leave priority unset: an unprioritized job runs before every prioritized one,
    // VIP included (see priority.js).
    priority: PRIORITY.NORMAL,
    ...opts,
  };
  jobOpts.priority = priorityOf(jobOpts.priority);
  if (IDEMPOTENT_JOB_TYPES.includes(name)) jobOpts.idempotencyKey ??= idempotencyKey(name, payload);
  return queue.add(name, payload, jobOpts);
}

/**
 * Enqueue a `process-image` job (queue `ai-jobs`): `{userId, imageUrl}` or
 * `{userId, storageBucket, storagePath}`; same job id format and defaults as `enqueue`.
 */
export function enqueueProcessImage(queue, payload, opts = {}) {
  return enqueue(queue, 'process-image', payload, opts);
}
