/**
 * File-system questions the front end asks before it hands a path to the engine.
 * @module
 */

/** Whether `path` is a directory (false when it does not exist or cannot be read). */
export function isDirectory(path: string): boolean {
  try {
    return Deno.statSync(path).isDirectory;
  } catch {
    return false;
  }
}

/** Whether `path` is a regular file (false when it does not exist or cannot be read). */
export function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

/** Whether anything (a file, folder, link, FIFO, …) is at `path`. */
export function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}
