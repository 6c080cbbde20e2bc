/**
 * Chrome's trace-event JSON, the part of it the timeline uses, and a writer
 * that streams it to a file.
 *
 * The format is the "Trace Event Format" document of the Chromium catapult
 * project (catapult/docs/trace-event-format.md, which points to
 * https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU),
 * read by chrome://tracing and by Perfetto's JSON importer. The fields used:
 *
 * - the JSON Object Format: `{"traceEvents": [...], "displayTimeUnit": "ms",
 *   "otherData": {...}}` (otherData is shown as the trace's metadata);
 * - `ts` and `dur` in microseconds (fractions allowed), `pid` and `tid`
 *   naming the track, `cat` a category, `args` shown with the event;
 * - `ph: "X"`, a complete event: one slice from `ts` for `dur`. Slices on one
 *   thread must nest (a viewer lays each thread out as a stack), so threads
 *   whose work overlaps get one track per lane (see timeline.ts);
 * - `ph: "C"`, a counter event: each key of `args` is a series, valued at
 *   `ts` until the next sample; one track per counter name per process;
 * - `ph: "M"`, metadata: `process_name` and `thread_name` (`args.name`),
 *   `process_sort_index` and `thread_sort_index` (`args.sort_index`: the
 *   order tracks are shown in).
 */
import { closeSync, openSync, writeSync } from 'node:fs';

export type TraceArgs = Record<string, string | number | boolean>;

/** `ph: "X"`: a slice. */
export interface CompleteEvent {
  ph: 'X';
  name: string;
  cat: string;
  pid: number;
  tid: number;
  /** µs */
  ts: number;
  /** µs */
  dur: number;
  args?: TraceArgs;
}

/** `ph: "C"`: a counter sample; every key of args is a series. */
export interface CounterEvent {
  ph: 'C';
  name: string;
  cat: string;
  pid: number;
  tid: number;
  /** µs */
  ts: number;
  args: Record<string, number>;
}

/** `ph: "M"`: names and order of processes and threads. */
export interface MetadataEvent {
  ph: 'M';
  name: 'process_name' | 'thread_name' | 'process_sort_index' | 'thread_sort_index';
  pid: number;
  tid: number;
  ts: 0;
  args: { name: string } | { sort_index: number };
}

export type TraceEvent = CompleteEvent | CounterEvent | MetadataEvent;

/** The JSON Object Format's top level. */
export interface TraceDocument {
  traceEvents: TraceEvent[];
  displayTimeUnit: 'ms' | 'ns';
  otherData: Record<string, string | number | boolean>;
}

/** ms (the run's clock) → µs (the format's), kept to the nanosecond. */
export function usOf(ms: number): number {
  return Math.round(ms * 1e6) / 1e3;
}

/** A slice from `startMs` to `endMs` (ms on the run's clock). */
export function slice(pid: number, tid: number, cat: string, name: string, startMs: number, endMs: number, args?: TraceArgs): CompleteEvent {
  const ts = usOf(startMs);
  const event: CompleteEvent = { ph: 'X', name, cat, pid, tid, ts, dur: Math.max(0, Math.round((usOf(endMs) - ts) * 1e3) / 1e3) };
  if (args !== undefined) event.args = args;
  return event;
}

export function counter(pid: number, cat: string, name: string, atMs: number, series: Record<string, number>): CounterEvent {
  return { ph: 'C', name, cat, pid, tid: 0, ts: usOf(atMs), args: series };
}

export function processName(pid: number, name: string, sortIndex: number): MetadataEvent[] {
  return [
    { ph: 'M', name: 'process_name', pid, tid: 0, ts: 0, args: { name } },
    { ph: 'M', name: 'process_sort_index', pid, tid: 0, ts: 0, args: { sort_index: sortIndex } },
  ];
}

export function threadName(pid: number, tid: number, name: string, sortIndex: number): MetadataEvent[] {
  return [
    { ph: 'M', name: 'thread_name', pid, tid, ts: 0, args: { name } },
    { ph: 'M', name: 'thread_sort_index', pid, tid, ts: 0, args: { sort_index: sortIndex } },
  ];
}

/** Events per write: a large run has a million slices, and one string of all of them would be hundreds of MB. */
const EVENTS_PER_WRITE = 4096;

/**
 * Writes `doc` to `path` as JSON, one event a line, in chunks (so that a
 * large trace never becomes one string). Returns the bytes written.
 */
export function writeTraceFile(path: string, doc: TraceDocument): number {
  const fd = openSync(path, 'w');
  let bytes = 0;
  const put = (text: string): void => {
    const buf = Buffer.from(text, 'utf8');
    // writeSync may write less than asked: go on from where it stopped.
    for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off, buf.length - off);
    bytes += buf.length;
  };
  try {
    put('{"displayTimeUnit":' + JSON.stringify(doc.displayTimeUnit) + ',"otherData":' + JSON.stringify(doc.otherData) + ',"traceEvents":[\n');
    const events = doc.traceEvents;
    for (let i = 0; i < events.length; i += EVENTS_PER_WRITE) {
      const end = Math.min(events.length, i + EVENTS_PER_WRITE);
      let chunk = '';
      for (let j = i; j < end; j++) chunk += (j === 0 ? '' : ',\n') + JSON.stringify(events[j]);
      put(chunk);
    }
    put('\n]}\n');
  } finally {
    closeSync(fd);
  }
  return bytes;
}
