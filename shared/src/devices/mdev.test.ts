/**
 * Mediated device types: available_instances accounting across the types
 * of one parent (they share its resource), create and destroy by UUID, the
 * version compatibility check, a catalog file, and the sysfs tree.
 */
import { describe, expect, it } from 'vitest';
import { DEFAULT_MDEV_CATALOG, MdevHost, defaultMdevType, parseMdevCatalog, versionCompatible } from './mdev.js';

const counts = (host: MdevHost): Record<string, number> => Object.fromEntries(['mgpu-128M', 'mgpu-256M', 'mgpu-512M', 'mgpu-1G'].map((t) => [t, host.availableInstances(t)]));

describe('the built-in parent (1 GiB of framebuffer shared by four types)', () => {
  it('counts available_instances across types: an instance of any type lowers every type\'s count', () => {
    const host = new MdevHost();
    expect(counts(host)).toEqual({ 'mgpu-128M': 8, 'mgpu-256M': 4, 'mgpu-512M': 2, 'mgpu-1G': 1 });
    const a = host.create('mgpu-256M');
    expect(a.ok).toBe(true);
    expect(counts(host)).toEqual({ 'mgpu-128M': 6, 'mgpu-256M': 3, 'mgpu-512M': 1, 'mgpu-1G': 0 });
    const b = host.create('mgpu-512M');
    expect(counts(host)).toEqual({ 'mgpu-128M': 2, 'mgpu-256M': 1, 'mgpu-512M': 0, 'mgpu-1G': 0 });
    const refused = host.create('mgpu-512M');
    expect(refused).toMatchObject({ ok: false, errno: 'EDQUOT' });
    expect(!refused.ok && refused.message).toMatch(/type mgpu-512M \(512MiB of framebuffer\) has available_instances 0: parent 0000:00:02.0 has 256MiB of 1GiB framebuffer free; available_instances: mgpu-128M 2, mgpu-256M 1, mgpu-512M 0, mgpu-1G 0/);
    expect(host.devicesOf('mgpu-256M').map((i) => i.uuid)).toEqual([a.ok ? a.instance.uuid : '']);
    // Destroy: the resource comes back to every type.
    expect(host.remove(a.ok ? a.instance.uuid : '')).toBe(true);
    expect(host.remove(b.ok ? b.instance.uuid : '')).toBe(true);
    expect(host.remove(b.ok ? b.instance.uuid : '')).toBe(false);
    expect(counts(host)).toEqual({ 'mgpu-128M': 8, 'mgpu-256M': 4, 'mgpu-512M': 2, 'mgpu-1G': 1 });
    expect(host.instanceCount).toBe(0);
    expect(host.log.map((l) => l.split(' ')[0])).toEqual(['create', 'create', 'remove', 'remove']);
  });

  it('creates by UUID: a bad UUID is EINVAL, one taken is EEXIST, an unknown type names what there is', () => {
    const host = new MdevHost();
    const uuid = '83b8f4f2-509f-382f-3c1e-e6bfe0fa1001';
    expect(host.create('mgpu-128M', uuid)).toMatchObject({ ok: true, instance: { uuid, type: 'mgpu-128M', parent: '0000:00:02.0' } });
    expect(host.create('mgpu-128M', uuid)).toMatchObject({ ok: false, errno: 'EEXIST' });
    expect(host.create('mgpu-128M', 'not-a-uuid')).toMatchObject({ ok: false, errno: 'EINVAL' });
    const unknown = host.create('vgpu-1');
    expect(!unknown.ok && unknown.message).toMatch(/no parent offers it; the types here are mgpu-128M, mgpu-256M, mgpu-512M, mgpu-1G/);
  });

  it('prints the sysfs tree with the current counts and instances', () => {
    const host = new MdevHost();
    const made = host.create('mgpu-1G', '83b8f4f2-509f-382f-3c1e-e6bfe0fa1001');
    expect(made.ok).toBe(true);
    const tree = host.formatTree();
    expect(tree).toMatch(/^\/sys\/class\/mdev_bus\/0000:00:02.0\/mdev_supported_types\/ {2}\(mgpu: 1GiB of framebuffer, 0B free, shared by every type\)/);
    expect(tree).toMatch(/└── mgpu-1G\/\n {4}├── name {17}MGPU-1G\n/);
    expect(tree).toMatch(/available_instances {2}0/);
    expect(tree).toContain('devices/             83b8f4f2-509f-382f-3c1e-e6bfe0fa1001');
    expect(defaultMdevType(DEFAULT_MDEV_CATALOG)).toBe('mgpu-128M');
  });
});

describe('compatibility and catalogs', () => {
  it('needs the same major version and a minor version at least the source\'s', () => {
    expect(versionCompatible('1.0', '1.0')).toBe(true);
    expect(versionCompatible('1.2', '1.3')).toBe(true);
    expect(versionCompatible('1.3', '1.2')).toBe(false);
    expect(versionCompatible('1.0', '2.0')).toBe(false);
    expect(versionCompatible('1', '1.0')).toBe(false);
  });

  it('reads a catalog of its own and refuses a bad one, naming the field', () => {
    const catalog = parseMdevCatalog(
      { parents: [{ name: '0000:65:00.0', driver: 'nvgpu', resource: { name: 'vram', total: '4GiB' }, types: [{ id: 'nvgpu-2Q', version: '2.1', cost: '2GiB' }, { id: 'nvgpu-1Q', version: '2.1', cost: '1GiB' }] }] },
      'test',
    );
    const host = new MdevHost(catalog);
    expect(host.availableInstances('nvgpu-1Q')).toBe(4);
    host.create('nvgpu-2Q');
    expect(host.availableInstances('nvgpu-1Q')).toBe(2);
    expect(defaultMdevType(catalog)).toBe('nvgpu-1Q');
    expect(() => parseMdevCatalog({ parents: [] }, 'f.json')).toThrow(/f.json: expected "parents": an array of at least one parent/);
    expect(() => parseMdevCatalog({ parents: [{ name: 'p', resource: { total: '1GiB' }, types: [{ id: 'a', version: 'one', cost: '1MiB' }] }] }, 'f.json')).toThrow(/types\[0\].version: expected MAJOR.MINOR such as 1.0/);
    expect(() => parseMdevCatalog({ parents: [{ name: 'p', resource: { total: '1GiB' }, types: [{ id: 'a', version: '1.0', cost: '1MiB' }, { id: 'a', version: '1.0', cost: '1MiB' }] }] }, 'f.json')).toThrow(/expected each type id once across the parents, got a again/);
  });
});
