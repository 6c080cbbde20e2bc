/**
 * The destination against a deliberately broken or malicious source (as
 * Firecracker tests its page-fault handler against a malicious one): an
 * in-test WebSocket server speaks the protocol honestly except for one lie per
 * test, and the real destination process must refuse it — exit non-zero
 * within seconds, name what was wrong on stderr, and never report a verified
 * run built on bad data. The same fake, honest but flaky, also drops the
 * connection at a moment fault injection cannot reach (after finish).
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocketServer, type WebSocket } from 'ws';
import { pack } from 'msgpackr';
import {
  noDevicesSummary,
  MessageType,
  PHASE,
  PROTOCOL_VERSION,
  pageHashes,
  bitmapHas,
  decode,
  digestPages,
  encode,
  makeLayout,
  type Hello,
  type Report,
  type Welcome,
} from '@postcopy/shared';
import { GuestImage } from '@postcopy/source-host';
import { DEST, TEST_WARM_UP, runNode, type ProcessResult } from './run.js';

const GUEST_BYTES = 1024 * 1024;
const PAGE_SIZE = 4096;
const layout = makeLayout(GUEST_BYTES, PAGE_SIZE);
const image = new GuestImage(layout, { seed: 11, zeroFraction: 0.1 });

/** One connection of the fake source after its hello. */
interface Channel {
  ws: WebSocket;
  hello: Hello;
}

/** What the fake source does; every hook defaults to the honest behaviour. */
interface Behaviour {
  /** The welcome for a hello (default: the honest one). Return a Buffer to send raw bytes. */
  welcome?: (hello: Hello, honest: Welcome) => Welcome | Buffer;
  /** A request on a fault channel (default: the honest reply, preempt style). */
  request?: (source: FakeSource, ch: Channel, id: number, page: number) => void;
  /** `start` arrived on the main channel. */
  start?: (source: FakeSource, main: Channel) => void;
  /** Pretend no page was ever sent twice in the summary (a lying source). */
  hideDuplicates?: boolean;
  /** `finish` arrived; return true if handled (default: the honest summary). */
  finish?: (source: FakeSource, main: Channel) => boolean;
  /** `resume` arrived (default: refused, as a source without --resume does). */
  resume?: (source: FakeSource, main: Channel) => void;
}

const honestWelcome: Welcome = {
  type: 'welcome',
  protocolVersion: PROTOCOL_VERSION,
  guestBytes: GUEST_BYTES,
  pageSize: PAGE_SIZE,
  totalPages: layout.totalPages,
  imageDigest: image.digest,
  imageSeed: 11,
  zeroFraction: 0.1,
  linkDelayUs: 0,
  linkBandwidthBps: 0,
  secret: '',
  mode: 'postcopy',
};
const FAKE_SECRET = '9a'.repeat(32);

class FakeSource {
  readonly wss: WebSocketServer;
  main: Channel | undefined;
  requests = 0;
  replies = 0;
  readonly sent = new Uint32Array(layout.totalPages);
  pagesPushed = 0;
  finishes = 0;

