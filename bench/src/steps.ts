/**
 * A bench is a list of steps, run one after another: `npm run bench` and the
 * sections' own CLIs (backends-cli.ts, devices-cli.ts) run theirs the same way.
 */
import { settle } from './settle.js';

/** One measurement: what it measures, and a run that resolves with its figures as a line of text. */
export interface Step {
  label: string;
  run: () => Promise<string>;
}

/**
 * Runs the steps in order, telling `progress` of each as it starts and ends
 * (with its figures and time), and settles this process's garbage after each
 * before the next is timed (settle.ts).
 */
export async function runSteps(steps: readonly Step[], progress: (line: string) => void): Promise<void> {
  for (const [i, step] of steps.entries()) {
    const prefix = `[${i + 1}/${steps.length}] ${step.label}`;
    progress(`${prefix} ...`);
    const started = performance.now();
    const outcome = await step.run();
    progress(`${prefix}: ${outcome} (${((performance.now() - started) / 1000).toFixed(1)} s)`);
    settle();
  }
}
