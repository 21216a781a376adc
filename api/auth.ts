import { createHash, randomBytes } from 'node:crypto';
import { z } from 'zod';
import { CrmError } from '../engine/errors.js';

/**
 * API keys with scopes and, for senders, the sender groups they may use (docs/API.md). Keys are
 * configured as SHA-256 digests, so a config file or a log never holds a usable key; a request's key
 * is hashed and looked up.
 */

export const SCOPES = ['ingest', 'triggers', 'kpis', 'admin'] as const;
export type Scope = (typeof SCOPES)[number];

/** A sender group's name (the `group` of `subscribe_triggers`). */
export const GROUP_NAME = /^[\w.:-]{1,128}$/;
/** In a key's `groups`: every group. */
export const ANY_GROUP = '*';

export const ApiKeySchema = z.strictObject({
  name: z.string().min(1),
  sha256: z.string().regex(/^[0-9a-f]{64}$/, 'the SHA-256 hex digest of the key (64 lower-case hex digits)'),
  scopes: z.array(z.enum(SCOPES)).min(1),
  /**
   * The sender groups this key may subscribe to /v1/triggers as; `["*"]` = any. Required with the
   * `triggers` scope: a sender key without it would read and ack every other sender's triggers, and
   * guessing a group from the key's name would tie access to a label. An `admin` key without
   * `groups` may use any group; with `groups`, any key is held to them.
   */
  groups: z.array(z.string().refine((g) => g === ANY_GROUP || GROUP_NAME.test(g), 'a sender group name (1–128 letters, digits, _ . : -) or "*" for any group')).min(1).optional(),
}).superRefine((k, ctx) => {
  if (k.scopes.includes('triggers') && !k.scopes.includes('admin') && k.groups === undefined) {
    ctx.addIssue({
      code: 'custom', path: ['groups'],
      message: `key '${k.name}' has the 'triggers' scope but no groups: list the sender groups it may subscribe as, e.g. groups: ["kakao-sender"], or ["*"] for any group`,
    });
  }
});
export type ApiKey = z.infer<typeof ApiKeySchema>;

export function sha256Hex(s: string): string {
  return createHash('sha256').update(s).digest('hex');
}

/** A new random key and its config entry (the demo prints the key once). */
export function newApiKey(name: string, scopes: readonly Scope[], groups?: readonly string[]): { key: string; entry: ApiKey } {
  const key = `crm_${randomBytes(24).toString('base64url')}`;
  const entry: ApiKey = { name, sha256: sha256Hex(key), scopes: [...scopes] };
  if (groups !== undefined) entry.groups = [...groups];
  return { key, entry };
}

/** `groups`: the sender groups the key may use, null = any. */
export type AuthResult =
  | { ok: true; name: string; groups: readonly string[] | null }
  | { ok: false; status: 401 | 403; code: 'unauthorized' | 'forbidden' };

export class KeyRing {
  private readonly byHash = new Map<string, { name: string; scopes: readonly Scope[]; groups: readonly string[] | null }>();

  /** Throws CONFIG_INVALID naming each bad key and how to fix it. */
  constructor(keys: readonly ApiKey[]) {
    const problems: string[] = [];
    keys.forEach((k, i) => {
      const parsed = ApiKeySchema.safeParse(k);
      if (!parsed.success) {
        for (const issue of parsed.error.issues) problems.push(`  keys.${i}${issue.path.length > 0 ? '.' + issue.path.join('.') : ''}: ${issue.message}`);
        return;
      }
      const g = parsed.data.groups;
      this.byHash.set(parsed.data.sha256, { name: parsed.data.name, scopes: parsed.data.scopes, groups: g === undefined || g.includes(ANY_GROUP) ? null : g });
    });
    if (problems.length > 0) throw new CrmError('CONFIG_INVALID', `invalid API keys:\n${problems.join('\n')}`);
  }

  /** `key` ('' when the request has none) may use `scope`? admin may use every scope. */
  check(key: string, scope: Scope): AuthResult {
    if (key === '') return { ok: false, status: 401, code: 'unauthorized' };
    const k = this.byHash.get(sha256Hex(key));
    if (k === undefined) return { ok: false, status: 401, code: 'unauthorized' };
    if (!k.scopes.includes(scope) && !k.scopes.includes('admin')) return { ok: false, status: 403, code: 'forbidden' };
    return { ok: true, name: k.name, groups: k.groups };
  }
}

/** May a key whose `check` gave `groups` subscribe as `group`? */
export function mayUseGroup(groups: readonly string[] | null, group: string): boolean {
  return groups === null || groups.includes(group);
}

/**
 * The key of an HTTP request: `Authorization: Bearer` or `x-api-key`. A `key` query parameter is
 * refused on HTTP routes (`keyInQuery`): URLs end up in access logs, proxies and Referer headers.
 */
export function requestKey(authorization: string, xApiKey: string): string {
  if (authorization.startsWith('Bearer ')) return authorization.slice(7).trim();
  return xApiKey.trim();
}

/** The key of a WebSocket upgrade: the headers, else the `key` query parameter (browsers' WebSockets cannot set headers). */
export function upgradeKey(authorization: string, xApiKey: string, query: URLSearchParams): string {
  const k = requestKey(authorization, xApiKey);
  return k !== '' ? k : (query.get('key') ?? '');
}

/** The message of the 401 for an HTTP request that carries `?key=`. */
export const KEY_IN_QUERY_MESSAGE = 'API keys are not accepted in the URL on HTTP routes (it would end up in logs): send the header Authorization: Bearer <key> or x-api-key: <key>; ?key= is only for WebSocket upgrades';
