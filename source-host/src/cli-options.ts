/**
 * The source's option parsing, for the launcher behind `npm start`
 * (`@postcopy/source-host/options`): it must parse the image's, link's,
 * precopy's and devices' options without loading the server, the
 * controller and ws, since its start-up comes before the source even
 * starts, on the path of every run.
 */
export * from './options.js';
export * from './precopy-options.js';
export * from './devices/options.js';
