/**
 * The timeline from what the threads recorded: how each fault's resolution
 * is told (its handler's Resolution, else who installed the page), the
 * tracks and their names, resolver lanes, counters and pauses.
 */
import { describe, expect, it } from 'vitest';
import { Resolution } from '../vmm/page-installer.js';
import { ORIGIN } from '../vmm/state.js';
import type { GuestThreadResult } from '../workers/protocol.js';
import { MAIN_KIND, MainLog } from './main-log.js';
import { FAULT_RESOLUTIONS, faultResolution, wakeIssued } from './resolution.js';
import { FaultLog, ResolverLog } from './thread-logs.js';
import { COUNTER_NAME, TID, buildTimeline, type TimelineInputs } from './timeline.js';
import type { CompleteEvent, CounterEvent, MetadataEvent } from './trace-event.js';

/** A guest thread's result: faults as [page, write, own Resolution or -1, start ms, end ms]. */
function thread(faults: [number, boolean, number, number, number][]): GuestThreadResult {
  const log = new FaultLog(1); // grows as it goes
  const intervals = new Float64Array(faults.length * 2);
  faults.forEach(([page, write, own, t0, t1], n) => {
    log.record(n, page, write, own);
    intervals[2 * n] = t0;
    intervals[2 * n + 1] = t1;
  });
  return { faults: faults.length, accesses: faults.length, intervals, startMs: 0, endMs: 100, cpuUs: null, trace: log.take(faults.length) };
}

function inputs(): TimelineInputs {
  const origins = new Uint8Array(16);
  origins.set([ORIGIN.DEMAND, ORIGIN.PUSH, ORIGIN.MAIN, ORIGIN.DEMAND, ORIGIN.PUSH, ORIGIN.DEMAND]);
  // vCPU 0 (slot 0) resolves its own faults (kvm-exit); I/O thread 0 (slot 1) through a resolver that owes WAKEs.
  const vcpu = thread([
    [0, false, Resolution.INSTALLED, 1, 1.5],
    [1, true, Resolution.ELSEWHERE, 2, 2.25],
    [3, false, Resolution.SUPPRESSED, 3, 4],
  ]);
  const io = thread([
    [2, true, -1, 1.1, 1.9],
    [4, false, -1, 2.1, 2.2],
    [5, false, -1, 3, 3.5],
  ]);
  const r = new ResolverLog();
  // Two messages in flight at once (lanes), one page found in already (ELSEWHERE) whose origin is another's request.
  r.add(1.2, 1.8, 2, 1, Resolution.ON_MAIN);
  r.add(1.3, 1.4, 9, 0, Resolution.INSTALLED); // a message of no fault of ours: shown on the resolver's track only
  r.add(3.05, 3.4, 5, 1, Resolution.ELSEWHERE);
  const main = new MainLog();
  main.install(MAIN_KIND.PUSHED, 4, 16, 2.15, 2.16);
  main.install(MAIN_KIND.PUSHED, 20, 16, 2.17, 2.18); // continues the run within the merge gap: one slice
  main.install(MAIN_KIND.REQUESTED, 2, 1, 1.7, 1.71);
  main.phase('postcopy: the guest runs', 0.5, 5);
  main.samples.push({ atMs: 0, installed: 0, pushedData: 0, demand: 0 }, { atMs: 50, installed: 8, pushedData: 0, demand: 2 }, { atMs: 150, installed: 16, pushedData: 256, demand: 3 });
  return {
    pid: 42,
    title: 'postcopy destination: test',
    pageSize: 4096,
    threads: [
      { name: 'vCPU 0', slot: 0, result: vcpu },
      { name: 'I/O thread 0', slot: 1, result: io },
    ],
    resolvers: [{ label: 'io-resolver', owesWake: true, trace: r.take() }],
    origins,
    main,
    pauses: [{ startMs: 2.5, endMs: 2.9, reason: 'injected drop@3' }],
    otherData: { strategy: 'kvm-exit' },
  };
}

describe('how a fault was resolved', () => {
  it('its handler said, or (nobody handled it, or the page was in) whoever installed the page', () => {
    expect(faultResolution(Resolution.INSTALLED, ORIGIN.DEMAND, false)).toBe('demand');
    expect(faultResolution(Resolution.ON_MAIN, ORIGIN.MAIN, false)).toBe('sent-on-main');
    expect(faultResolution(Resolution.ALREADY_SENT, ORIGIN.PUSH, true)).toBe('already-sent');
    expect(faultResolution(Resolution.EEXIST, ORIGIN.PUSH, false)).toBe('eexist');
    expect(faultResolution(Resolution.EEXIST, ORIGIN.PUSH, true)).toBe('eexist-wake');
    expect(faultResolution(Resolution.SUPPRESSED, ORIGIN.DEMAND, true)).toBe('duplicate-suppressed');
    expect(faultResolution(Resolution.ELSEWHERE, ORIGIN.PUSH, true)).toBe('push');
    expect(faultResolution(-1, ORIGIN.PUSH, false)).toBe('push');
    expect(faultResolution(-1, ORIGIN.DEMAND, false)).toBe('other-request');
    expect(faultResolution(Resolution.ELSEWHERE, ORIGIN.MAIN, false)).toBe('other-request');
    expect(faultResolution(-1, ORIGIN.NONE, false)).toBe('unknown');
  });

  it('a WAKE is issued when owed and the handler did not install the page itself', () => {
    expect(wakeIssued(Resolution.INSTALLED, true)).toBe(false);
    expect(wakeIssued(Resolution.EEXIST, true)).toBe(true);
    expect(wakeIssued(Resolution.ELSEWHERE, true)).toBe(true);
    expect(wakeIssued(Resolution.SUPPRESSED, false)).toBe(false);
    expect(wakeIssued(-1, true)).toBe(false);
  });
});

