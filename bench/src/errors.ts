/**
 * The bench's own errors, each with a stable `code` (the convention of
 * shared/src/errors.ts, whose classes the bench also throws: a content
 * mismatch is a `CheckError('content', ...)`).
 */
import { PostcopyError } from '@postcopy/shared';

/** No C compiler to build a native floor with. */
export class NoCompilerError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_NO_COMPILER', message);
  }
}

/** The C compiler ran and failed. */
export class NativeBuildError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_NATIVE_BUILD', message);
  }
}

/** A floor's process failed, or said something that is not its result. */
export class FloorRunError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_FLOOR_RUN', message);
  }
}

/** A floor took longer than its timeout; its processes were killed. */
export class FloorTimeoutError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_FLOOR_TIMEOUT', message);
  }
}

/** This machine will not give the native floor a userfaultfd (permissions, kernel). */
export class UffdUnavailableError extends PostcopyError {
  constructor(message: string) {
    super('ERR_POSTCOPY_UFFD_UNAVAILABLE', message);
  }
}
