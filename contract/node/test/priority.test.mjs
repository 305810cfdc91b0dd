import assert from 'node:assert/strict';
import { test } from 'node:test';
import { PRIORITY, priorityOf } from '../index.js';

test('BullMQ runs the lowest number first, so VIP < NORMAL < BATCH', () => {
  assert.deepEqual(PRIORITY, { VIP: 1, NORMAL: 5, BATCH: 10 });
  const order = Object.entries(PRIORITY).sort(([, a], [, b]) => a - b).map(([name]) => name);
  assert.deepEqual(order, ['VIP', 'NORMAL', 'BATCH']);
  // 0 would mean "no priority" in BullMQ, which runs before every prioritized job.
  for (const value of Object.values(PRIORITY)) assert.ok(value >= 1 && value <= 2 ** 21);
  assert.ok(Object.isFrozen(PRIORITY));
});

test('priorityOf takes a name or a BullMQ number', () => {
  assert.equal(priorityOf('VIP'), 1);
  assert.equal(priorityOf(7), 7);
  assert.equal(priorityOf(0), 0);
  assert.throws(() => priorityOf('vip'), RangeError);
  assert.throws(() => priorityOf('toString'), RangeError);
  assert.throws(() => priorityOf(-1), RangeError);
  assert.throws(() => priorityOf(2 ** 21 + 1), RangeError);
  assert.throws(() => priorityOf(1.5), RangeError);
});
