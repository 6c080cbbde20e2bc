/**
 * The VFIO migration v2 device state machine (DESIGN "Devices"), as the
 * kernel defines it in include/uapi/linux/vfio.h (enum vfio_device_mig_state,
 * the FSM arcs) and drives it in drivers/vfio/vfio_main.c
 * (vfio_mig_get_next_state): a request for a state that is not adjacent is
 * walked one supported arc at a time along the shortest path, whose next hop
 * is the kernel's table `vfio_from_fsm_table[cur][new]`, kept here as data.
 *
 * Both hosts run it: the source's device goes RUNNING → PRE_COPY → (P2P) →
 * STOP_COPY → STOP, the destination's RUNNING → ... → RESUMING → STOP →
 * RUNNING. Entering a state of the "saving group" (PRE_COPY, PRE_COPY_P2P,
 * STOP_COPY) from outside it, or RESUMING, opens the device's data stream
 * (the data_fd the kernel returns); moving inside the saving group keeps it;
 * leaving it closes it. A failed arc lands the device in ERROR, which only a
 * reset (VFIO_DEVICE_RESET) leaves, to RUNNING.
 */
import { DeviceError } from '../errors.js';

/** enum vfio_device_mig_state (include/uapi/linux/vfio.h). */
export const DEVICE_STATE = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;
export type DeviceState = (typeof DEVICE_STATE)[keyof typeof DEVICE_STATE];

export const DEVICE_STATE_COUNT = 8;

const NAMES = ['ERROR', 'STOP', 'RUNNING', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'PRE_COPY', 'PRE_COPY_P2P'] as const;
export type DeviceStateName = (typeof NAMES)[number];

export function stateName(state: number): DeviceStateName {
  const name = NAMES[state];
  if (name === undefined) throw new RangeError(`expected a device state from 0 to 7, got ${state}`);
  return name;
}

export const ALL_STATES: readonly DeviceState[] = [0, 1, 2, 3, 4, 5, 6, 7];

/** VFIO_MIGRATION_* of struct vfio_device_feature_migration: what a device supports. */
export const MIGRATION_FLAG = {
  STOP_COPY: 1 << 0,
  P2P: 1 << 1,
  PRE_COPY: 1 << 2,
} as const;

/** The capability names a device spec and the report use (STOP_COPY is always there). */
export function flagNames(flags: number): string[] {
  const names = ['stop-copy'];
  if (flags & MIGRATION_FLAG.P2P) names.push('p2p');
  if (flags & MIGRATION_FLAG.PRE_COPY) names.push('pre-copy');
  return names;
}

/** ERROR stands for "no state at all" in the kernel: it needs every flag, so no device supports it as a target. */
const ALL_FLAGS = 0xffffffff;

/**
 * state_flags_table: the flags a state needs (vfio_main.c). ERROR needs ~0U,
 * so it is never valid as the current or the requested state.
 */
export const STATE_FLAGS: readonly number[] = [
  /* ERROR */ ALL_FLAGS,
  /* STOP */ MIGRATION_FLAG.STOP_COPY,
  /* RUNNING */ MIGRATION_FLAG.STOP_COPY,
  /* STOP_COPY */ MIGRATION_FLAG.STOP_COPY,
  /* RESUMING */ MIGRATION_FLAG.STOP_COPY,
  /* RUNNING_P2P */ MIGRATION_FLAG.STOP_COPY | MIGRATION_FLAG.P2P,
  /* PRE_COPY */ MIGRATION_FLAG.STOP_COPY | MIGRATION_FLAG.PRE_COPY,
  /* PRE_COPY_P2P */ MIGRATION_FLAG.STOP_COPY | MIGRATION_FLAG.P2P | MIGRATION_FLAG.PRE_COPY,
];

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P } = DEVICE_STATE;

/**
 * vfio_from_fsm_table[cur][new]: the next hop from `cur` towards `new` when
 * every optional state is supported (vfio_main.c, as DESIGN's table). Rows and
 * columns in enum order: ERROR, STOP, RUNNING, STOP_COPY, RESUMING,
 * RUNNING_P2P, PRE_COPY, PRE_COPY_P2P.
 */