  constructor(readonly behaviour: Behaviour) {
    this.wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false });
    this.wss.on('connection', (ws) => {
      let channel: Channel | undefined;
      ws.on('message', (data: Buffer) => {
        const m = decode(data, channel ? { layout } : {});
        if (!channel) {
          if (m.type !== 'hello') throw new Error(`fake source: expected hello, got ${m.type}`);
          channel = { ws, hello: m };
          if (m.role === 0) this.main = channel;
          // Honest: the main channel that starts the migration gets its secret, every other one presents it.
          const honest = { ...honestWelcome, secret: m.role === 0 && m.secret === '' ? FAKE_SECRET : '' };
          if (m.role === 1 && m.secret !== FAKE_SECRET) throw new Error(`fake source: a fault channel presented ${JSON.stringify(m.secret)}, not the migration's secret`);
          const w = behaviour.welcome ? behaviour.welcome(m, honest) : honest;
          ws.send(Buffer.isBuffer(w) ? w : encode(w));
          return;
        }
        switch (m.type) {
          case 'start':
            behaviour.start?.(this, channel);
            return;
          case 'request':
            this.requests++;
            (behaviour.request ?? ((s, ch, id, page) => s.reply(ch, id, page)))(this, channel, m.id, m.page);
            return;
          case 'finish':
            this.finishes++;
            if (behaviour.finish?.(this, channel)) return;
            ws.send(encode(this.summary(m.receivedmap)));
            return;
          case 'running':
            return;
          case 'hash-request':
            // The honest source's page hashes (its image, every page last sent by postcopy).
            ws.send(encode({ type: 'page-hashes', hashes: pageHashes(image, layout.totalPages), phases: new Uint8Array(layout.totalPages).fill(PHASE.POSTCOPY) }));
            return;
          case 'resume':
            if (behaviour.resume) {
              behaviour.resume(this, channel);
              return;
            }
            // A source that cannot resume refuses, as the real one does without --resume.
            ws.send(encode({ type: 'error', code: 'ERR_POSTCOPY_PROTOCOL', message: 'expected start: this fake source cannot resume' }));
            ws.close(1002);
            return;
          default:
            throw new Error(`fake source: unexpected ${m.type}`);
        }
      });
      ws.on('error', () => {});
    });
  }

  get url(): string {
    return `ws://127.0.0.1:${(this.wss.address() as { port: number }).port}`;
  }

  /** The honest reply to a request: the page's true content on the channel that asked. */
  reply(ch: Channel, id: number, page: number): void {
    this.replies++;
    this.sent[page]!++;
    ch.ws.send(encode(image.isZero(page) ? { type: 'zero-page', id, page } : { type: 'page', id, page, data: image.pageBytes(page) }));
  }

  /** Pushes one page with its true content on the main channel. */
  push(page: number): void {
    this.sent[page]!++;
    this.pagesPushed++;
    this.main!.ws.send(encode({ type: 'pushed', page, data: image.pageBytes(page) }));
  }

  private summary(receivedmap: Uint8Array) {
    let pagesSent = 0;
    let twice = 0;
    let sentNotReceived = 0;
    let receivedNotSent = 0;
    for (let p = 0; p < layout.totalPages; p++) {
      const s = this.sent[p]!;
      const r = bitmapHas(receivedmap, p);
      if (s > 0) pagesSent++;
      if (s > 1) twice++;
      if (s > 0 && !r) sentNotReceived++;
      if (s === 0 && r) receivedNotSent++;
    }
    return {
      type: 'summary' as const,
      requests: this.requests,
      replies: this.replies,
      repliesPage: this.replies,
      repliesZero: 0,
      repliesAlreadySent: 0,
      pagesSent,
      pagesPushed: this.pagesPushed,
      pagesZero: 0,
      pagesSentTwice: this.behaviour.hideDuplicates ? 0 : twice,
      digestOfReceived: digestPages(image, layout, (p) => bitmapHas(receivedmap, p)),
      sentNotReceived,
      receivedNotSent,
      peakRssBytes: 0,
      repliesUndeliverable: 0,
      keepaliveTimeouts: 0,
      warmUpRequests: 0,
      warmUpMs: 0,
      migration: {
        setupTimeMs: 0, totalTimeMs: 0, downtimeMs: 0, expectedDowntimeMs: 0, downtimeLimitMs: 300, switchoverReason: 'none',
        rounds: 0, dirtySyncCount: 0, pagesSent: 0, pagesResent: 0, bytes: 0, dirtyPagesRate: 0, throttlePercent: 0, perRound: [], discardPages: 0, discardRanges: 0,
      },
      cpuUs: 0,
      cpuMainThreadUs: null,
      devices: noDevicesSummary(),
    };
  }

  close(): Promise<void> {
    for (const c of this.wss.clients) c.terminate();
    return new Promise((r) => this.wss.close(() => r()));
  }
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

interface DestRun extends ProcessResult {
  report: Report | undefined;
  source: FakeSource;
  ms: number;
}

