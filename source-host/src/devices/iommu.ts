/**
 * A container: one IOMMU domain for the DMA of every device in it (a VFIO
 * container, an iommufd HWPT). With dirty tracking enabled
 * (IOMMU_HWPT_SET_DIRTY_TRACKING) the IOMMU marks each page a device writes
 * through the domain in one dirty bitmap for the whole domain, read and
 * cleared by IOMMU_HWPT_GET_DIRTY_BITMAP (clearing unless
 * IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR): include/uapi/linux/iommufd.h. The
 * IOMMU cannot tell the devices apart, and the bitmap covers the domain's
 * whole IOVA space (here the guest), so a read costs the guest's page count
 * in bits whatever the devices touched.
 *
 * A domain supports dirty tracking only when every device attached to it
 * sits behind an IOMMU that can do it (iommufd refuses to attach a device
 * whose IOMMU lacks IOMMU_CAP_DIRTY_TRACKING to a dirty-tracking HWPT); a
 * device that logs its own DMA is taken to sit behind one that can.
 */
import { IOMMU_CONTROL } from './hardware.js';

export const ENOTTY = -25;
export const EOPNOTSUPP = -95;
export const EINVAL = -22;

export interface BitmapRead {
  /** Bytes of bitmap read. */
  bitmapBytes: number;
  /** Guest pages found dirty. */
  pagesDirty: number;
}

export class IommuContainer {
  readonly control = new SharedArrayBuffer(IOMMU_CONTROL.LENGTH * 4);
  readonly bitmap: SharedArrayBuffer;
  private readonly ctl: Int32Array;
  private readonly bits: Int32Array;
  /** Names of the devices attached. */
  readonly devices: string[] = [];

  constructor(
    readonly name: string,
    readonly totalPages: number,
    /** Whether the domain can track dirty pages at all. */
    readonly supportsDirtyTracking: boolean,
  ) {
    this.bitmap = new SharedArrayBuffer(Math.ceil(totalPages / 32) * 4);
    this.ctl = new Int32Array(this.control);
    this.bits = new Int32Array(this.bitmap);
  }

  get dirtyTracking(): boolean {
    return Atomics.load(this.ctl, IOMMU_CONTROL.DIRTY_ON) === 1;
  }

  /** IOMMU_HWPT_SET_DIRTY_TRACKING: 0, or -EOPNOTSUPP when the domain cannot. Enabling clears the bitmap. */
  setDirtyTracking(enable: boolean): number {
    if (!this.supportsDirtyTracking) return EOPNOTSUPP;
    if (enable && !this.dirtyTracking) for (let i = 0; i < this.bits.length; i++) Atomics.store(this.bits, i, 0);
    Atomics.store(this.ctl, IOMMU_CONTROL.DIRTY_ON, enable ? 1 : 0);
    return 0;
  }

  /**
   * IOMMU_HWPT_GET_DIRTY_BITMAP over pages [first, first + count): ORs the
   * dirty pages into `into` (one bit a guest page) and, unless `noClear`,
   * clears them here, each word with one atomic exchange (so a bit a DMA sets
   * meanwhile is in this read or the next). -EINVAL when tracking is off.
   */
  getDirtyBitmap(first: number, count: number, into: Int32Array, noClear = false): BitmapRead | number {
    if (!this.dirtyTracking) return EINVAL;
    let pagesDirty = 0;
    const end = first + count;
    for (let w = first >>> 5; w << 5 < end; w++) {
      const lo = Math.max(first, w << 5);
      const hi = Math.min(end, (w + 1) << 5);
      const mask = hi - lo === 32 ? -1 : (((1 << (hi - lo)) - 1) << (lo & 31)) | 0;
      const old = noClear ? Atomics.load(this.bits, w) : Atomics.and(this.bits, w, ~mask);
      const found = old & mask;
      if (found === 0) continue;
      const before = into[w]!;
      into[w] = before | found;
      pagesDirty += popcount32(found);
    }
    return { bitmapBytes: Math.ceil(count / 8), pagesDirty };
  }
}

export function popcount32(w: number): number {
  let v = w >>> 0;
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24) & 0xff;
}
