/**
 * Two independent 32-bit string hashes (over UTF-16 code units), seeded: the fingerprints of the
 * de-duplication index and the probes of the key filter. Together they make a 64-bit hash, or the
 * two bases of double hashing. Not cryptographic; inputs are ids, not adversarial secrets.
 */

/** FNV-1a, forward over the string. */
export function hashA(seed: number, s: string): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/** A MurmurHash2-style mix, backward over the string, with a final avalanche. */
export function hashB(seed: number, s: string): number {
  let h = 0x9747b28c ^ Math.imul(seed + 1, 0x5bd1e995) ^ s.length;
  for (let i = s.length - 1; i >= 0; i--) {
    h = Math.imul(h ^ s.charCodeAt(i), 0x5bd1e995);
    h ^= h >>> 15;
  }
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}
