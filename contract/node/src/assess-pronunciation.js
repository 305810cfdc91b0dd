// enqueueAssessPronunciation(): the web service's queue.add for `assess-pronunciation`.
import { enqueue } from './enqueue.js';

/** The queue `assess-pronunciation` goes to (INTEROP §7): not `ai-jobs`. */
export const AUDIO_JOBS_QUEUE = 'audio-jobs';

/**
 * Enqueue an `assess-pronunciation` job into `queue`, a bullmq Queue named AUDIO_JOBS_QUEUE
 * (`new Queue('audio-jobs', {connection})`): `{referenceText, audioFilePath}` where
 * audioFilePath is `<bucket>/<path>` in Supabase Storage, or `{referenceText, audioUrl}`;
 * optional `language` (default en-US) and `userId`. Same job id format (`<name>-<ms>-<rand>`)
 * and default options as `enqueue`; no idempotency key. Throws ContractError before anything
 * reaches Redis when the payload breaks the contract. Returns the Job.
 */
export function enqueueAssessPronunciation(queue, payload, opts = {}) {
  return enqueue(queue, 'assess-pronunciation', payload, opts);
}
