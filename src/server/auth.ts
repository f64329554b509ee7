import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

/** A new random token (256 bits, URL-safe). Only its hash is ever stored. */
export function newToken(): string {
  return randomBytes(32).toString('base64url');
}

/** The stored form of a token: hex SHA-256. */
export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** Compare a presented token with a stored hash in constant time (both sides are fixed-length hashes). */
export function tokenMatches(presented: string, storedHash: string | null | undefined): boolean {
  if (!storedHash) return false;
  const a = Buffer.from(hashToken(presented), 'hex');
  const b = Buffer.from(storedHash, 'hex');
  return a.length === b.length && timingSafeEqual(a, b);
}

/** Parse `Authorization: <scheme> <token>`; undefined when absent or malformed. */
export function parseAuthorization(header: string | undefined): { scheme: string; token: string } | undefined {
  if (!header) return undefined;
  const m = /^\s*([A-Za-z]+)\s+(\S+)\s*$/.exec(header);
  if (!m || !m[1] || !m[2]) return undefined;
  return { scheme: m[1].toLowerCase(), token: m[2] };
}
