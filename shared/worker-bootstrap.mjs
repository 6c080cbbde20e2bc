// Worker entry used when the code runs from TypeScript sources (tests): registers
// tsx in this thread, then loads the real entry named in argv.
import { register } from 'tsx/esm/api';

register();
const entry = process.argv[2];
process.argv.splice(2, 1);
await import(entry);
