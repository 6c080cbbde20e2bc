/** At most this much of a source's refusal (an HTTP body, a close reason) is shown. */
export const MAX_REFUSAL_CHARS = 600;

/** A source's refusal text made safe to print: printable ASCII on one line (no terminal escapes), bounded. */
export function printableRefusal(text: string): string {
  const line = text.replace(/\s+/g, ' ').replace(/[^\x20-\x7e]/g, '?').trim();
  return line.length > MAX_REFUSAL_CHARS ? `${line.slice(0, MAX_REFUSAL_CHARS - 1)}…` : line;
}
