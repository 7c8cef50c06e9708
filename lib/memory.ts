/**
 * Process memory measurements.
 *
 * @module
 */

/**
 * Peak resident set size of this process in bytes (VmHWM from `/proc/self/status`), or null
 * where that file is missing (non-Linux) or unreadable (no --allow-read).
 */
export function peakRssBytes(): number | null {
  try {
    const status = Deno.readTextFileSync("/proc/self/status");
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(status);
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}