export const FSM_TABLE: readonly (readonly DeviceState[])[] = [
  /* ERROR */ [ERROR, ERROR, ERROR, ERROR, ERROR, ERROR, ERROR, ERROR],
  /* STOP */ [ERROR, STOP, RUNNING_P2P, STOP_COPY, RESUMING, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P],
  /* RUNNING */ [ERROR, RUNNING_P2P, RUNNING, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P, PRE_COPY, RUNNING_P2P],
  /* STOP_COPY */ [ERROR, STOP, STOP, STOP_COPY, STOP, STOP, ERROR, ERROR],
  /* RESUMING */ [ERROR, STOP, STOP, STOP, RESUMING, STOP, STOP, STOP],
  /* RUNNING_P2P */ [ERROR, STOP, RUNNING, STOP, STOP, RUNNING_P2P, RUNNING, PRE_COPY_P2P],
  /* PRE_COPY */ [ERROR, RUNNING, RUNNING, PRE_COPY_P2P, RUNNING, RUNNING, PRE_COPY, PRE_COPY_P2P],
  /* PRE_COPY_P2P */ [ERROR, RUNNING_P2P, RUNNING_P2P, STOP_COPY, RUNNING_P2P, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P],
];

/** Whether a device with `flags` supports `state` (the state's flags are all among the device's). */
export function supports(flags: number, state: number): boolean {
  const need = STATE_FLAGS[state];
  return need !== undefined && ((need & flags) >>> 0) === need >>> 0;
}

/** -EINVAL, as the kernel returns it. */
export const EINVAL = -22;

/**
 * vfio_mig_get_next_state: the next state on the way from `cur` to `target`
 * for a device with `flags`, or EINVAL when either state is not valid for
 * the flags or the path leads to ERROR (STOP_COPY → PRE_COPY and STOP_COPY →
 * PRE_COPY_P2P are blocked arcs).
 *
 * Arcs through unsupported optional states are skipped: while `next` is not
 * supported, `next = table[next][target]`. The loop stops at ERROR (whose
 * flags no device has) rather than spinning on it: the kernel's loop did
 * spin there for the blocked arcs on a device with PRE_COPY until it was
 * fixed ("vfio: Fix soft lockup in vfio_mig_get_next_state", which made the
 * loop end on ERROR and return -EINVAL), and this is the fixed behaviour.
 */
export function nextState(flags: number, cur: number, target: number): number {
  if (!supports(flags, cur) || !supports(flags, target)) return EINVAL;
  let next: number = FSM_TABLE[cur]![target]!;
  while (next !== ERROR && !supports(flags, next)) next = FSM_TABLE[next]![target]!;
  return next === ERROR ? EINVAL : next;
}

/** Every state from `cur` (excluded) to `target` (included) that the kernel walks, or EINVAL. */
export function statePath(flags: number, cur: number, target: number): DeviceState[] | typeof EINVAL {
  const path: DeviceState[] = [];
  let at = cur;
  while (at !== target) {
    const next = nextState(flags, at, target);
    if (next === EINVAL) return EINVAL;
    path.push(next as DeviceState);
    at = next;
    if (path.length > DEVICE_STATE_COUNT) throw new Error(`device state path from ${stateName(cur)} to ${stateName(target)} does not end`);
  }
  return path;
}

/**
 * The direct arcs a device with `flags` must implement (the comment above
 * vfio_from_fsm_table, and DESIGN "Devices"): what the table's hops may be.
 */
export function directArcs(flags: number): [DeviceState, DeviceState][] {
  const p2p = (flags & MIGRATION_FLAG.P2P) !== 0;
  const pre = (flags & MIGRATION_FLAG.PRE_COPY) !== 0;
  const arcs: [DeviceState, DeviceState][] = [
    [RESUMING, STOP],
    [STOP, RESUMING],
    [STOP, STOP_COPY],
    [STOP_COPY, STOP],
  ];
  if (p2p) arcs.push([RUNNING, RUNNING_P2P], [RUNNING_P2P, RUNNING], [RUNNING_P2P, STOP], [STOP, RUNNING_P2P]);
  if (pre) arcs.push([RUNNING, PRE_COPY], [PRE_COPY, RUNNING], [PRE_COPY, STOP_COPY]);
  if (p2p && pre) arcs.push([PRE_COPY, PRE_COPY_P2P], [PRE_COPY_P2P, PRE_COPY], [PRE_COPY_P2P, RUNNING_P2P], [PRE_COPY_P2P, STOP_COPY], [RUNNING_P2P, PRE_COPY_P2P]);
  if (!p2p) arcs.push([RUNNING, STOP], [STOP, RUNNING]);
  // With P2P and PRE_COPY the driver need not implement PRE_COPY -> STOP_COPY: the path goes through PRE_COPY_P2P.
  if (p2p && pre) return arcs.filter(([a, b]) => !(a === PRE_COPY && b === STOP_COPY));
  return arcs;
}

