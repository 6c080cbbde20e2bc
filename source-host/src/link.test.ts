import { describe, expect, it } from 'vitest';
import { LinkDirection, parseBandwidth } from './link.js';

const nowUs = (): number => performance.now() * 1000;

/** Sends `count` frames of `bytes` on `flow`, resolving with each frame's arrival time (µs). */
function sendAll(link: LinkDirection, flow: object, count: number, bytes: number): Promise<number[]> {
  return new Promise((resolve) => {
    const arrivals: number[] = [];
    for (let i = 0; i < count; i++) {
      link.send(flow, bytes, () => {
        arrivals.push(nowUs());
        if (arrivals.length === count) resolve(arrivals);
      });
    }
  });
}

describe('emulated link', () => {
  it('parses bandwidths', () => {
    expect(parseBandwidth('1gbit')).toBe(1e9);
    expect(parseBandwidth('10gbit')).toBe(1e10);
    expect(parseBandwidth('500mbit')).toBe(5e8);
    expect(parseBandwidth('100kbit')).toBe(1e5);
    expect(parseBandwidth('2.5gbit')).toBe(2.5e9);
    expect(parseBandwidth('1000')).toBe(1000);
    expect(parseBandwidth('0')).toBe(0);
    expect(parseBandwidth('fast')).toBeUndefined();
    expect(parseBandwidth('1gb/s')).toBeUndefined();
  });

  it('without shaping delivers at once, synchronously', () => {
    const link = new LinkDirection({ delayUs: 0, bandwidthBps: 0 });
    let delivered = false;
    link.send({}, 4096, () => (delivered = true));
    expect(delivered).toBe(true);
  });

  it('delays every frame by the one-way delay, never less, and keeps the event loop free', async () => {
    const link = new LinkDirection({ delayUs: 200, bandwidthBps: 0 });
    const flow = {};
    const lateness: number[] = [];
    let ticks = 0;
    const ticker = setInterval(() => ticks++, 1);
    for (let round = 0; round < 50; round++) {
      const sent = nowUs();
      const [arrived] = await sendAll(link, flow, 1, 4096);
      const delay = arrived! - sent;
      expect(delay).toBeGreaterThanOrEqual(200);
      lateness.push(delay - 200);
    }
    clearInterval(ticker);
    lateness.sort((a, b) => a - b);
    // Sub-millisecond: setTimeout alone could not do better than 1 ms. (Typically
    // tens of µs; the bound leaves room for a loaded CI machine.)
    expect(lateness[25]!).toBeLessThan(1000);
    // Timers ran meanwhile: the link polls without blocking the loop.
    expect(ticks).toBeGreaterThan(0);
  });

  it('serializes frames at the link bandwidth', async () => {
    // 100 Mbit/s: a 12,500-byte frame takes 1 ms on the wire; 40 of them 40 ms.
    const link = new LinkDirection({ delayUs: 0, bandwidthBps: 100e6 });
    const start = nowUs();
    const arrivals = await sendAll(link, {}, 40, 12_500);
    const elapsedMs = (arrivals.at(-1)! - start) / 1000;
    expect(elapsedMs).toBeGreaterThanOrEqual(40);
    // The lower bounds are exact. The upper bound is loose (a loaded CI machine
    // runs timers late) but still catches a rate off by a factor of 8 (bits
    // taken for bytes: 320 ms).
    expect(elapsedMs).toBeLessThan(250);
    // Spread out, not in one burst: the 20th frame arrives about half-way.
    expect((arrivals[19]! - start) / 1000).toBeGreaterThanOrEqual(20);
  });

  it('adds delay after serialization', async () => {
    const link = new LinkDirection({ delayUs: 5000, bandwidthBps: 100e6 });
    const start = nowUs();
    const arrivals = await sendAll(link, {}, 10, 12_500);
    expect((arrivals[0]! - start) / 1000).toBeGreaterThanOrEqual(6);
    expect((arrivals.at(-1)! - start) / 1000).toBeGreaterThanOrEqual(15);
    // Loose, but below the 85 ms a rate off by a factor of 8 would take.
    expect((arrivals.at(-1)! - start) / 1000).toBeLessThan(75);
  });

  it('shares the bandwidth fairly: a frame of a quiet flow does not wait behind a busy flow\'s queue', async () => {
    const link = new LinkDirection({ delayUs: 0, bandwidthBps: 100e6 });
    const busy = {};
    const quiet = {};
    const order: string[] = [];
    for (let i = 0; i < 50; i++) link.send(busy, 12_500, () => order.push('busy')); // 50 ms of queued frames
    expect(link.queuedBytes(busy)).toBeGreaterThan(40 * 12_500);
    const bulk = new Promise<void>((resolve) => link.send(busy, 12_500, () => resolve()));
    const quietArrived = new Promise<void>((resolve) => link.send(quiet, 4096, () => (order.push('quiet'), resolve())));
    // Busy frames already on the wire when the quiet one came: one, or a few
    // more if this thread stalled for milliseconds while queueing the 51.
    const onWire = 51 - link.queuedBytes(busy) / 12_500;
    await quietArrived;
    // Behind those and at most one more of the busy flow's, not the 40-odd
    // still queued. Counted in frames, not milliseconds: a loaded machine
    // runs timers late, but the link's order does not depend on it.
    expect(onWire).toBeLessThan(20);
    expect(order.indexOf('quiet')).toBeLessThanOrEqual(onWire + 1);
    await bulk;
    expect(link.queuedBytes(busy)).toBe(0);
  });
});
