/**
 * The source's warm-up: before it listens for the migration, the source
 * answers requests for a scratch image from a client of its own on
 * loopback, so that V8 has compiled its request path (the WebSocket
 * receive, decodeRequestFast, the controller, the scheduler, sendPage and
 * the socket writes) before the destination's vCPUs fault.
 *
 * Why: the source is one isolate serving every fault channel, and without
 * it that code was compiled while the guest ran. In a kvm-exit run at
 * 8 vCPUs x 16 MiB (`--trace-opt` on the source) 120 functions were
 * compiled after `listening`, 508 ms of TurboFan's time in a run whose
 * elapsed time was 1.6 s, and perf showed the source's compiler threads
 * busy through the run's first half second. The destination warms its
 * side up likewise (dest-host's warm-up/warm-up.ts), for the same reason a
 * native VMM's code is compiled before its guest starts.
 *
 * What it runs, in two rounds (a quarter of the requests, then the rest:
 * SOURCE_FIRST_ROUND_SHARE; each with a server, image and connections of
 * its own: V8 records a field's type as the class of its first value and
 * throws away code that depends on it when another comes, so the second
 * round's objects, not the run's, take that step): a SourceServer over a
 * scratch image of the migration's page size and generator, on 127.0.0.1
 * and an ephemeral port, with a token and secret of its own; a main channel
 * that starts postcopy (no push, preempt), and {@link WARM_UP_CHANNELS}
 * fault channels that each ask for their share of the pages one at a time,
 * as a blocking vCPU does, half of them with the destination's fixed-width
 * request frame (encodeRequestInto), half with encode()'s. Each reply is
 * checked (the page it names, its content against the generator), and the
 * server closes. The migration's server, image, sentmap and counters are
 * never touched: every exactly-once check holds as without it. Over TLS the
 * warm-up still speaks plain ws:// (the TLS paths compile in the run), and
 * pushing is not warmed (it compiles as the run pushes).
 *
 * --warm-up-requests 0 turns it off.
 */
import { WebSocket } from 'ws';
import {
  ChannelRole,
  PROTOCOL_VERSION,
  REQUEST_BYTES,
  decode,
  encode,
  encodeRequestInto,
  isZeroPage,
  makeLayout,
  verifyPage,
  warmUpRoundSizes,
  type ChannelRoleCode,
  type ImageSpec,
  type Message,
} from '@postcopy/shared';
import { generateToken } from './access.js';
import { GuestImage } from './image.js';
import { SourceServer } from './server.js';

/** Fault channels a round opens (each asks for its pages one at a time, as a vCPU does). */
export const WARM_UP_CHANNELS = 4;
/** The scratch image's size at most (with 2 MiB pages a round asks for fewer pages). */
export const MAX_WARM_UP_BYTES = 32 * 1024 * 1024;
/** How long one round may take before the warm-up counts as failed. */
const ROUND_TIMEOUT_MS = 30_000;

export interface SourceWarmUpSpec {
  /** Requests in all, over both rounds (fewer where a round's scratch image is full). */
  requests: number;
  pageSize: number;
  image: ImageSpec;
}

export interface SourceWarmUpDone {
  requests: number;
  rounds: number;
  ms: number;
}

/**
 * The first round's share of the requests, as the destination's
 * (DEST_FIRST_ROUND_SHARE in dest-host's warm-up/warm-up.ts): the first
 * round only shows V8 the first objects, and the second must compile again
 * what their replacement throws away. With halves, the source (kvm-exit,
 * 8 vCPUs x 16 MiB, --no-push --preempt, `--trace-opt` on the source, three
 * interleaved pairs) compiled 52-56 functions after `listening`, at
 * 19.9-20.1 µs of CPU a fault, 33.1-34.5 k pages/s; with a quarter first
 * 42-50, 18.7-19.1 µs, 35.4-36.9 k, each pair better. Shared-uffd at 8 and
 * per-thread-uffd at 16 vCPUs (two pairs each): 50-62 against 62-68
 * compiled in the run, one pair even, rates within their noise.
 */
export const SOURCE_FIRST_ROUND_SHARE = 0.25;

/**
 * Each round's requests: `requests` in two rounds (warmUpRoundSizes, the
 * first SOURCE_FIRST_ROUND_SHARE of them), each capped by its scratch
 * image's size (MAX_WARM_UP_BYTES).
 */
export function warmUpRounds(requests: number, pageSize: number): number[] {
  const perRound = Math.floor(MAX_WARM_UP_BYTES / pageSize);
  return warmUpRoundSizes(requests, SOURCE_FIRST_ROUND_SHARE).map((n) => Math.min(n, perRound));
}

/**
 * Runs the source's warm-up (see above); resolves once every round's server
 * has closed. A failure says it was the warm-up's, on loopback (a network
 * namespace whose `lo` is down cannot run it), and how to turn it off.
 */
export async function warmUpSource(spec: SourceWarmUpSpec): Promise<SourceWarmUpDone> {
  const started = performance.now();
  const rounds = warmUpRounds(spec.requests, spec.pageSize);
  let requests = 0;
  try {
    for (const pages of rounds) requests += await warmUpRound(pages, spec);
  } catch (err) {
    const message = (err as Error).message.replace(/^warm-up: /, '');
    throw new Error(`warm-up on 127.0.0.1 failed (--warm-up-requests 0 turns it off): ${message}`, { cause: err });
  }
  return { requests, rounds: rounds.length, ms: performance.now() - started };
}

