import { execFileSync } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, statSync, writeSync } from 'node:fs';

/**
 * A real full disk for the fault tests: a small tmpfs mounted over a test directory (needs root;
 * where mounting is refused the caller skips with a message), and a filler file that takes its
 * space.
 */

/** Mounts a tmpfs of `size` (e.g. '1m') at `dir`; false (and the test skips) where that is not allowed. */
export function mountTmpfs(dir: string, size: string): boolean {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'pipe' });
    return true;
  } catch {
    return false;
  }
}

/** Unmounts it; an open file keeps it busy: then it is detached (lazy), never left behind. */
export function unmount(dir: string): void {
  try {
    execFileSync('umount', [dir], { stdio: 'pipe' });
  } catch {
    execFileSync('umount', ['-l', dir], { stdio: 'pipe' });
  }
}

/** Fills the file system of `filler` with that file (bounded: 64 MiB), then frees `leave` bytes of it. */
export function fillDisk(filler: string, leave: number): void {
  const fd = openSync(filler, 'w');
  const block = Buffer.alloc(64 << 10, 0x61);
  try {
    for (let i = 0; i < 1000; i++) writeSync(fd, block);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
  }
  // A partial write may have filled it to the byte: the file's size is what it holds.
  const size = statSync(filler).size;
  ftruncateSync(fd, Math.max(0, size - leave));
  closeSync(fd);
}
