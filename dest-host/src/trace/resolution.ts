/**
 * How a fault was resolved, as the timeline names it: from what the thread
 * that handled the fault saw (its Resolution: a resolver's for a userfaultfd
 * fault, the vCPU's own for kvm-exit), and who installed the page (its
 * ORIGIN, recorded by the installer).
 *
 * A fault need not have been handled by anyone: a COPY on its context wakes
 * a thread before a reader took its message (the kernel then drops the
 * message, and so does the emulation), and a page can arrive between the
 * receivedmap check and the load. Such a fault was resolved by whoever
 * installed the page.
 */
import { Resolution } from '../vmm/page-installer.js';
import { ORIGIN } from '../vmm/state.js';

export const FAULT_RESOLUTIONS = [
  /** The fault's own request brought the page, installed by its resolver (or its kvm-exit vCPU). */
  'demand',
  /** The fault's own request was answered on the main channel (no preempt); the main thread installed it. */
  'sent-on-main',
  /** The fault's own request was answered already-sent: the page was on its way by push. */
  'already-sent',
  /** A pushed page arrived before the fault sent any request. */
  'push',
  /** The fault's own request brought the page, but another install came first: EEXIST, and no WAKE owed (kvm-exit's DONTWAKE COPY). */
  'eexist',
  /** As eexist, and the resolver paid the WAKE it owed (the kernel wakes nobody on EEXIST). */
  'eexist-wake',
  /** Another thread had claimed the page (asked for it) first, so this fault's handler did not ask again (the report's duplicateRequestsSuppressed). */
  'duplicate-suppressed',
  /**
   * Another thread's request brought the page before this fault's handler
   * looked, or its install woke the thread before any handler took the
   * fault's message: a duplicate too, but one there was nothing to suppress for.
   */
  'other-request',
  /** The page came in a precopy round (not expected after the switchover: a fault on it would be a bug). */
  'precopy',
  /** Nobody is known to have installed the page (a bug of the destination's bookkeeping). */
  'unknown',
] as const;

export type FaultResolution = (typeof FAULT_RESOLUTIONS)[number];

/** What installed a page, as the trace's args say it. */
export const ORIGIN_NAMES: Record<number, string> = {
  [ORIGIN.NONE]: 'none',
  [ORIGIN.DEMAND]: 'demand',
  [ORIGIN.MAIN]: 'main-channel reply',
  [ORIGIN.PUSH]: 'push',
  [ORIGIN.PRECOPY]: 'precopy',
};

/** Resolutions in which the handler asked the source itself: they say more than the others when a fault has two records. */
export function ownRequest(resolution: number): boolean {
  return resolution === Resolution.INSTALLED || resolution === Resolution.EEXIST || resolution === Resolution.ALREADY_SENT || resolution === Resolution.ON_MAIN;
}

/**
 * The fault's resolution. `own` is the Resolution of whoever handled it, or
 * -1 when nobody did; `origin` who installed the page; `owesWake` whether
 * that handler owed a WAKE after an install elsewhere.
 */
export function faultResolution(own: number, origin: number, owesWake: boolean): FaultResolution {
  switch (own) {
    case Resolution.INSTALLED:
      return 'demand';
    case Resolution.ON_MAIN:
      return 'sent-on-main';
    case Resolution.ALREADY_SENT:
      return 'already-sent';
    case Resolution.EEXIST:
      return owesWake ? 'eexist-wake' : 'eexist';
    case Resolution.SUPPRESSED:
      return 'duplicate-suppressed';
    default:
      // In already when the handler looked, or never handled: whoever installed it resolved it.
      switch (origin) {
        case ORIGIN.PUSH:
          return 'push';
        case ORIGIN.DEMAND:
        case ORIGIN.MAIN:
          // Another thread's request brought it: no request of this fault's.
          return 'other-request';
        case ORIGIN.PRECOPY:
          return 'precopy';
        default:
          return 'unknown';
      }
  }
}

/** Whether the handler issued a WAKE for this fault (PageInstaller pays one whenever it owes one and did not install the page itself). */
export function wakeIssued(own: number, owesWake: boolean): boolean {
  return owesWake && own >= 0 && own !== Resolution.INSTALLED;
}
