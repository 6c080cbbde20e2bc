/**
 * The destination's option parsing and its memory-backend preflight, for
 * the launcher behind `npm start` (`@postcopy/dest-host/options`): it must
 * parse and check the run's command line without loading the run itself
 * (ws, the report, the status server), since its start-up comes before the
 * source even starts, on the path of every run.
 */
export * from './options.js';
export * from './preflight.js';
