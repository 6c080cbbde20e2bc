/**
 * What the bench says of the machine besides its CPUs: whether it is a
 * virtual machine whose freed memory goes back to its host.
 *
 * A guest kernel with a virtio-balloon that offers free page reporting
 * (VIRTIO_BALLOON_F_REPORTING, feature bit 5 in
 * include/uapi/linux/virtio_balloon.h) hands free pages of pageblock order
 * to the host some two seconds after they were freed (mm/page_reporting.c,
 * PAGE_REPORTING_DELAY), and the host drops their backing. The next first
 * touch of such memory costs a fault in the host as well as in the guest.
 * Every figure bound by first touches (the push, whose installs write fresh
 * guest memory; the large guest; the source's image build) then depends on
 * how long the memory it gets had been free: on the 2-core development VM,
 * touching 6 GiB right after another 6 GiB was freed ran at 1052-1118
 * MiB/s, and 10 s later at 357-446.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/** VIRTIO_BALLOON_F_REPORTING: the bit of the device's features. */
export const VIRTIO_BALLOON_F_REPORTING = 5;

const BALLOON_DRIVER = '/sys/bus/virtio/drivers/virtio_balloon';

/**
 * Whether a virtio-balloon of this machine reports free pages to its host:
 * true or false on Linux, null where it cannot be told (no sysfs). A
 * device's `features` file is one '0' or '1' per feature bit, bit 0 first
 * (drivers/virtio/virtio.c, features_show).
 */
export function freePageReporting(driverDir = BALLOON_DRIVER): boolean | null {
  let devices: string[];
  try {
    devices = readdirSync(driverDir).filter((name) => name.startsWith('virtio'));
  } catch (err) {
    // No balloon driver bound: a Linux machine without one reports nothing.
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return process.platform === 'linux' ? false : null;
    return null;
  }
  for (const device of devices) {
    try {
      const bits = readFileSync(join(driverDir, device, 'features'), 'utf8').trim();
      if (bits[VIRTIO_BALLOON_F_REPORTING] === '1') return true;
    } catch {
      // a device that went away: the others decide
    }
  }
  return false;
}
