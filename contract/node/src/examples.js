// The example documents beside the schemas, for tests on either side of the queue.
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { CONTRACT_DIR } from './schemas.js';

/**
 * Examples of one job type and kind: valid ones as {file, document}; invalid ones as
 * {file, document, reason, path} where `path` is the field the rejection must name.
 */
export function examples(name, kind, validity) {
  const dir = join(CONTRACT_DIR, name, 'examples', kind, validity);
  return readdirSync(dir)
    .filter((file) => file.endsWith('.json'))
    .sort()
    .map((file) => {
      const content = JSON.parse(readFileSync(join(dir, file), 'utf8'));
      return validity === 'valid' ? { file, document: content } : { file, ...content };
    });
}
