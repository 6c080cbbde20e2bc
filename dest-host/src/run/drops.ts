/**
 * Fault injection on the destination (`--inject`): cut every connection
 * once per threshold, of pages installed (drop@PAGES) or of pages installed
 * after the switchover (drop-postcopy@PAGES: demand-fetched or pushed).
 * Thresholds fire lowest first, one at a time, each once.
 */
import { COUNTER, type VmmState } from '../vmm/state.js';

export interface Drop {
  at: number;
  /** Counted in pages installed after the switchover. */
  postcopy: boolean;
}

export class DropInjector {
  private readonly drops: Drop[];
  private readonly fired = new Set<number>();

  constructor(drops: number[], postcopyDrops: number[] = []) {
    this.drops = [...drops.map((at) => ({ at, postcopy: false })), ...postcopyDrops.map((at) => ({ at, postcopy: true }))];
  }

  get asked(): number {
    return this.drops.length;
  }

  /** How many went off. */
  get injected(): number {
    return this.fired.size;
  }

  /** The drop due now, if any (marked as fired), with its reason; `switchedOver` says whether postcopy drops count yet. */
  due(vmm: VmmState, switchedOver: boolean): string | undefined {
    if (this.fired.size >= this.drops.length) return undefined;
    const installed = vmm.counter(COUNTER.INSTALLED);
    const afterSwitchover = vmm.counter(COUNTER.PAGES_DEMAND) + vmm.counter(COUNTER.PAGES_PUSHED);
    let which = -1;
    for (let i = 0; i < this.drops.length; i++) {
      const d = this.drops[i]!;
      if (this.fired.has(i) || (d.postcopy && !switchedOver)) continue;
      if ((d.postcopy ? afterSwitchover : installed) >= d.at && (which < 0 || d.at < this.drops[which]!.at)) which = i;
    }
    if (which < 0) return undefined;
    this.fired.add(which);
    const d = this.drops[which]!;
    return `injected ${d.postcopy ? 'drop-postcopy' : 'drop'}@${d.at} at ${d.postcopy ? `${afterSwitchover} pages installed after the switchover` : `${installed} pages installed`}`;
  }
}
