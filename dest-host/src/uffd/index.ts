export * from './userfaultfd.js';
