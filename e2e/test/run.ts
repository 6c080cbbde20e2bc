import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import type { Report } from '@postcopy/shared';

export const LAUNCHER = fileURLToPath(new URL('../dist/cli.js', import.meta.url));
export const SOURCE = fileURLToPath(new URL('../../source-host/dist/cli.js', import.meta.url));
export const DEST = fileURLToPath(new URL('../../dest-host/dist/cli.js', import.meta.url));

export interface ProcessResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a built CLI as a real process; kills it (and fails) after `timeoutMs`. */
export function runNode(script: string, args: string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<ProcessResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [script, ...args], {
      env: { ...process.env, ...options.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${script} ${args.join(' ')} did not finish within ${options.timeoutMs ?? 45_000} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, options.timeoutMs ?? 45_000);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

export interface MigrationResult extends ProcessResult {
  report: Report | undefined;
}

/**
 * The warm-up tests' runs get unless they say otherwise: 64 pages a vCPU
 * still runs every thread's warm-up, but the default 1024 costs a tiny
 * test's run about 0.6 s more (2 vCPUs x 4 MiB: 2.15-2.71 s against
 * 1.67-2.06 s), which the suite pays hundreds of times. The warm-up tests
 * run the default too.
 */
export const TEST_WARM_UP = ['--warm-up-pages', '64'];

/**
 * The source's warm-up in tests' runs (source-host's warm-up.ts): 64
 * requests still run it, the default 2048 costs a source's start about
 * 0.5 s. For the source's command and `npm start`'s (the destination's
 * command does not take it).
 */
export const TEST_SOURCE_WARM_UP = ['--warm-up-requests', '64'];

/**
 * `npm start -- ARGS --json FILE`: a full two-process migration; returns
 * its exit and report. {@link TEST_WARM_UP} unless ARGS set --warm-up-pages
 * or `defaults` asks for the warm-up a user gets.
 */
export async function migrate(args: string[], timeoutMs = 45_000, { defaults = false } = {}): Promise<MigrationResult> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-e2e-'));
  const json = join(dir, 'report.json');
  const warmUp = [
    ...(defaults || args.includes('--warm-up-pages') ? [] : TEST_WARM_UP),
    ...(defaults || args.includes('--warm-up-requests') ? [] : TEST_SOURCE_WARM_UP),
  ];
  try {
    const result = await runNode(LAUNCHER, [...warmUp, ...args, '--json', json], { timeoutMs });
    const report = existsSync(json) ? (JSON.parse(readFileSync(json, 'utf8')) as Report) : undefined;
    return { ...result, report };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The checks every successful run must pass, asserted one by one for a readable failure. */
export function failedChecks(report: Report): string[] {
  return report.checks.filter((c) => !c.ok).map((c) => `${c.name}: ${c.detail}`);
}

/** Rejects with `what` if `promise` takes longer than `ms`. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** What every verified run must show: exit 0, every check passed, equal digests, each request answered, each page sent once. */
export function expectVerified(result: { code: number | null; stdout: string; stderr: string; report: Report | undefined }, context = ''): Report {
  expect(result.code, `${result.stderr}\n${result.stdout.slice(-3000)}\n${context}`).toBe(0);
  const report = result.report!;
  expect(report).toBeDefined();
  expect(failedChecks(report)).toEqual([]);
  expect(report.verified).toBe(true);
  expect(report.digest.dest).toBe(report.digest.source);
  expect(report.counters.replies).toBe(report.counters.requests);
  expect(report.counters.pagesInstalled).toBe(report.counters.pagesSentBySource);
  expect(result.stdout).toContain('verified: true');
  return report;
}
