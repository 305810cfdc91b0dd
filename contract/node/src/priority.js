// Named priorities. In BullMQ the LOWER number runs first: 1 is the highest priority, and 0 (or
// no priority) means "not prioritized" — such jobs sit in the plain wait list, which BullMQ
// drains before any prioritized job. The seed's "10 = VIP, higher number first" is inverted
// for BullMQ; these names keep its intent (VIP first, batch last) with BullMQ's numbers.
export const PRIORITY = Object.freeze({ VIP: 1, NORMAL: 5, BATCH: 10 });

// BullMQ refuses priorities above 2^21.
const MAX_PRIORITY = 2 ** 21;

/** A PRIORITY name or a BullMQ priority number, as the number BullMQ expects. */
export function priorityOf(value) {
  if (typeof value === 'string') {
    if (!Object.hasOwn(PRIORITY, value)) {
      const names = Object.keys(PRIORITY).join(', ');
      throw new RangeError(`unknown priority ${JSON.stringify(value)}; use one of ${names}`);
    }
    return PRIORITY[value];
  }
  if (!Number.isInteger(value) || value < 0 || value > MAX_PRIORITY) {
    throw new RangeError(`priority must be an integer 0..${MAX_PRIORITY}, got ${value}`);
  }
  return value;
}
