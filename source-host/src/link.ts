/**
 * An emulated network link, applied at the source host to both directions
 * (like netem on both ends of a wire): every frame is serialized onto the link
 * at its bandwidth, then arrives `delayUs` later. Frames of different channels
 * (flows) share the bandwidth round-robin, one frame at a time, as a fair-queue
 * qdisc does; frames of one channel keep their order.
 *
 * Timers: setTimeout has millisecond granularity, too coarse for delays of a
 * few hundred microseconds. When the next event is near, the link polls with
 * setImmediate, which lets I/O run between polls, so the event loop is never
 * blocked; when it is far, it sleeps with setTimeout until it is near.
 */

export interface LinkSpec {
  /** One-way delay in microseconds (0 = none). */
  delayUs: number;
  /** Bits per second (0 = unlimited). */
  bandwidthBps: number;
}

export const NO_LINK: LinkSpec = { delayUs: 0, bandwidthBps: 0 };

/** Parses `1gbit`, `10gbit`, `500mbit`, `100kbit`, `1000000` (bits/s); 0 = unlimited. */
export function parseBandwidth(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)?\s*$/i.exec(text);
  if (!m) return undefined;
  const unit = (m[2] ?? 'bit').toLowerCase();
  const scale: Record<string, number> = { bit: 1, bps: 1, kbit: 1e3, kbps: 1e3, mbit: 1e6, mbps: 1e6, gbit: 1e9, gbps: 1e9, tbit: 1e12 };
  const value = Number(m[1]) * scale[unit]!;
  return Number.isFinite(value) ? Math.round(value) : undefined;
}

/** A flow's queue of frames waiting for the link. */
interface Flow {
  frames: { bytes: number; deliver: () => void; at: number }[];
  queuedBytes: number;
}

const nowUs = (): number => performance.now() * 1000;

/** One direction of the link. */
export class LinkDirection {
  private readonly flows = new Map<object, Flow>();
  /** Flows with frames waiting, in round-robin order. */
  private readonly active: Flow[] = [];
  /** Frames on the wire: [arrival time, deliver], in arrival order. */
  private readonly inFlight: { due: number; deliver: () => void }[] = [];
  private inFlightHead = 0;
  private busyUntil = 0;
  private scheduled = false;
  private timer: NodeJS.Timeout | undefined;

  constructor(readonly spec: LinkSpec) {}

  get shaped(): boolean {
    return this.spec.delayUs > 0 || this.spec.bandwidthBps > 0;
  }

  /** Bytes of `flow`'s frames not yet on the wire. */
  queuedBytes(flow: object): number {
    return this.flows.get(flow)?.queuedBytes ?? 0;
  }

  /** Carries a frame of `bytes` for `flow`; `deliver` runs when it arrives at the far end. */
  send(flow: object, bytes: number, deliver: () => void): void {
    if (!this.shaped) {
      deliver();
      return;
    }
    const now = nowUs();
    if (this.spec.bandwidthBps === 0) {
      // No serialization: every frame arrives exactly delayUs after it left.
      this.inFlight.push({ due: now + this.spec.delayUs, deliver });
    } else {
      let f = this.flows.get(flow);
      if (!f) {
        f = { frames: [], queuedBytes: 0 };
        this.flows.set(flow, f);
      }
      if (f.frames.length === 0) this.active.push(f);
      f.frames.push({ bytes, deliver, at: now });
      f.queuedBytes += bytes;
      this.transmit(now);
    }
    this.schedule();
  }

  /** Forgets a flow (its channel closed); frames already on the wire still arrive. */
  drop(flow: object): void {
    const f = this.flows.get(flow);
    if (!f) return;
    this.flows.delete(flow);
    const i = this.active.indexOf(f);
    if (i >= 0) this.active.splice(i, 1);
  }

  stop(): void {
    clearTimeout(this.timer);
    this.active.length = 0;
    this.inFlight.length = 0;
    this.inFlightHead = 0;
  }

  /** Puts frames on the wire while the link is free at `now`, one per flow in turn. */
  private transmit(now: number): void {
    while (this.active.length > 0 && this.busyUntil <= now) {
      const f = this.active.shift()!;
      const frame = f.frames.shift()!;
      f.queuedBytes -= frame.bytes;
      if (f.frames.length > 0) this.active.push(f);
      const start = Math.max(this.busyUntil, frame.at);
      this.busyUntil = start + (frame.bytes * 8 * 1e6) / this.spec.bandwidthBps;
      this.inFlight.push({ due: this.busyUntil + this.spec.delayUs, deliver: frame.deliver });
    }
  }

  private schedule(): void {
    if (this.scheduled) return;
    const next = this.nextEvent();
    if (next === undefined) return;
    this.scheduled = true;
    const wait = next - nowUs();
    if (wait > 2000) {
      this.timer = setTimeout(() => this.tick(), Math.floor(wait / 1000) - 1);
    } else {
      setImmediate(() => this.tick());
    }
  }

  private nextEvent(): number | undefined {
    let next: number | undefined;
    if (this.inFlightHead < this.inFlight.length) next = this.inFlight[this.inFlightHead]!.due;
    if (this.active.length > 0) next = next === undefined ? this.busyUntil : Math.min(next, this.busyUntil);
    return next;
  }

  private tick(): void {
    this.scheduled = false;
    const now = nowUs();
    if (this.spec.bandwidthBps > 0) this.transmit(now);
    while (this.inFlightHead < this.inFlight.length && this.inFlight[this.inFlightHead]!.due <= now) {
      const { deliver } = this.inFlight[this.inFlightHead++]!;
      deliver();
    }
    if (this.inFlightHead > 1024 && this.inFlightHead * 2 > this.inFlight.length) {
      this.inFlight.splice(0, this.inFlightHead);
      this.inFlightHead = 0;
    }
    this.schedule();
  }
}

/** Both directions: `out` from the source to the destination, `in` the other way. */
export class Link {
  readonly out: LinkDirection;
  readonly in: LinkDirection;
  constructor(readonly spec: LinkSpec) {
    this.out = new LinkDirection(spec);
    this.in = new LinkDirection(spec);
  }
  stop(): void {
    this.out.stop();
    this.in.stop();
  }
}
