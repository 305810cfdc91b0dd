// The audio job types (INTEROP §7): they go to their own queue, `audio-jobs`, not `ai-jobs`.
import { enqueue } from './enqueue.js';

/** The queue the audio job types are consumed from (same prefix as `ai-jobs`). */
export const AUDIO_QUEUE = 'audio-jobs';

/**
 * Enqueue a `generate-audio-lesson` job: `{lessonId, userId, language?}`. `queue` must be the
 * bullmq Queue of AUDIO_QUEUE. Web service job id (`<name>-<ms>-<rand>`), default options, no
 * idempotency key (INTEROP §7); caller `opts` win. Returns the Job.
 */
export function enqueueGenerateAudioLesson(queue, payload, opts = {}) {
  return enqueue(queue, 'generate-audio-lesson', payload, opts);
}

/**
 * Enqueue a `create-simple-audio` job: `{title, scriptText, userId, nativeLanguage?}`, into the
 * Queue of AUDIO_QUEUE; same job id format and defaults as `enqueueGenerateAudioLesson`.
 */
export function enqueueCreateSimpleAudio(queue, payload, opts = {}) {
  return enqueue(queue, 'create-simple-audio', payload, opts);
}

/**
 * Enqueue an `assess-pronunciation` job into the Queue of AUDIO_QUEUE:
 * `{referenceText, audioFilePath}` where audioFilePath is `<bucket>/<path>` in Supabase Storage,
 * or `{referenceText, audioUrl}`; optional `language` (default en-US) and `userId`. Same job id
 * format and defaults; throws ContractError before anything reaches Redis when the payload
 * breaks the contract. Returns the Job.
 */
export function enqueueAssessPronunciation(queue, payload, opts = {}) {
  return enqueue(queue, 'assess-pronunciation', payload, opts);
}
