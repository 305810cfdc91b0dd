// The contract's schemas, read from the folder above this package (the very files the Python
// worker loads, never a copy), compiled once into one ajv validator per job type and kind.
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import Ajv2020 from 'ajv/dist/2020.js';

export const CONTRACT_DIR = fileURLToPath(new URL('../../', import.meta.url));
export const KINDS = Object.freeze(['payload', 'result']);

export class UnknownJobTypeError extends Error {
  constructor(name) {
    // Same wording as the worker's failure for an unknown name (INTEROP §4).
    super(`Unknown job type: ${name}`);
    this.name = 'UnknownJobTypeError';
    this.jobName = name;
  }
}

const ajv = new Ajv2020({
  allErrors: true, // a web form wants every broken field, not the first one
  verbose: true, // puts the offending value on each error, for "expected string, got integer"
  allowUnionTypes: true, // esp_lessons.id is ["string", "integer"]
});
ajv.addKeyword('x-version'); // the contract's version annotation; strict mode refuses unknown keywords

const readJson = (path) => JSON.parse(readFileSync(path, 'utf8'));

// A job type is a folder holding payload.schema.json; node/ (this package) holds none.
export const JOB_TYPES = Object.freeze(
  readdirSync(CONTRACT_DIR, { withFileTypes: true })
    .filter((entry) => entry.isDirectory())
    .map((entry) => entry.name)
    .filter((name) => existsSync(join(CONTRACT_DIR, name, 'payload.schema.json')))
    .sort(),
);

const schemas = new Map();
const validators = new Map();
for (const name of JOB_TYPES) {
  for (const kind of KINDS) {
    const schema = readJson(join(CONTRACT_DIR, name, `${kind}.schema.json`));
    schemas.set(`${name}:${kind}`, schema);
    validators.set(`${name}:${kind}`, ajv.compile(schema));
  }
}

function lookup(map, name, kind) {
  const found = map.get(`${name}:${kind}`);
  if (found === undefined) throw new UnknownJobTypeError(name);
  return found;
}

/** The schema document (shared: do not mutate). */
export const schema = (name, kind) => lookup(schemas, name, kind);

/** The schema's `x-version`. */
export const schemaVersion = (name, kind) => lookup(schemas, name, kind)['x-version'];

/**
 * Check a job's data. Never throws for bad data (only for an unknown job name): returns
 * {valid, errors}, each error {path, problem, keyword} with `path` written like the Python
 * worker's (`content`, `flashcards/3/front`, `` for the document itself).
 */
export const validatePayload = (name, data) => run(lookup(validators, name, 'payload'), data);

/** Check a job's return value, as validatePayload does. */
export const validateResult = (name, value) => run(lookup(validators, name, 'result'), value);

function run(validate, document) {
  if (validate(document)) return { valid: true, errors: [] };
  return { valid: false, errors: validate.errors.map(describe) };
}

const escapePointer = (key) => String(key).replaceAll('~', '~0').replaceAll('/', '~1');

function describe(error) {
  const parts = error.instancePath === '' ? [] : error.instancePath.slice(1).split('/');
  // ajv reports a missing property at its parent; name the property itself, as Python does.
  if (error.keyword === 'required') parts.push(escapePointer(error.params.missingProperty));
  return { path: parts.join('/'), problem: problem(error), keyword: error.keyword };
}

// Patterns whose meaning a reader should see instead of the regex itself.
// "Not blank": a character outside JavaScript's \s, listed one by one so that Python's `re`
// (whose \s differs: U+FEFF, U+001C-U+001F, U+0085) judges it the same way.
export const NOT_BLANK = String.raw`[^\t\n\u000b\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]`;
const PATTERN_MEANING = { '\\S': 'must not be blank', [NOT_BLANK]: 'must not be blank' };

// The same short sentences as worker/contract.py, so both sides report a field alike.
function problem({ keyword, params, data, message }) {
  switch (keyword) {
    case 'required':
      return 'is required';
    case 'type':
      return `expected ${String(params.type).split(',').join(' or ')}, got ${jsonType(data)}`;
    case 'minLength':
      return params.limit === 1 ? 'must not be empty' : `must be at least ${params.limit} characters`;
    case 'pattern':
      return PATTERN_MEANING[params.pattern] ?? `must match pattern ${params.pattern}`;
    case 'enum':
      return `must be one of ${params.allowedValues.join(', ')}`;
    case 'const':
      return `must be ${JSON.stringify(params.allowedValue)}`;
    case 'minimum':
    case 'maximum':
      return `must be ${params.comparison} ${params.limit}`;
    default:
      return message;
  }
}

export function jsonType(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  if (typeof value === 'number') return Number.isInteger(value) ? 'integer' : 'number';
  return typeof value; // string, boolean, object
}
