/**
 * The trace-event writer: the JSON Object Format's shape, µs units, the
 * metadata events that name tracks, and files too large for one string.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { UsageError } from '@postcopy/shared';
import { counter, processName, slice, threadName, usOf, writeTraceFile, type TraceDocument, type TraceEvent } from './trace-event.js';
import { checkTracePath } from './trace-path.js';

const dir = mkdtempSync(join(tmpdir(), 'postcopy-trace-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('trace events', () => {
  it('times are µs from ms, to the nanosecond', () => {
    expect(usOf(1)).toBe(1000);
    expect(usOf(0.0015)).toBe(1.5);
    expect(usOf(12.3456789)).toBe(12345.679);
    const s = slice(7, 3, 'fault', 'demand', 10.25, 10.5, { page: 4 });
    expect(s).toEqual({ ph: 'X', name: 'demand', cat: 'fault', pid: 7, tid: 3, ts: 10250, dur: 250, args: { page: 4 } });
    // A slice never ends before it starts (clocks of two threads can be a hair apart).
    expect(slice(1, 1, 'c', 'n', 5, 4.999).dur).toBe(0);
    expect(slice(1, 1, 'c', 'n', 1, 2)).not.toHaveProperty('args');
  });

  it('counters carry their series in args, at a ts in µs', () => {
    expect(counter(7, 'pages', 'pages received', 2, { pages: 10 })).toEqual({ ph: 'C', name: 'pages received', cat: 'pages', pid: 7, tid: 0, ts: 2000, args: { pages: 10 } });
  });

  it('names and orders processes and threads with M events', () => {
    expect(processName(7, 'dest', 0)).toEqual([
      { ph: 'M', name: 'process_name', pid: 7, tid: 0, ts: 0, args: { name: 'dest' } },
      { ph: 'M', name: 'process_sort_index', pid: 7, tid: 0, ts: 0, args: { sort_index: 0 } },
    ]);
    expect(threadName(7, 11, 'vCPU 1', 11)).toEqual([
      { ph: 'M', name: 'thread_name', pid: 7, tid: 11, ts: 0, args: { name: 'vCPU 1' } },
      { ph: 'M', name: 'thread_sort_index', pid: 7, tid: 11, ts: 0, args: { sort_index: 11 } },
    ]);
  });

  it('writes the JSON Object Format: traceEvents, displayTimeUnit, otherData; every event back as written', () => {
    const events: TraceEvent[] = [...processName(1, 'p', 0), ...threadName(1, 2, 't', 2)];
    // More events than one write holds, names that need escaping.
    for (let i = 0; i < 10_000; i++) events.push(slice(1, 2, 'fault', i % 2 ? 'push' : 'say "hi"\n', i * 0.01, i * 0.01 + 0.005, { page: i, access: 'read', wake: false }));
    events.push(counter(1, 'pages', 'pages received', 100, { pages: 10_000 }));
    const doc: TraceDocument = { traceEvents: events, displayTimeUnit: 'ms', otherData: { strategy: 'kvm-exit', vcpus: 2 } };
    const path = join(dir, 'big.json');
    const bytes = writeTraceFile(path, doc);
    const text = readFileSync(path, 'utf8');
    expect(Buffer.byteLength(text)).toBe(bytes);
    const parsed = JSON.parse(text) as TraceDocument;
    expect(Object.keys(parsed).sort()).toEqual(['displayTimeUnit', 'otherData', 'traceEvents']);
    expect(parsed.displayTimeUnit).toBe('ms');
    expect(parsed.otherData).toEqual({ strategy: 'kvm-exit', vcpus: 2 });
    expect(parsed.traceEvents).toEqual(events);
    expect(parsed.traceEvents[4]).toMatchObject({ ph: 'X', ts: 0, dur: 5, args: { page: 0 } });
    expect(parsed.traceEvents[5]).toMatchObject({ ts: 10, dur: 5 });
  });

  it('an empty trace is still a valid document', () => {
    const path = join(dir, 'empty.json');
    writeTraceFile(path, { traceEvents: [], displayTimeUnit: 'ms', otherData: {} });
    expect(JSON.parse(readFileSync(path, 'utf8'))).toEqual({ traceEvents: [], displayTimeUnit: 'ms', otherData: {} });
  });
});

describe('checkTracePath: --trace is checked before anything starts', () => {
  it('accepts a new file in a writable directory, and leaves nothing behind', () => {
    const path = join(dir, 'new.json');
    checkTracePath(path);
    expect(() => readFileSync(path)).toThrow();
  });

  it('accepts an existing file, and leaves its content alone', () => {
    const path = join(dir, 'old.json');
    writeFileSync(path, 'keep');
    checkTracePath(path);
    expect(readFileSync(path, 'utf8')).toBe('keep');
  });

  it('refuses a path under a file, a directory, and an empty path, saying why (exit 2)', () => {
    const file = join(dir, 'a-file');
    writeFileSync(file, '');
    expect(() => checkTracePath(join(file, 'trace.json'))).toThrow(UsageError);
    expect(() => checkTracePath(join(file, 'trace.json'))).toThrow(/--trace: cannot write the timeline to .*a-file\/trace\.json: ENOTDIR/);
    expect(() => checkTracePath(dir)).toThrow(/--trace: expected a file path to write the timeline to, got the directory/);
    expect(() => checkTracePath('')).toThrow(/--trace: expected a file path/);
  });
});
