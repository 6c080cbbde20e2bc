#!/usr/bin/env node
import { exitOnUsageError, tuneV8Tiering, runCli } from '@postcopy/shared';
import { warmUpSource } from './warm-up.js';
import { GuestImage } from './image.js';
import { readSecretFile, writeSecretFile } from './access.js';
import { startControlServer } from './control-server.js';
import { parseSourceOptions, sourceCommand } from './options.js';
import { SourceServer, generateToken } from './server.js';

// Before any worker starts (see v8-tiering.ts).
tuneV8Tiering();

async function main(): Promise<number> {
  const cmd = sourceCommand().exitOverride(exitOnUsageError);
  cmd.parse(process.argv);
  const options = parseSourceOptions(cmd.opts());
  let token = options.token ?? process.env.POSTCOPY_TOKEN;
  if (!token) {
    token = generateToken();
    process.stdout.write(`token ${token}\n`);
  }
  for (const warning of options.tlsWarnings) process.stderr.write(`source: warning: ${warning}\n`);
  // Once per migration (one source process migrates one guest): the untracked-DMA policy that will act.
  for (const warning of options.devices.warnings) process.stderr.write(`source: warning: ${warning}\n`);
  // Read before the image is built: a bad file is a usage error, at once.
  const inherited = options.resume && options.secretFile !== undefined ? readSecretFile(options.secretFile) : undefined;
  // The warm-up's scratch server runs while the image is built (by worker threads for a large guest), and closes before the migration's listens.
  const [image, warmUp] = await Promise.all([
    GuestImage.build(options.layout, options.image),
    options.warmUpRequests > 0 ? warmUpSource({ requests: options.warmUpRequests, pageSize: options.layout.pageSize, image: options.image }) : undefined,
  ]);
  const server = await SourceServer.listen(image, {
    host: options.host,
    port: options.port,
    token,
    handshakeTimeoutMs: options.handshakeTimeoutMs,
    link: options.link,
    migration: { maxPushBps: options.maxPushBps },
    resume: options.resume,
    resumeTimeoutMs: options.resumeTimeoutMs,
    maxConnections: options.maxConnections,
    keepaliveMs: options.keepaliveMs,
    ...(warmUp !== undefined ? { warmUp } : {}),
    unsafeUnboundChannels: options.unsafeUnboundChannels,
    mode: options.precopy.mode,
    ...options.precopy.controller,
    ...(options.devices.controller ? { devices: options.devices.controller } : {}),
    ...(options.tls ? { tls: options.tls } : {}),
    ...(inherited !== undefined ? { secret: inherited } : {}),
  });
  // Kept where a replacement source (--resume) can read it, before the URL is printed (launchers start the destination after that).
  if (options.secretFile !== undefined && !options.resume) writeSecretFile(options.secretFile, server.secret);
  // A line of its own, first: launchers read the URL from it.
  process.stdout.write(`listening ${server.url}\n`);
  if (options.resume) process.stderr.write(`source: restarted with --resume: waiting for the destination to resume the migration\n`);

  server.on('rejected', (label: string, err: Error) => {
    process.stderr.write(`source: rejected ${label}: ${err.message}\n`);
  });
  server.on('paused', (reason: string) => {
    process.stderr.write(`source: connection to the destination lost during postcopy (${reason}): paused, waiting up to ${options.resumeTimeoutMs} ms for it to resume\n`);
  });
  const control = options.precopy.controlPort === undefined ? undefined : await startControlServer(server.controller, options.precopy.controlPort);
  if (control) process.stderr.write(`control ${control.url}\n`);
  server.on('switchover', (postcopy: boolean, discardPages: number, reason: string) => {
    process.stderr.write(
      `source: switchover (${reason}): the guest stopped here; ${postcopy ? `postcopy begins, ${discardPages} pages discarded on the destination` : 'the last dirty pages went (stop-and-copy)'}\n`,
    );
  });
  server.on('running', (downtimeMs: number) => {
    process.stderr.write(`source: the guest runs on the destination: downtime ${downtimeMs.toFixed(1)} ms\n`);
  });
  server.on('keepalive-timeout', (silentMs: number) => {
    process.stderr.write(`source: the destination's main channel was silent for ${Math.round(silentMs)} ms (--keepalive-ms ${options.keepaliveMs}): cut it\n`);
  });
  server.on('resumed', (pagesMarkedUnsent: number) => {
    process.stderr.write(`source: resumed (${pagesMarkedUnsent} pages lost on the way marked unsent)\n`);
  });
  return await new Promise<number>((resolve) => {
    const end = (code: number): void => {
      control?.close();
      void server.close().then(() => resolve(code));
    };
    server.once('finished', () => {
      // The destination may still ask for page hashes (its digest differs):
      // wait for it to close the main channel, or 30 s at most.
      const timer = setTimeout(() => end(0), 30_000);
      server.once('destination-done', () => {
        clearTimeout(timer);
        end(0);
      });
    });
    server.once('destination-lost', (reason: string) => {
      process.stderr.write(`source: destination lost: ${reason}\n`);
      end(1);
    });
    // QEMU's cancelled: the connection went before the switchover, and the guest never left.
    server.once('cancelled', (reason: string) => {
      process.stderr.write(`source: migration cancelled: ${reason}\n`);
      end(1);
    });
    server.once('failed', (err: Error) => {
      process.stderr.write(`source: migration failed: ${err.message}\n`);
      // Give the error frame time to reach the destination.
      setTimeout(() => end(1), 100);
    });
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      process.once(signal, () => void server.close().then(() => resolve(130)));
    }
  });
}

runCli('source', main);
