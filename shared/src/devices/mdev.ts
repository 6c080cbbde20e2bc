/**
 * Mediated device types (DESIGN "Devices"), modeled on the sysfs layout
 * agreed for mdev in 2016 (Documentation/driver-api/vfio-mediated-device.rst):
 *
 *   /sys/class/mdev_bus/<parent>/mdev_supported_types/<type-id>/
 *       name, description, device_api, available_instances, create, devices/
 *
 * Writing a UUID to `create` makes an instance (/sys/bus/mdev/devices/<uuid>),
 * writing 1 to its `remove` destroys it. The types of one parent share its
 * resources: here one pool (a GPU's framebuffer, say) that each instance
 * takes its type's `cost` of, so `available_instances` of every type of the
 * parent falls as instances of any type are created. Each type also has a
 * `version`, which the destination checks against the source device's
 * before it accepts a migration (same type id, the same major version and a
 * minor version at least the source's).
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { UsageError, describe } from '../errors.js';
import { formatBytes, parseSize } from '../sizes.js';

export interface MdevType {
  /** The directory name under mdev_supported_types: `<driver>-<name>`. */
  id: string;
  name: string;
  description: string;
  /** What the instance looks like to the guest's driver (`vfio-pci`). */
  deviceApi: string;
  /** MAJOR.MINOR of the device's migration data. */
  version: string;
  /** Bytes of the parent's resource one instance takes. */
  cost: number;
}

export interface MdevParentSpec {
  /** The parent device (a PCI address such as 0000:00:02.0). */
  name: string;
  driver: string;
  /** The resource the types share. */
  resource: { name: string; total: number };
  types: MdevType[];
}

export interface MdevCatalog {
  parents: MdevParentSpec[];
}

const MiB = 1024 * 1024;

/** The built-in parent: a GPU whose 1 GiB of framebuffer is split as 128M, 256M, 512M and 1G instances. */
export const DEFAULT_MDEV_CATALOG: MdevCatalog = {
  parents: [
    {
      name: '0000:00:02.0',
      driver: 'mgpu',
      resource: { name: 'framebuffer', total: 1024 * MiB },
      types: [128, 256, 512, 1024].map((mib) => {
        const size = mib === 1024 ? '1G' : `${mib}M`;
        return {
          id: `mgpu-${size}`,
          name: `MGPU-${size}`,
          description: `${formatBytes(mib * MiB)} of framebuffer, 1 display`,
          deviceApi: 'vfio-pci',
          version: '1.0',
          cost: mib * MiB,
        };
      }),
    },
  ],
};

/** The type a device without `type` gets: the smallest of the first parent. */
export function defaultMdevType(catalog: MdevCatalog): string {
  const types = catalog.parents[0]?.types ?? [];
  const smallest = [...types].sort((a, b) => a.cost - b.cost)[0];
  if (!smallest) throw new UsageError('--mdev-types: expected at least one parent with one type, got none');
  return smallest.id;
}

export function mdevTypeIds(catalog: MdevCatalog): string[] {
  return catalog.parents.flatMap((p) => p.types.map((t) => t.id));
}

const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const VERSION_PATTERN = /^(\d{1,4})\.(\d{1,4})$/;
const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * Whether a destination type of version `dest` can load the data of a
 * source device of version `source`: the same major version, and a minor
 * version at least the source's (a newer driver reads older data).
 */
export function versionCompatible(source: string, dest: string): boolean {
  const s = VERSION_PATTERN.exec(source);
  const d = VERSION_PATTERN.exec(dest);
  if (!s || !d) return false;
  return s[1] === d[1] && Number(d[2]) >= Number(s[2]);
}

/** Reads `--mdev-types FILE.json` (throws UsageError naming the file and what is wrong). */
export function readMdevCatalog(path: string): MdevCatalog {
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new UsageError(`--mdev-types: expected a readable JSON file, got ${JSON.stringify(path)} (${e.code ?? e.message})`);
  }
  return parseMdevCatalog(json, `--mdev-types ${path}`);
}

