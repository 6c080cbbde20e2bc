import { describe, expect, it } from 'vitest';
import { MAX_WARM_UP_BYTES, WARM_UP_CHANNELS, warmUpRounds, warmUpSource } from './warm-up.js';

describe("the source's warm-up", () => {
  it('splits its requests in two rounds, and caps them at the scratch image', () => {
    // A quarter first (SOURCE_FIRST_ROUND_SHARE), the rest second.
    expect(warmUpRounds(2048, 4096)).toEqual([512, 1536]);
    expect(warmUpRounds(65, 4096)).toEqual([17, 48]);
    expect(warmUpRounds(2, 4096)).toEqual([1, 1]);
    expect(warmUpRounds(1, 4096)).toEqual([1]);
    expect(warmUpRounds(0, 4096)).toEqual([]);
    // 2 MiB pages: each round's scratch image is MAX_WARM_UP_BYTES at most.
    const perRound = MAX_WARM_UP_BYTES / (2 * 1024 * 1024);
    expect(warmUpRounds(1 << 20, 2 * 1024 * 1024)).toEqual([perRound, perRound]);
    expect(warmUpRounds(4 * perRound, 2 * 1024 * 1024)).toEqual([perRound, perRound]);
    expect(warmUpRounds(2 * perRound, 2 * 1024 * 1024)).toEqual([perRound / 2, perRound]);
    // 4 KiB pages: the second round's three quarters fill its image first.
    const small = MAX_WARM_UP_BYTES / 4096;
    expect(warmUpRounds(2 * small, 4096)).toEqual([small / 2, small]);
  });

  it('answers every request it makes, checked against the generator, in both rounds', { timeout: 30_000 }, async () => {
    const done = await warmUpSource({ requests: 4 * WARM_UP_CHANNELS + 3, pageSize: 4096, image: { seed: 5, zeroFraction: 0.3 } });
    expect(done).toMatchObject({ requests: 4 * WARM_UP_CHANNELS + 3, rounds: 2 });
    expect(done.ms).toBeGreaterThan(0);
  });

  it('says a failure was the warm-up\'s, and how to turn it off', { timeout: 30_000 }, async () => {
    await expect(warmUpSource({ requests: 4, pageSize: 3000, image: { seed: 1, zeroFraction: 0.1 } })).rejects.toThrow(/^warm-up on 127\.0\.0\.1 failed \(--warm-up-requests 0 turns it off\): /);
  });

  it('with fewer requests than channels, opens only as many channels as it has pages', { timeout: 30_000 }, async () => {
    expect(await warmUpSource({ requests: 3, pageSize: 4096, image: { seed: 1, zeroFraction: 0.1 } })).toMatchObject({ requests: 3, rounds: 2 });
  });
});
