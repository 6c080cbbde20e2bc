/**
 * The VFIO v2 device state machine against the kernel: the next-hop table
 * as DESIGN transcribes vfio_from_fsm_table, every (current, target) pair
 * for every capability combination (each hop a direct arc the flags allow,
 * the path the shortest one that does not pass through the saving group, as
 * vfio.h's rules say), the blocked STOP_COPY → PRE_COPY arcs, ERROR (left
 * by reset only), and the data stream that entering PRE_COPY, PRE_COPY_P2P,
 * STOP_COPY or RESUMING opens.
 */
import { describe, expect, it } from 'vitest';
import {
  ALL_STATES,
  DEVICE_STATE,
  EINVAL,
  FSM_TABLE,
  MIGRATION_FLAG,
  VfioDeviceFsm,
  directArcs,
  inSavingGroup,
  nextState,
  stateName,
  statePath,
  supports,
  type DeviceState,
} from './vfio-fsm.js';

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P } = DEVICE_STATE;
const F = MIGRATION_FLAG;
const COMBINATIONS = [
  ['stop-copy only', F.STOP_COPY],
  ['P2P', F.STOP_COPY | F.P2P],
  ['PRE_COPY', F.STOP_COPY | F.PRE_COPY],
  ['P2P and PRE_COPY', F.STOP_COPY | F.P2P | F.PRE_COPY],
] as const;

/** DESIGN "Devices": the table, rows and columns in its order (STOP, RUNNING, PRE_COPY, PC_P2P, STOP_COPY, RESUMING, R_P2P). */
const DESIGN_ORDER: DeviceState[] = [STOP, RUNNING, PRE_COPY, PRE_COPY_P2P, STOP_COPY, RESUMING, RUNNING_P2P];
const DESIGN_TABLE: Record<number, DeviceState[]> = {
  [STOP]: [STOP, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P, STOP_COPY, RESUMING, RUNNING_P2P],
  [RUNNING]: [RUNNING_P2P, RUNNING, PRE_COPY, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P, RUNNING_P2P],
  [PRE_COPY]: [RUNNING, RUNNING, PRE_COPY, PRE_COPY_P2P, PRE_COPY_P2P, RUNNING, RUNNING],
  [PRE_COPY_P2P]: [RUNNING_P2P, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P, STOP_COPY, RUNNING_P2P, RUNNING_P2P],
  [STOP_COPY]: [STOP, STOP, ERROR, ERROR, STOP_COPY, STOP, STOP],
  [RESUMING]: [STOP, STOP, STOP, STOP, STOP, RESUMING, STOP],
  [RUNNING_P2P]: [STOP, RUNNING, RUNNING, PRE_COPY_P2P, STOP, STOP, RUNNING_P2P],
};

/**
 * vfio.h's rule for combination transitions: "the path cannot have saving
 * group states as interior arcs, only starting/end states" — a path may go
 * on inside the saving group it starts in (one data session), but one that
 * has been outside it may not pass through it on the way.
 */
function interiorOk(path: readonly DeviceState[]): boolean {
  for (let i = 1; i < path.length - 1; i++) {
    if (inSavingGroup(path[i]!) && !path.slice(0, i).every(inSavingGroup)) return false;
  }
  return true;
}

/** The shortest path over the direct arcs that keeps the rule above (every simple path: there are 8 states). */
function shortestLength(flags: number, from: DeviceState, to: DeviceState): number | undefined {
  const arcs = directArcs(flags);
  let best: number | undefined;
  const walk = (path: DeviceState[]): void => {
    const at = path[path.length - 1]!;
    if (at === to) {
      if (interiorOk(path) && (best === undefined || path.length - 1 < best)) best = path.length - 1;
      return;
    }
    for (const [a, b] of arcs) if (a === at && !path.includes(b)) walk([...path, b]);
  };
  walk([from]);
  return best;
}

describe('the next-hop table', () => {
  it('is DESIGN\'s transcription of vfio_from_fsm_table, and ERROR maps everything to ERROR', () => {
    for (const cur of DESIGN_ORDER) {
      for (const [i, target] of DESIGN_ORDER.entries()) {
        expect(stateName(FSM_TABLE[cur]![target]!), `${stateName(cur)} -> ${stateName(target)}`).toBe(stateName(DESIGN_TABLE[cur]![i]!));
      }
    }
    expect(FSM_TABLE[ERROR]!.every((s) => s === ERROR)).toBe(true);
  });
});

describe.each(COMBINATIONS)('every (current, target) pair with %s', (_, flags) => {
  it('is refused when either state is unsupported, or walks only direct arcs along a shortest path that enters the saving group only at its end', () => {
    for (const cur of ALL_STATES) {
      for (const target of ALL_STATES) {
        const path = statePath(flags, cur, target);
        const label = `${stateName(cur)} -> ${stateName(target)}`;
        if (!supports(flags, cur) || !supports(flags, target)) {
          if (cur !== target) expect(path, label).toBe(EINVAL);
          continue;
        }
        if (cur === STOP_COPY && (target === PRE_COPY || target === PRE_COPY_P2P)) {
          expect(path, `${label} (blocked)`).toBe(EINVAL);
          continue;
        }
        expect(path, label).not.toBe(EINVAL);
        const hops = path as DeviceState[];
        let at = cur;
        for (const next of hops) {
          expect(directArcs(flags).some(([a, b]) => a === at && b === next), `${label}: hop ${stateName(at)} -> ${stateName(next)} is a direct arc`).toBe(true);
          at = next;
        }
        expect(at).toBe(target);
        expect(interiorOk([cur, ...hops]), `${label}: no saving-group state inside a path that was outside it`).toBe(true);
        expect(hops.length, `${label}: shortest`).toBe(cur === target ? 0 : shortestLength(flags, cur, target));
      }
    }
  });
});