/** Runs the real destination process against a fake source; a hang fails the test (hard kill after 15 s). */
async function runAgainst(behaviour: Behaviour, extra: string[] = [], strategy = 'kvm-exit'): Promise<DestRun> {
  const source = new FakeSource(behaviour);
  cleanups.push(() => source.close());
  await new Promise<void>((r) => (source.wss.address() ? r() : source.wss.once('listening', () => r())));
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-malicious-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const json = join(dir, 'report.json');
  const t0 = Date.now();
  const preempt = extra.includes('--no-preempt') ? [] : ['--preempt'];
  const push = extra.includes('--push') ? [] : ['--no-push'];
  const args = [
    '--source', source.url, '--token', 't', ...TEST_WARM_UP, '--memory', '1MiB', '--vcpus', '1', '--strategy', strategy,
    ...preempt, ...push, '--watchdog-ms', '2000', '--connect-timeout-ms', '2000', '--json', json,
    ...extra.filter((a) => a !== '--no-preempt' && a !== '--push'),
  ];
  const r = await runNode(DEST, args, { timeoutMs: 15_000 });
  const report = existsSync(json) ? (JSON.parse(readFileSync(json, 'utf8')) as Report) : undefined;
  return { ...r, report, source, ms: Date.now() - t0 };
}

/** The run failed clearly: non-zero, no verified report, stderr names the problem. */
function expectRejected(r: DestRun, message: RegExp): void {
  expect(r.code, `stderr: ${r.stderr}`).not.toBe(0);
  expect(r.signal).toBeNull();
  expect(r.stderr).toMatch(message);
  if (r.report) expect(r.report.verified).toBe(false);
}

/** The first `n` requests are answered honestly, the next one by `lie`. */
function lieOnRequest(n: number, lie: (s: FakeSource, ch: Channel, id: number, page: number) => void): Behaviour['request'] {
  let seen = 0;
  return (s, ch, id, page) => (seen++ < n ? s.reply(ch, id, page) : lie(s, ch, id, page));
}

describe('the destination against an honest but slow source', () => {
  it('finishes when the last page is a requested one, installed by the vCPU after complete arrived', async () => {
    // Everything but page 0 is pushed at once and complete follows; the vCPU's
    // request for page 0 is answered 300 ms later, on its own channel.
    const r = await runAgainst(
      {
        start: (s) => {
          for (let p = 1; p < layout.totalPages; p++) {
            if (image.isZero(p)) {
              s.sent[p]!++;
              s.pagesPushed++;
              s.main!.ws.send(encode({ type: 'pushed-zero', page: p }));
            } else {
              s.push(p);
            }
          }
          s.main!.ws.send(encode({ type: 'complete', pagesSent: layout.totalPages }));
        },
        request: (s, ch, id, page) => setTimeout(() => s.reply(ch, id, page), 300),
      },
      ['--push', '--workload', 'sequential', '--accesses', '1'],
    );
    expect(r.code, `stderr: ${r.stderr}`).toBe(0);
    expect(r.report?.verified).toBe(true);
    expect(r.report?.counters.pagesDemand).toBe(1);
    expect(r.report?.counters.pagesInstalled).toBe(layout.totalPages);
  });
});

