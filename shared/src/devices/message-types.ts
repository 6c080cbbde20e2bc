/**
 * The device messages' type numbers (protocol version 5), apart from their
 * codec (wire.ts) so that protocol.ts, which the light `@postcopy/shared/core`
 * loads, stays light.
 */
export const DeviceMessageType = {
  DeviceSetup: 30,
  DevicesReady: 31,
  DeviceData: 32,
  DeviceInitDataSent: 33,
  SwitchoverAck: 34,
  DeviceEnd: 35,
} as const;