describe('the kernel\'s combination transitions (vfio_main.c comment, every optional feature)', () => {
  const all = F.STOP_COPY | F.P2P | F.PRE_COPY;
  it.each([
    [PRE_COPY, STOP_COPY, [PRE_COPY_P2P, STOP_COPY]],
    [PRE_COPY, RESUMING, [RUNNING, RUNNING_P2P, STOP, RESUMING]],
    [PRE_COPY_P2P, RESUMING, [RUNNING_P2P, STOP, RESUMING]],
    [RESUMING, PRE_COPY, [STOP, RUNNING_P2P, RUNNING, PRE_COPY]],
    [RESUMING, RUNNING, [STOP, RUNNING_P2P, RUNNING]],
    [RUNNING, STOP_COPY, [RUNNING_P2P, STOP, STOP_COPY]],
    [RUNNING_P2P, PRE_COPY, [RUNNING, PRE_COPY]],
    [STOP_COPY, RUNNING, [STOP, RUNNING_P2P, RUNNING]],
  ] as const)('%s to %s', (from, to, expected) => {
    expect(statePath(all, from, to)).toEqual(expected);
  });

  it('without the optional states, the arcs through them are skipped', () => {
    expect(statePath(F.STOP_COPY, RUNNING, STOP_COPY)).toEqual([STOP, STOP_COPY]);
    expect(statePath(F.STOP_COPY, RESUMING, RUNNING)).toEqual([STOP, RUNNING]);
    expect(statePath(F.STOP_COPY | F.PRE_COPY, PRE_COPY, STOP_COPY)).toEqual([STOP_COPY]);
    expect(statePath(F.STOP_COPY | F.PRE_COPY, PRE_COPY, STOP)).toEqual([RUNNING, STOP]);
    expect(nextState(F.STOP_COPY | F.P2P, RUNNING, PRE_COPY)).toBe(EINVAL);
  });
});

describe('a device\'s state machine', () => {
  it('refuses STOP_COPY -> PRE_COPY (and PRE_COPY_P2P) with EINVAL and stays in STOP_COPY', () => {
    const fsm = new VfioDeviceFsm(F.STOP_COPY | F.P2P | F.PRE_COPY);
    expect(fsm.setState(STOP_COPY)).toBe(0);
    expect(fsm.setState(PRE_COPY)).toBe(EINVAL);
    expect(fsm.setState(PRE_COPY_P2P)).toBe(EINVAL);
    expect(fsm.state).toBe(STOP_COPY);
    expect(fsm.path).toEqual(['RUNNING', 'RUNNING_P2P', 'STOP', 'STOP_COPY']);
  });

  it('lands in ERROR when an arc fails; ERROR refuses every request; only a reset leaves it, to RUNNING', () => {
    const fsm = new VfioDeviceFsm(F.STOP_COPY | F.P2P, (from, to) => (from === RUNNING_P2P && to === STOP ? -5 : 0));
    expect(fsm.setState(STOP_COPY)).toBe(-5);
    expect(fsm.state).toBe(ERROR);
    for (const target of ALL_STATES) expect(fsm.setState(target), stateName(target)).toBe(target === ERROR ? 0 : EINVAL);
    expect(fsm.state).toBe(ERROR);
    expect(() => fsm.setStateOrThrow(RUNNING, 'dev')).toThrow(/dev: expected the device to go from ERROR to RUNNING, got errno 22 and the device is in ERROR/);
    fsm.reset();
    expect(fsm.state).toBe(RUNNING);
    expect(fsm.path).toEqual(['RUNNING', 'RUNNING_P2P', 'ERROR', 'RUNNING']);
  });

  it('opens the data stream entering PRE_COPY, PRE_COPY_P2P, STOP_COPY or RESUMING, keeps it inside the saving group, closes it leaving', () => {
    const events: string[] = [];
    const fsm = new VfioDeviceFsm(F.STOP_COPY | F.P2P | F.PRE_COPY, () => 0, (e, s) => events.push(`${e}@${stateName(s)}`));
    fsm.setState(PRE_COPY);
    fsm.setState(STOP_COPY); // through PRE_COPY_P2P: one session
    fsm.setState(STOP);
    fsm.setState(RESUMING);
    fsm.setState(RUNNING_P2P);
    fsm.setState(PRE_COPY_P2P);
    fsm.setState(RUNNING_P2P);
    expect(events).toEqual(['open@PRE_COPY', 'close@STOP', 'open@RESUMING', 'close@STOP', 'open@PRE_COPY_P2P', 'close@RUNNING_P2P']);
    const noPre = new VfioDeviceFsm(F.STOP_COPY);
    noPre.setState(STOP_COPY);
    expect(noPre.streamOpen).toBe(true);
    noPre.setState(STOP);
    expect(noPre.streamOpen).toBe(false);
  });
});