describe('the destination against a malicious source', () => {
  it('a run against the honest fake source verifies (the harness itself is sound)', async () => {
    const r = await runAgainst({});
    expect(r.code, `stderr: ${r.stderr}`).toBe(0);
    expect(r.report?.verified).toBe(true);
  });

  for (const strategy of ['kvm-exit', 'shared-uffd']) {
    it(`a reply for a request id never made (${strategy})`, async () => {
      const r = await runAgainst(
        { request: lieOnRequest(3, (_s, ch, id, page) => ch.ws.send(encode({ type: 'page', id: id + 1000, page, data: image.pageBytes(page) }))) },
        [],
        strategy,
      );
      expectRejected(r, /page for request id \d+, which this channel never sent/);
      expect(r.report).toBeUndefined();
    });
  }

  it('a reply for the right id but another page', async () => {
    const r = await runAgainst({
      request: lieOnRequest(2, (_s, ch, id, page) => {
        const other = (page + 7) % layout.totalPages;
        ch.ws.send(encode({ type: 'page', id, page: other, data: image.pageBytes(other) }));
      }),
    });
    expectRejected(r, /page for request \d+: expected page \d+, got page \d+/);
    expect(r.report).toBeUndefined();
  });

  for (const strategy of ['kvm-exit', 'per-thread-uffd']) {
    it(`a page of the wrong size (${strategy})`, async () => {
      const r = await runAgainst(
        { request: lieOnRequest(1, (_s, ch, id, page) => ch.ws.send(pack([MessageType.Page, id, page, Buffer.alloc(100, 0xab)]))) },
        [],
        strategy,
      );
      expectRejected(r, /page\.data: expected 4096 bytes/);
      expect(r.report).toBeUndefined();
    });
  }

  it('a pushed run that is not a whole number of pages', async () => {
    const r = await runAgainst({ start: (_s, main) => main.ws.send(pack([MessageType.Pushed, 0, Buffer.alloc(PAGE_SIZE + 1)])) });
    expectRejected(r, /pushed\.data: expected 1 to \d+ whole pages/);
    expect(r.report).toBeUndefined();
  });

  it('a page index outside the guest, in a reply', async () => {
    const r = await runAgainst({
      request: lieOnRequest(1, (_s, ch, id) => ch.ws.send(pack([MessageType.Page, id, layout.totalPages + 5, Buffer.alloc(PAGE_SIZE)]))),
    });
    expectRejected(r, new RegExp(`page: expected a whole number from 0 to ${layout.totalPages - 1}, got ${layout.totalPages + 5}`));
    expect(r.report).toBeUndefined();
  });

  it('a page index outside the guest, pushed', async () => {
    const r = await runAgainst({ start: (_s, main) => main.ws.send(pack([MessageType.PushedZero, 1 << 30])) });
    expectRejected(r, /pushed-zero\.page: expected a whole number from 0 to 255/);
    expect(r.report).toBeUndefined();
  });

  it('a duplicate page (pushed twice, honest content, the source hides it) fails the exactly-once check', async () => {
    const r = await runAgainst({
      hideDuplicates: true,
      start: (s) => {
        s.push(0);
        s.push(0);
      },
    });
    expectRejected(r, /no-page-sent-twice|arrived already installed/);
    // Either the run aborted, or its report names the exactly-once check as failed.
    if (r.report) {
      const check = r.report.checks.find((c) => c.name === 'no-page-sent-twice');
      expect(check?.ok).toBe(false);
      expect(check?.detail).toMatch(/[1-9]\d* arrived already installed/);
    }
  });

  it('pages with wrong content (right size, garbage bytes) fail the content check at first touch', async () => {
    const r = await runAgainst({
      request: lieOnRequest(4, (s, ch, id, page) => {
        s.replies++;
        s.sent[page]!++;
        ch.ws.send(encode({ type: 'page', id, page, data: new Uint8Array(PAGE_SIZE).fill(0x5a) }));
      }),
    });
    expectRejected(r, /content/);
    expect(r.report).toBeDefined();
    const content = r.report!.checks.find((c) => c.name === 'content');
    expect(content?.ok).toBe(false);
    expect(content?.detail).toMatch(/differed from the generator at first touch/);
    // The digests differ too, and the destination names the pages (it asked the source for their hashes).
    const digest = r.report!.checks.find((c) => c.name === 'digest');
    expect(digest?.ok).toBe(false);
    expect(digest?.detail, digest?.detail).toMatch(/: \d+ page\(s\) differ from the source's memory as its vCPUs stopped, first \d+ \(last sent by postcopy\)/);
  });

  it('a welcome with another guest size', async () => {
    const r = await runAgainst({ welcome: (_h, w) => ({ ...w, guestBytes: 2 * GUEST_BYTES, totalPages: 2 * layout.totalPages }) });
    expectRejected(r, /expected guest layout 1MiB in 4KiB pages, the source has 2MiB in 4KiB pages/);
    expect(r.report).toBeUndefined();
  });

  it('a welcome with another page size', async () => {
    const r = await runAgainst({ welcome: (_h, w) => ({ ...w, pageSize: 2 * 1024 * 1024, totalPages: 0 }) });
    expectRejected(r, /expected guest layout 1MiB in 4KiB pages, the source has 1MiB in 2MiB pages/);
    expect(r.report).toBeUndefined();
  });

  it('a welcome whose page count contradicts its layout', async () => {
    const r = await runAgainst({ welcome: (_h, w) => ({ ...w, totalPages: 17 }) });
    expectRejected(r, /expected guest layout 1MiB in 4KiB pages.*\(17 pages\)/);
    expect(r.report).toBeUndefined();
  });

  it('a right welcome on the main channel but a wrong one on a fault channel', async () => {
    const r = await runAgainst({ welcome: (h, w) => (h.role === 1 ? { ...w, guestBytes: 4 * GUEST_BYTES, totalPages: 4 * layout.totalPages } : w) });
    expectRejected(r, /expected guest layout 1MiB in 4KiB pages, the source has 4MiB/);
    expect(r.report).toBeUndefined();
  });

  it('a main-channel welcome that gives the migration no secret', async () => {
    const r = await runAgainst({ welcome: (_h, w) => ({ ...w, secret: '' }) });
    expectRejected(r, /expected the source to give this migration a secret in its welcome, got none/);
  });

  it('a fault-channel welcome that hands out a (new) secret', async () => {
    const r = await runAgainst({ welcome: (h, w) => (h.role === 1 ? { ...w, secret: '77'.repeat(32) } : w) });
    expectRejected(r, /expected no secret in the welcome of a channel that presented one, got a new one/);
  });

  describe('a source that claims precopy (hybrid) and then misbehaves', () => {
    const hybrid = (start: Behaviour['start']): Behaviour => ({ welcome: (_h, w) => ({ ...w, mode: 'hybrid' }), start });
    /** A discard frame with these (first, count) pairs, as raw bytes: the encoder would not write a bad one. */
    const discard = (...pairs: number[]): Buffer => {
      const b = Buffer.alloc(pairs.length * 4);
      pairs.forEach((v, i) => b.writeUInt32LE(v, i * 4));
      return pack([MessageType.Discard, b]);
    };
    const precopyPage = (main: Channel): void => void main.ws.send(encode({ type: 'precopy-pages', round: 1, page: 0, data: image.pageBytes(0) }));
    it.each([
      ['overlapping ranges', discard(0, 4, 2, 1), /discard\.ranges: expected sorted ranges that do not overlap, got one from page 2 after one that ends at page 3/],
      ['unsorted ranges', discard(10, 1, 3, 1), /discard\.ranges: expected sorted ranges that do not overlap/],
      ['a range out of the guest', discard(250, 10), /discard\.ranges: expected ranges inside the guest's 256 pages, got pages 250 to 259/],
    ])('a discard with %s: rejected by the codec, the run fails clearly', async (_name, frame, message) => {
      const r = await runAgainst(hybrid((_s, main) => {
        precopyPage(main);
        main.ws.send(frame);
      }));
      expectRejected(r, message);
      expect(r.report).toBeUndefined();
    });

    it('pushed pages before any switchover', async () => {
      const r = await runAgainst(hybrid((s) => s.push(3)));
      expectRejected(r, /expected pushed pages only after the switchover, got it during precopy/);
    });

    it('a switchover from stop-and-copy with pages missing', async () => {
      const r = await runAgainst(hybrid((_s, main) => {
        precopyPage(main);
        main.ws.send(encode({ type: 'switchover', postcopy: false }));
      }));
      expectRejected(r, /expected every page at the end of precopy \(stop-and-copy\), got 1 of 256: the source switched over with pages missing/);
    });

    it('precopy pages after the switchover', async () => {
      const r = await runAgainst(hybrid((_s, main) => {
        main.ws.send(encode({ type: 'switchover', postcopy: true }));
        precopyPage(main);
      }));
      expectRejected(r, /expected precopy-pages only during precopy \(before the switchover\), got it in state postcopy-active/);
    });
  });

  it('a welcome of the wrong shape', async () => {
    const r = await runAgainst({ welcome: () => pack([MessageType.Welcome, PROTOCOL_VERSION, GUEST_BYTES, PAGE_SIZE]) });
    expectRejected(r, /not a valid welcome: welcome: expected 11 fields, got 3/);
    expect(r.report).toBeUndefined();
  });

  it('a source that closes the main channel mid-run and cannot resume: the destination pauses, retries, then gives up', async () => {
    const r = await runAgainst(
      { request: lieOnRequest(3, (s) => s.main!.ws.close(1011, 'going away')) },
      ['--reconnect-timeout-ms', '1500'],
    );
    expectRejected(r, /connection to the source closed \(code 1011: going away\)\) and the migration could not be resumed within 1500 ms/);
    expect(r.stderr).toMatch(/postcopy paused/);
    expect(r.stderr).toMatch(/the source refused to resume: expected start: this fake source cannot resume/);
    expect(r.report).toBeUndefined();
  });

  it('a source that never answers a request: the watchdog names the blocked vCPU', async () => {
    const r = await runAgainst({ request: lieOnRequest(3, () => {}) });
    expectRejected(r, /vCPU 0/);
    expect(r.stderr).toMatch(/blocked|no progress|watchdog/i);
    expect(r.ms).toBeLessThan(12_000);
    expect(r.report).toBeUndefined();
  });

  // On the kernel's userfaultfd a thread blocked in a fault cannot be
  // interrupted or terminated: the failed run must still name it, exit
  // non-zero (never hang), and report nothing (the close that lets the
  // thread go wakes it on a zero page that was never installed).
  for (const [strategy, extra] of [['shared-uffd', []], ['per-region-uffd', []], ['kvm-exit', ['--io-threads', '1']]] as const) {
    it.runIf(process.platform === 'linux')(
      `--memory-backend uffd, ${strategy}${extra.length ? ` ${extra.join(' ')}` : ''}: a source that never answers — the watchdog names the thread blocked in the kernel, the destination exits`,
      async () => {
        const r = await runAgainst({ request: lieOnRequest(3, () => {}) }, ['--memory-backend', 'uffd', ...extra], strategy);
        expectRejected(r, /watchdog: no progress for \d+ ms; blocked: /);
        if (strategy === 'kvm-exit') {
          // The vCPU waits for its own fetch; the I/O thread sleeps in the kernel's handle_userfault.
          expect(r.stderr).toMatch(/vCPU 0 on page \d+ for \d+ ms|I\/O thread 0 on page \d+ for \d+ ms \(blocked in userfaultfd\)/);
        } else {
          expect(r.stderr).toMatch(/vCPU 0 on page \d+ for \d+ ms \(blocked in userfaultfd\)/);
        }
        expect(r.ms).toBeLessThan(12_000);
        expect(r.report).toBeUndefined();
        expect(r.stdout).not.toContain('verified: true');
      },
    );
  }

  it('without preempt: sent-on-main for a page that never comes on main — the watchdog stops the run', async () => {
    const r = await runAgainst({
      request: (s, ch, id, page) => {
        s.replies++;
        ch.ws.send(encode({ type: 'sent-on-main', id, page }));
      },
    }, ['--no-preempt']);
    expectRejected(r, /vCPU 0/);
    expect(r.report).toBeUndefined();
  });
});

describe('an honest source whose connection drops at the very end', () => {
  it('lost after finish, before the summary: the destination resumes, finishes again, and ends verified', async () => {
    const r = await runAgainst({
      // The first finish is never answered: the main channel drops instead.
      finish: (s, main) => {
        if (s.finishes > 1) return false;
        main.ws.terminate();
        return true;
      },
      resume: (_s, main) => void main.ws.send(encode({ type: 'resumed', pagesMarkedUnsent: 0, restarted: false })),
    });
    expect(r.code, r.stderr).toBe(0);
    expect(r.source.finishes).toBe(2);
    expect(r.stderr).toMatch(/connection lost \(main channel: .*\): postcopy paused/);
    expect(r.stderr).toMatch(/dest: resumed after \d+ ms/);
    expect(r.report!.verified).toBe(true);
    expect(r.report!.recovery).toMatchObject({ pauses: 1, resumes: 1 });
    expect(r.report!.checks.find((c) => c.name === 'recovered')?.ok).toBe(true);
  });
});
