// @ai-jobs/contract: what the web service needs to enqueue ai-jobs work the worker accepts.
export {
  CONTRACT_DIR,
  JOB_TYPES,
  KINDS,
  UnknownJobTypeError,
  schema,
  schemaVersion,
  validatePayload,
  validateResult,
} from './src/schemas.js';
export { examples } from './src/examples.js';
export { IDEMPOTENT_JOB_TYPES, idempotencyKey } from './src/idempotency.js';
export { PRIORITY, priorityOf } from './src/priority.js';
export {
  ContractError,
  DEFAULT_JOB_OPTIONS,
  enqueue,
  enqueueProcessImage,
  makeJobId,
} from './src/enqueue.js';
export {
  AUDIO_QUEUE,
  enqueueAssessPronunciation,
  enqueueCreateSimpleAudio,
  enqueueGenerateAudioLesson,
} from './src/audio.js';
