import { describe, expect, it } from 'vitest';
import { settle } from '../src/settle.js';

describe('settle', () => {
  it('collects the garbage of the step before, at once', async () => {
    let big: Uint8Array | undefined = new Uint8Array(64 * 1024 * 1024);
    const ref = new WeakRef(big);
    big = undefined;
    // A WeakRef's target is kept until the job that made it ends.
    await new Promise((resolve) => setImmediate(resolve));
    settle();
    // (Not toBeUndefined(): a failure would print 64 Mi elements.)
    expect(ref.deref() === undefined).toBe(true);
    settle(); // a second time, the exposed gc() is reused
  });
});