/** Checks a catalog's JSON: {"parents": [{name, driver, resource: {name, total}, types: [{id, name, description, device_api, version, cost}]}]}. */
export function parseMdevCatalog(json: unknown, where: string): MdevCatalog {
  const obj = (v: unknown, at: string): Record<string, unknown> => {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new UsageError(`${at}: expected an object, got ${describe(v)}`);
    return v as Record<string, unknown>;
  };
  const str = (v: unknown, at: string): string => {
    if (typeof v !== 'string' || v === '' || v.length > 256) throw new UsageError(`${at}: expected a string of 1 to 256 characters, got ${describe(v)}`);
    return v;
  };
  const size = (v: unknown, at: string): number => {
    const bytes = typeof v === 'number' ? v : typeof v === 'string' ? parseSize(at, v) : NaN;
    if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new UsageError(`${at}: expected a positive size such as 128MiB, got ${describe(v)}`);
    return bytes;
  };
  const root = obj(json, where);
  if (!Array.isArray(root.parents) || root.parents.length === 0) throw new UsageError(`${where}: expected "parents": an array of at least one parent, got ${describe(root.parents)}`);
  const ids = new Set<string>();
  const parents = root.parents.map((p: unknown, i): MdevParentSpec => {
    const at = `${where}: parents[${i}]`;
    const parent = obj(p, at);
    const resource = obj(parent.resource, `${at}.resource`);
    if (!Array.isArray(parent.types) || parent.types.length === 0) throw new UsageError(`${at}.types: expected an array of at least one type, got ${describe(parent.types)}`);
    const types = parent.types.map((t: unknown, j): MdevType => {
      const tat = `${at}.types[${j}]`;
      const type = obj(t, tat);
      const id = str(type.id, `${tat}.id`);
      if (!ID_PATTERN.test(id)) throw new UsageError(`${tat}.id: expected a type id of letters, digits, _ . : or - (such as mgpu-256M), got ${describe(id)}`);
      if (ids.has(id)) throw new UsageError(`${tat}.id: expected each type id once across the parents, got ${id} again`);
      ids.add(id);
      const version = str(type.version, `${tat}.version`);
      if (!VERSION_PATTERN.test(version)) throw new UsageError(`${tat}.version: expected MAJOR.MINOR such as 1.0, got ${describe(version)}`);
      return {
        id,
        name: str(type.name ?? id, `${tat}.name`),
        description: str(type.description ?? id, `${tat}.description`),
        deviceApi: str(type.device_api ?? 'vfio-pci', `${tat}.device_api`),
        version,
        cost: size(type.cost, `${tat}.cost`),
      };
    });
    return { name: str(parent.name, `${at}.name`), driver: str(parent.driver ?? 'mdev', `${at}.driver`), resource: { name: str(resource.name ?? 'resource', `${at}.resource.name`), total: size(resource.total, `${at}.resource.total`) }, types };
  });
  return { parents };
}

export interface MdevInstance {
  uuid: string;
  type: string;
  parent: string;
}

/** Why a create failed (EINVAL: a bad UUID or an unknown type; EEXIST: the UUID is taken; EDQUOT: no instance available). */
export type CreateResult = { ok: true; instance: MdevInstance } | { ok: false; errno: 'EINVAL' | 'EEXIST' | 'EDQUOT'; message: string };

/**
 * The mdev parents of one host and their instances, as sysfs shows them.
 * Creating takes the type's cost from its parent's pool; removing gives it
 * back.
 */
export class MdevHost {
  private readonly free = new Map<string, number>();
  private readonly instances = new Map<string, MdevInstance>();
  /** Every create and remove, in order (for tests and the report). */
  readonly log: string[] = [];

  constructor(readonly catalog: MdevCatalog = DEFAULT_MDEV_CATALOG) {
    for (const p of catalog.parents) this.free.set(p.name, p.resource.total);
  }

  /** The type and its parent, or undefined. */
  find(typeId: string): { parent: MdevParentSpec; type: MdevType } | undefined {
    for (const parent of this.catalog.parents) {
      const type = parent.types.find((t) => t.id === typeId);
      if (type) return { parent, type };
    }
    return undefined;
  }

  /** mdev_supported_types/<type>/available_instances. */
  availableInstances(typeId: string): number {
    const found = this.find(typeId);
    if (!found) return 0;
    return Math.floor(this.free.get(found.parent.name)! / found.type.cost);
  }