/** The saving group (PRE_COPY, PRE_COPY_P2P, STOP_COPY): its states share one data transfer session. */
export function inSavingGroup(state: number): boolean {
  return state === PRE_COPY || state === PRE_COPY_P2P || state === STOP_COPY;
}

/** A state in which the device may initiate DMA and change its internal state: RUNNING and PRE_COPY. */
export function runsDma(state: number): boolean {
  return state === RUNNING || state === PRE_COPY;
}

/** What a driver does on one arc (the device's side): return an errno (< 0) to fail the arc. */
export type ArcAction = (from: DeviceState, to: DeviceState) => number;

/** A data stream (the data_fd) was opened or closed on an arc. */
export type StreamEvent = 'open' | 'close';

/** A device could not reach the state asked for (DeviceError's code, ERR_POSTCOPY_DEVICE). */
export class DeviceStateError extends DeviceError {}

/**
 * One device's migration state, as the kernel's VFIO core and a variant
 * driver keep it together: VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE SET walks
 * the path arc by arc, calling the driver's `arc` for each; a failed arc
 * puts the device in ERROR (the driver could not restore any state) and the
 * request fails. `path` records every state it went through, for the report.
 */
export class VfioDeviceFsm {
  private current: DeviceState;
  /** The states the device was in, in order, from its first. */
  readonly path: DeviceStateName[];
  /** A data transfer session is open (a data_fd the user may read or write). */
  private stream = false;

  constructor(
    readonly flags: number,
    private readonly arc: ArcAction = () => 0,
    private readonly onStream: (event: StreamEvent, state: DeviceState) => void = () => {},
    initial: DeviceState = RUNNING,
  ) {
    if ((flags & MIGRATION_FLAG.STOP_COPY) === 0) throw new RangeError(`expected a device with VFIO_MIGRATION_STOP_COPY (every migratable device has it), got flags ${flags}`);
    this.current = initial;
    this.path = [stateName(initial)];
  }

  get state(): DeviceState {
    return this.current;
  }

  get streamOpen(): boolean {
    return this.stream;
  }

  /**
   * SET_STATE to `target`: returns 0, or EINVAL when the target is not
   * reachable (not supported, a blocked arc, the device in ERROR: nothing
   * changes), or the errno of a failed arc (the device is in ERROR then).
   */
  setState(target: DeviceState): number {
    if (this.current === target) return 0;
    // Checked whole before the first arc: a refused request changes nothing.
    const path = statePath(this.flags, this.current, target);
    if (path === EINVAL) return EINVAL;
    for (const next of path) {
      const from = this.current;
      const r = this.arc(from, next);
      if (r < 0) {
        this.enter(ERROR);
        return r;
      }
      this.enter(next);
    }
    return 0;
  }

  /** Like setState, throwing a DeviceStateError that names the device, the states and the errno. */
  setStateOrThrow(target: DeviceState, who: string): void {
    const from = this.current;
    const r = this.setState(target);
    if (r !== 0) {
      throw new DeviceStateError(
        `${who}: expected the device to go from ${stateName(from)} to ${stateName(target)}, got errno ${-r}${this.current === ERROR ? ' and the device is in ERROR (only a reset leaves it)' : ''}`,
      );
    }
  }

  /** VFIO_DEVICE_RESET: back to RUNNING from any state, ERROR included; an open stream closes. */
  reset(): void {
    this.enter(RUNNING);
  }

  private enter(next: DeviceState): void {
    const from = this.current;
    const wasStream = this.stream;
    // A stream opens entering the saving group from outside it, or RESUMING; it stays open inside the group.
    const opens = (inSavingGroup(next) && !inSavingGroup(from)) || next === RESUMING;
    const keeps = inSavingGroup(next) && inSavingGroup(from);
    if (wasStream && !keeps) {
      this.stream = false;
      this.onStream('close', next);
    }
    this.current = next;
    this.path.push(stateName(next));
    if (opens) {
      this.stream = true;
      this.onStream('open', next);
    }
  }
}
