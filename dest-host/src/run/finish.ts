/**
 * The end of a run: the exactly-once accounting with the source (finish, its
 * summary; again after a resume if the connection is lost meanwhile), and,
 * when the memory digests differ, the pages that do: the destination asks
 * for every page's hash and the phase that last sent it, and compares them
 * with its own, so that a failed check says which pages are wrong and who
 * sent the stale copy (a precopy round, stop-and-copy, postcopy).
 */
import { ConnectionError, bitmapBytes, bitmapSet, pageHash, phaseName, type SourceSummary } from '@postcopy/shared';
import type { GuestPages } from '../memory/pages.js';
import type { PageClient } from '../net/page-client.js';
import type { Recovery } from '../recovery.js';
import { PAGE, type VmmState } from '../vmm/state.js';
import type { Abort } from './abort.js';
import type { MainChannel } from './main-channel.js';

/** The pages in `status`, one bit a page, and how many there are. */
export function bitmapOf(vmm: VmmState, totalPages: number, status: number): { map: Uint8Array; count: number } {
  const map = new Uint8Array(bitmapBytes(totalPages));
  let count = 0;
  for (let page = 0; page < totalPages; page++) {
    if (Atomics.load(vmm.pageStatus, page) === status) {
      bitmapSet(map, page);
      count++;
    }
  }
  return { map, count };
}

/** How long the source may take to answer finish, or the hash request. */
const ANSWER_MS = 30_000;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new ConnectionError(`the source did not answer ${what} within ${ms / 1000} s`)), ms);
    }),
  ]);
}

/**
 * Sends finish (with the receivedmap) until a summary comes back: a
 * connection lost meanwhile is resumed by recovery, and finish goes again.
 * Returns the summary and how many pages were received.
 */
export async function exchangeSummary(o: { main: () => PageClient; channel: MainChannel; vmm: VmmState; totalPages: number; recovery: Recovery; abort: Abort }): Promise<{ summary: SourceSummary; received: number }> {
  for (;;) {
    await o.abort.race(o.recovery.whenActive());
    const receivedmap = bitmapOf(o.vmm, o.totalPages, PAGE.RECEIVED);
    o.main().send({ type: 'finish', receivedmap: receivedmap.map });
    const summary = await o.abort.race(Promise.race([withTimeout(o.channel.summary, ANSWER_MS, 'finish'), o.recovery.nextPause().then(() => undefined)]));
    if (summary !== undefined) return { summary, received: receivedmap.count };
  }
}

/** How long the source may take to send the page hashes (the run fails either way: this only names pages). */
const HASHES_MS = 10_000;

/** At most this many differing pages are named. */
const NAMED = 8;

/**
 * The digests differ: asks the source for its page hashes and names the
 * first pages (among those received here) whose content differs, with the
 * phase that last sent each. Returns the text for the failed check.
 */
export async function namePagesThatDiffer(o: { main: PageClient; channel: MainChannel; pages: GuestPages; vmm: VmmState; totalPages: number; abort: Abort }): Promise<string> {
  o.main.send({ type: 'hash-request' });
  let theirs;
  try {
    theirs = await o.abort.race(withTimeout(o.channel.pageHashes, HASHES_MS, 'the request for page hashes'));
  } catch (err) {
    // The digests differ whatever the answer: the run fails; only the names are missing.
    return `which pages differ is unknown: ${(err as Error).message}`;
  }
  const view = new DataView(theirs.hashes.buffer, theirs.hashes.byteOffset, theirs.hashes.length);
  const named: string[] = [];
  let differing = 0;
  for (let page = 0; page < o.totalPages; page++) {
    // Only received pages: reading a missing one would fault (on the kernel, block this thread).
    if (Atomics.load(o.vmm.pageStatus, page) !== PAGE.RECEIVED) continue;
    if (pageHash(o.pages.pageBytes(page)) === view.getUint32(page * 4, true)) continue;
    differing++;
    if (named.length < NAMED) named.push(`${page} (last sent by ${phaseName(theirs.phases[page]!)})`);
  }
  if (differing === 0) return 'no received page differs by its hash (the digests cover different pages)';
  return `${differing} page(s) differ from the source's memory as its vCPUs stopped, first ${named.join(', ')}`;
}