/** One round: a scratch server, a main channel that starts postcopy, fault channels asking for `pages` pages. Returns the requests answered. */
async function warmUpRound(pages: number, spec: SourceWarmUpSpec): Promise<number> {
  const layout = makeLayout(pages * spec.pageSize, spec.pageSize);
  const image = await GuestImage.build(layout, spec.image);
  const token = generateToken();
  const server = await SourceServer.listen(image, { host: '127.0.0.1', port: 0, token, keepaliveMs: 0 });
  const sockets: WebSocket[] = [];
  let timer: NodeJS.Timeout | undefined;
  try {
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`warm-up: a round of ${pages} requests took over ${ROUND_TIMEOUT_MS} ms`)), ROUND_TIMEOUT_MS);
    });
    const round = async (): Promise<number> => {
      const open = (role: ChannelRoleCode, channel: string, secret: string) => Peer.open(server.url, { token, role, channel, secret, guestBytes: layout.guestBytes, pageSize: layout.pageSize }, sockets);
      const main = await open(ChannelRole.Main, 'warm-up-main', '');
      main.peer.send(encode({ type: 'start', push: false, preempt: true }));
      const secret = main.welcome.secret;
      const channels = await Promise.all(Array.from({ length: Math.min(WARM_UP_CHANNELS, pages) }, (_, c) => open(ChannelRole.Fault, `warm-up${c}`, secret)));
      const answered = await Promise.all(channels.map(({ peer }, c) => peer.askFor(c, channels.length, pages, c % 2 === 0, spec.image, spec.pageSize)));
      return answered.reduce((a, b) => a + b, 0);
    };
    return await Promise.race([round(), timeout]);
  } finally {
    clearTimeout(timer);
    // The server first: channels it closes are its own doing, no pause of the scratch migration.
    await server.close();
    for (const ws of sockets) ws.terminate();
  }
}

interface Hello {
  token: string;
  role: ChannelRoleCode;
  channel: string;
  secret: string;
  guestBytes: number;
  pageSize: number;
}

/** One of the warm-up client's channels: messages in order, one awaited at a time. */
class Peer {
  private readonly inbox: Message[] = [];
  private waiting: { resolve: (m: Message) => void; reject: (err: Error) => void } | undefined;
  private failure: Error | undefined;

  private constructor(private readonly ws: WebSocket) {}

  /**
   * Connects, says hello and returns the channel with the welcome it got.
   * Every message, the welcome first, goes through the inbox; a close or an
   * error fails what is awaited, then and later.
   */
  static async open(url: string, hello: Hello, sockets: WebSocket[]): Promise<{ peer: Peer; welcome: Extract<Message, { type: 'welcome' }> }> {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    sockets.push(ws);
    const peer = new Peer(ws);
    const layout = makeLayout(hello.guestBytes, hello.pageSize);
    ws.on('message', (data: Buffer) => {
      try {
        peer.deliver(decode(data, { layout }));
      } catch (err) {
        peer.fail(err as Error);
      }
    });
    ws.on('error', (err) => peer.fail(err));
    ws.on('close', (code, reason) => peer.fail(new Error(`warm-up: the scratch server closed ${hello.channel} (${code} ${reason.toString()})`)));
    await new Promise<void>((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    });
    ws.send(encode({ type: 'hello', protocolVersion: PROTOCOL_VERSION, ...hello }));
    const welcome = await peer.next();
    if (welcome.type !== 'welcome') throw new Error(`warm-up: expected the scratch server's welcome on ${hello.channel}, got ${welcome.type === 'error' ? `an error: ${welcome.message}` : welcome.type}`);
    return { peer, welcome };
  }

  send(frame: Uint8Array): void {
    this.ws.send(frame);
  }

  /**
   * Asks for pages `first`, `first + stride`, ... below `pages`, each once
   * the last is answered; checks each reply. Returns the requests answered.
   */
  async askFor(first: number, stride: number, pages: number, fixedWidth: boolean, image: ImageSpec, pageSize: number): Promise<number> {
    const frame = new Uint8Array(REQUEST_BYTES);
    const words = new Uint32Array(pageSize / 4);
    const bytes = new Uint8Array(words.buffer);
    let id = 0;
    for (let page = first; page < pages; page += stride) {
      id++;
      this.send(fixedWidth ? frame.subarray(0, encodeRequestInto(frame, id, page)) : encode({ type: 'request', id, page }));
      const reply = await this.next();
      if ((reply.type !== 'page' && reply.type !== 'zero-page') || reply.id !== id || reply.page !== page) {
        throw new Error(`warm-up: expected page ${page} for request ${id}, got ${reply.type}${'page' in reply ? ` for page ${reply.page}` : ''}`);
      }
      if (reply.type === 'page') bytes.set(reply.data);
      if ((reply.type === 'zero-page') !== isZeroPage(image, page) || (reply.type === 'page' && verifyPage(image, page, words, -1) !== -1)) {
        throw new Error(`warm-up: page ${page} of the scratch image is not the generator's`);
      }
    }
    return id;
  }

  next(): Promise<Message> {
    const m = this.inbox.shift();
    if (m !== undefined) return Promise.resolve(m);
    if (this.failure !== undefined) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiting = { resolve, reject }));
  }

  private deliver(m: Message): void {
    const w = this.waiting;
    this.waiting = undefined;
    if (w !== undefined) w.resolve(m);
    else this.inbox.push(m);
  }

  private fail(err: Error): void {
    this.failure ??= err;
    const w = this.waiting;
    this.waiting = undefined;
    w?.reject(this.failure);
  }
}
