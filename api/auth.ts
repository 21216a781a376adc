import { createHash, randomBytes } from 'node:crypto';
import { z } from 'zod';

/**
 * API keys with scopes (docs/API.md). Keys are configured as SHA-256 digests, so a config file or a
 * log never holds a usable key; a request's key is hashed and looked up.
 */

export const SCOPES = ['ingest', 'triggers', 'kpis', 'admin'] as const;
export type Scope = (typeof SCOPES)[number];

export const ApiKeySchema = z.strictObject({
  name: z.string().min(1),
  sha256: z.string().regex(/^[0-9a-f]{64}$/, 'the SHA-256 hex digest of the key (64 lower-case hex digits)'),
  scopes: z.array(z.enum(SCOPES)).min(1),
});
export type ApiKey = z.infer<typeof ApiKeySchema>;

export function sha256Hex(s: string): string {
  return createHash('sha256').update(s).digest('hex');
}

/** A new random key and its config entry (the demo prints the key once). */
export function newApiKey(name: string, scopes: readonly Scope[]): { key: string; entry: ApiKey } {
  const key = `crm_${randomBytes(24).toString('base64url')}`;
  return { key, entry: { name, sha256: sha256Hex(key), scopes: [...scopes] } };
}

export type AuthResult = { ok: true; name: string } | { ok: false; status: 401 | 403; code: 'unauthorized' | 'forbidden' };

export class KeyRing {
  private readonly byHash = new Map<string, ApiKey>();

  constructor(keys: readonly ApiKey[]) {
    for (const k of keys) this.byHash.set(ApiKeySchema.parse(k).sha256, k);
  }

  /** `key` ('' when the request has none) may use `scope`? admin may use every scope. */
  check(key: string, scope: Scope): AuthResult {
    if (key === '') return { ok: false, status: 401, code: 'unauthorized' };
    const k = this.byHash.get(sha256Hex(key));
    if (k === undefined) return { ok: false, status: 401, code: 'unauthorized' };
    if (!k.scopes.includes(scope) && !k.scopes.includes('admin')) return { ok: false, status: 403, code: 'forbidden' };
    return { ok: true, name: k.name };
  }
}

/** The key of a request: `Authorization: Bearer`, `x-api-key`, or the `key` query parameter (browsers' WebSockets). */
export function requestKey(authorization: string, xApiKey: string, query: URLSearchParams): string {
  if (authorization.startsWith('Bearer ')) return authorization.slice(7).trim();
  if (xApiKey !== '') return xApiKey.trim();
  return query.get('key') ?? '';
}
