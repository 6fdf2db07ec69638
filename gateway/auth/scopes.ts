/** What a token may do: each scope includes the ones before it (read < operate < admin). */
export const SCOPES = ["read", "operate", "admin"] as const;

/** One token's scope. */
export type Scope = (typeof SCOPES)[number];

/** Whether `have` includes `need`. */
export function scopeCovers(have: Scope, need: Scope): boolean {
  return SCOPES.indexOf(have) >= SCOPES.indexOf(need);
}

/** `s` as a scope, or null. */
export function parseScope(s: string): Scope | null {
  return (SCOPES as readonly string[]).includes(s) ? (s as Scope) : null;
}

/** Who made a request: a token's name and scope. */
export interface Principal {
  readonly name: string;
  readonly scope: Scope;
}