describe('buildTimeline', () => {
  const timeline = buildTimeline(inputs());
  const events = timeline.doc.traceEvents;
  const slices = events.filter((e): e is CompleteEvent => e.ph === 'X');
  const names = new Map(events.filter((e): e is MetadataEvent => e.ph === 'M' && e.name === 'thread_name').map((e) => [e.tid, (e.args as { name: string }).name]));
  const faults = slices.filter((e) => e.cat === 'fault');

  it('one slice per fault, on its own thread track, in µs, with page, access and resolution', () => {
    expect(timeline.faultSlices).toBe(6);
    expect(faults).toHaveLength(6);
    expect(timeline.doc.otherData).toMatchObject({ strategy: 'kvm-exit', faultSlices: 6 });
    expect(events.filter((e) => e.ph === 'M' && e.name === 'process_name')).toEqual([{ ph: 'M', name: 'process_name', pid: 42, tid: 0, ts: 0, args: { name: 'postcopy destination: test' } }]);
    const byTrack = (name: string): CompleteEvent[] => faults.filter((e) => names.get(e.tid) === name);
    expect(byTrack('vCPU 0').map((e) => [e.args!.page, e.args!.access, e.name, e.ts, e.dur])).toEqual([
      [0, 'read', 'demand', 1000, 500],
      [1, 'write', 'push', 2000, 250],
      [3, 'read', 'duplicate-suppressed', 3000, 1000],
    ]);
    expect(byTrack('I/O thread 0').map((e) => [e.args!.page, e.name, e.args!.handledBy, e.args!.wake])).toEqual([
      [2, 'sent-on-main', 'io-resolver', true],
      [4, 'push', 'nobody: woken by the install', false],
      [5, 'other-request', 'io-resolver', true],
    ]);
    for (const f of faults) {
      expect(FAULT_RESOLUTIONS).toContain(f.args!.resolution);
      expect(f.name).toBe(f.args!.resolution);
      expect(f.pid).toBe(42);
    }
    expect(faults[0]!.args).toMatchObject({ installedBy: 'demand', handledBy: 'vCPU 0', wake: false });
    expect(timeline.resolutions).toMatchObject({ demand: 1, push: 2, 'duplicate-suppressed': 1, 'sent-on-main': 1, 'other-request': 1, unknown: 0 });
  });

  it('a resolver whose messages overlap gets a lane per overlap', () => {
    const resolver = slices.filter((e) => e.cat === 'resolver');
    expect(resolver.map((e) => [names.get(e.tid), e.args!.page, e.args!.for, e.name])).toEqual([
      ['io-resolver', 2, 'I/O thread 0', 'sent-on-main'],
      ['io-resolver #2', 9, 'vCPU 0', 'demand'],
      ['io-resolver', 5, 'I/O thread 0', 'other-request'],
    ]);
  });

  it('the main thread, phases and pauses have tracks of their own', () => {
    expect(names.get(TID.MAIN)).toMatch(/main thread/);
    const main = slices.filter((e) => e.tid === TID.MAIN);
    expect(main.map((e) => [e.cat, e.name, e.args!.firstPage, e.args!.pages])).toEqual([
      ['push', 'pushed', 4, 32],
      ['main-channel', 'requested page on main', 2, 1],
    ]);
    expect(slices.filter((e) => e.tid === TID.PHASES).map((e) => [e.name, e.ts, e.dur])).toEqual([['postcopy: the guest runs', 500, 4500]]);
    expect(slices.filter((e) => e.cat === 'recovery')).toEqual([
      { ph: 'X', name: 'postcopy-paused', cat: 'recovery', pid: 42, tid: TID.RECOVERY, ts: 2500, dur: 400, args: { reason: 'injected drop@3' } },
    ]);
  });

  it('counters: pages received and the push throughput over the last 100 ms', () => {
    const counters = events.filter((e): e is CounterEvent => e.ph === 'C');
    expect(counters.filter((c) => c.name === COUNTER_NAME.RECEIVED).map((c) => [c.ts, c.args.pages])).toEqual([
      [0, 0],
      [50_000, 8],
      [150_000, 16],
    ]);
    expect(counters.filter((c) => c.name === COUNTER_NAME.DEMAND).map((c) => c.args.pages)).toEqual([0, 2, 3]);
    // 256 pages of 4 KiB in the 100 ms from the sample at 50 ms: 10 MiB/s.
    expect(counters.filter((c) => c.name === COUNTER_NAME.PUSH).map((c) => c.args['MiB/s'])).toEqual([0, 0, 10]);
  });

  it('refuses a thread that ran without its log', () => {
    const inp = inputs();
    const { trace: _trace, ...untraced } = inp.threads[0]!.result;
    inp.threads[0] = { ...inp.threads[0]!, result: untraced };
    expect(() => buildTimeline(inp)).toThrow(/vCPU 0's fault log/);
  });
});