  /** What the type's parent has left, for messages: `512MiB of 1GiB framebuffer free: mgpu-128M 4, mgpu-256M 2, ...`. */
  describeAvailability(typeId: string): string {
    const found = this.find(typeId);
    if (!found) return `no parent offers it; the types here are ${mdevTypeIds(this.catalog).join(', ')}`;
    const { parent } = found;
    const counts = parent.types.map((t) => `${t.id} ${this.availableInstances(t.id)}`).join(', ');
    return `parent ${parent.name} has ${formatBytes(this.free.get(parent.name)!)} of ${formatBytes(parent.resource.total)} ${parent.resource.name} free; available_instances: ${counts}`;
  }

  /** echo UUID > mdev_supported_types/<type>/create */
  create(typeId: string, uuid: string = randomUUID()): CreateResult {
    if (!UUID_PATTERN.test(uuid)) return { ok: false, errno: 'EINVAL', message: `expected a UUID such as ${randomUUID()}, got ${JSON.stringify(uuid)}` };
    const found = this.find(typeId);
    if (!found) return { ok: false, errno: 'EINVAL', message: `type ${typeId}: ${this.describeAvailability(typeId)}` };
    if (this.instances.has(uuid)) return { ok: false, errno: 'EEXIST', message: `an instance ${uuid} exists already` };
    if (this.availableInstances(typeId) < 1) {
      return { ok: false, errno: 'EDQUOT', message: `type ${typeId} (${formatBytes(found.type.cost)} of ${found.parent.resource.name}) has available_instances 0: ${this.describeAvailability(typeId)}` };
    }
    this.free.set(found.parent.name, this.free.get(found.parent.name)! - found.type.cost);
    const instance = { uuid, type: typeId, parent: found.parent.name };
    this.instances.set(uuid, instance);
    this.log.push(`create ${typeId} ${uuid}`);
    return { ok: true, instance };
  }

  /** echo 1 > /sys/bus/mdev/devices/<uuid>/remove; false if there is no such instance. */
  remove(uuid: string): boolean {
    const instance = this.instances.get(uuid);
    if (!instance) return false;
    const found = this.find(instance.type)!;
    this.free.set(found.parent.name, this.free.get(found.parent.name)! + found.type.cost);
    this.instances.delete(uuid);
    this.log.push(`remove ${instance.type} ${uuid}`);
    return true;
  }

  /** mdev_supported_types/<type>/devices/: the instances of a type. */
  devicesOf(typeId: string): MdevInstance[] {
    return [...this.instances.values()].filter((i) => i.type === typeId);
  }

  get instanceCount(): number {
    return this.instances.size;
  }

  /** The sysfs tree with the current counts (`npm run dest -- --list-mdev-types`). */
  formatTree(): string {
    const lines: string[] = [];
    for (const parent of this.catalog.parents) {
      lines.push(
        `/sys/class/mdev_bus/${parent.name}/mdev_supported_types/  (${parent.driver}: ${formatBytes(parent.resource.total)} of ${parent.resource.name}, ${formatBytes(this.free.get(parent.name)!)} free, shared by every type)`,
      );
      parent.types.forEach((t, i) => {
        const last = i === parent.types.length - 1;
        const branch = last ? '└── ' : '├── ';
        const stem = last ? '    ' : '│   ';
        const devices = this.devicesOf(t.id);
        lines.push(`${branch}${t.id}/`);
        const rows: [string, string][] = [
          ['name', t.name],
          ['description', t.description],
          ['device_api', t.deviceApi],
          ['version', `${t.version} (migration data)`],
          ['available_instances', String(this.availableInstances(t.id))],
          ['create', `(write a UUID; each instance takes ${formatBytes(t.cost)} of ${parent.resource.name})`],
          ['devices/', devices.length === 0 ? '(none)' : devices.map((d) => d.uuid).join(' ')],
        ];
        rows.forEach(([k, v], j) => lines.push(`${stem}${j === rows.length - 1 ? '└── ' : '├── '}${k.padEnd(20)} ${v}`));
      });
    }
    return lines.join('\n');
  }
}
