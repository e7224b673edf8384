/**
 * Preload of the writer process (atomic_writer.ts): the crash switch of fs_crash_switch.ts in
 * 'kill' mode, SIGKILL at the counted file-system call KILL_AT_FS_CALL (none when unset), put on
 * `globalThis[Symbol.for('tfjs-moe-lora.spec.crashSwitch')]` for the writer to arm.
 */
import { installCrashSwitch } from './fs_crash_switch.js';

const { crashSwitch } = installCrashSwitch();
crashSwitch.onCrash = 'kill';
crashSwitch.crashAt = process.env['KILL_AT_FS_CALL'] === undefined ? -1 : Number(process.env['KILL_AT_FS_CALL']);
(globalThis as Record<symbol, unknown>)[Symbol.for('tfjs-moe-lora.spec.crashSwitch')] = crashSwitch;
