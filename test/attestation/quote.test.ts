import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAkPublic, parseQuote, parseSignature, verifyQuote, type VerifyQuoteInput } from '../../src/attestation/index.js';
import { createAk, extendPcr, quote, startSwtpm, type AkKind, type Swtpm } from '../../src/fuzz/swtpm.js';
import { userErrorOf } from '../helpers/errors.js';

let dir: string;
let tpm: Swtpm;
const made: Record<AkKind, { ak: { context: string; public: Buffer }; input: VerifyQuoteInput }> = {} as never;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lamadist-quote-'));
  tpm = await startSwtpm(dir);
  await extendPcr(tpm, 7, randomBytes(32));
  await extendPcr(tpm, 10, randomBytes(32));
  for (const [i, kind] of (['ecdsa', 'rsassa', 'rsapss'] as const).entries()) {
    const ak = await createAk(tpm, dir, kind, 0x81010010 + i);
    const nonce = randomBytes(20);
    const q = await quote(tpm, dir, ak.context, nonce, [7, 10, 11], kind);
    made[kind] = { ak, input: { quote: q.quote, signature: q.signature, akPublic: ak.public, nonce, pcrs: q.pcrs } };
  }
}, 60_000);

afterAll(async () => {
  await tpm?.close();
  await fs.rm(dir, { recursive: true, force: true });
});

describe('TPM2 quotes made by tpm2_quote on swtpm', () => {
  it.each(['ecdsa', 'rsassa', 'rsapss'] as const)('a good %s quote verifies and decodes', (kind) => {
    const { input } = made[kind];
    const info = verifyQuote(input);
    expect(info.extraData.equals(input.nonce)).toBe(true);
    expect(info.selection).toEqual([{ hash: 0x000b, pcrs: [7, 10, 11] }]);
    expect(Object.keys(input.pcrs)).toEqual(['7', '10', '11']);
    expect(input.pcrs[11]?.equals(Buffer.alloc(32))).toBe(true);
    expect(input.pcrs[10]?.equals(Buffer.alloc(32))).toBe(false);
  });

  it('accepts the TPM2B forms of the quote and the key as well as the bare ones', () => {
    const { input, ak } = made.ecdsa;
    const size = Buffer.alloc(2);
    size.writeUInt16BE(input.quote.length);
    expect(() => verifyQuote({ ...input, quote: Buffer.concat([size, input.quote]) })).not.toThrow();
    const pub = parseAkPublic(ak.public);
    expect(() => verifyQuote({ ...input, akPublic: pub.tpmt })).not.toThrow();
    // The name is what tpm2_createak reports: nameAlg SHA-256 and the digest of the public area.
    expect(pub.name).toMatch(/^000b[0-9a-f]{64}$/);
  });

  it('a quote made with another nonce is refused: LAMA_E_ATTEST_NONCE', () => {
    const { input } = made.ecdsa;
    expect(userErrorOf(() => verifyQuote({ ...input, nonce: randomBytes(20) })).code).toBe('LAMA_E_ATTEST_NONCE');
    expect(userErrorOf(() => verifyQuote({ ...input, nonce: input.nonce.subarray(1) })).code).toBe('LAMA_E_ATTEST_NONCE');
  });

  it('a quote checked under another attestation key is refused: LAMA_E_ATTEST_SIGNATURE', () => {
    const e = userErrorOf(() => verifyQuote({ ...made.ecdsa.input, akPublic: made.rsassa.ak.public }));
    expect(e.code).toBe('LAMA_E_ATTEST_SIGNATURE');
    const ecc2 = userErrorOf(() => verifyQuote({ ...made.rsapss.input, akPublic: made.rsassa.ak.public }));
    expect(ecc2.code).toBe('LAMA_E_ATTEST_SIGNATURE');
  });

  it('a changed byte of the signed quote is refused: LAMA_E_ATTEST_SIGNATURE', () => {
    const { input } = made.rsassa;
    const bad = Buffer.from(input.quote);
    bad[bad.length - 1] = (bad[bad.length - 1] as number) ^ 1;
    expect(userErrorOf(() => verifyQuote({ ...input, quote: bad })).code).toBe('LAMA_E_ATTEST_SIGNATURE');
  });

  it('an altered PCR value is refused: LAMA_E_ATTEST_PCR_DIGEST', () => {
    const { input } = made.ecdsa;
    const pcrs = { ...input.pcrs, 11: randomBytes(32) };
    const e = userErrorOf(() => verifyQuote({ ...input, pcrs }));
    expect(e.code).toBe('LAMA_E_ATTEST_PCR_DIGEST');
  });

  it('a quote that does not cover a required PCR is refused: LAMA_E_ATTEST_SELECTION', async () => {
    const { ak } = made.ecdsa;
    const nonce = randomBytes(16);
    const q = await quote(tpm, dir, ak.context, nonce, [7, 10]);
    const input = { quote: q.quote, signature: q.signature, akPublic: ak.public, nonce, pcrs: q.pcrs };
    expect(() => verifyQuote(input)).not.toThrow();
    const e = userErrorOf(() => verifyQuote({ ...input, require: [7, 10, 11] }));
    expect(e.code).toBe('LAMA_E_ATTEST_SELECTION');
    expect(e.message).toContain('PCR 11');
    const { 10: _dropped, ...only7 } = q.pcrs;
    expect(userErrorOf(() => verifyQuote({ ...input, pcrs: only7 })).code).toBe('LAMA_E_ATTEST_SELECTION');
  });

  it('truncated quotes, signatures and keys are refused at every length: LAMA_E_ATTEST_TRUNCATED with the offset', () => {
    for (const kind of ['ecdsa', 'rsassa'] as const) {
      const { input, ak } = made[kind];
      for (let n = 0; n < input.quote.length; n++) {
        const e = userErrorOf(() => verifyQuote({ ...input, quote: input.quote.subarray(0, n) }));
        expect(e.code, `quote cut to ${n}`).toBe('LAMA_E_ATTEST_TRUNCATED');
        expect(e.where).toMatch(/^quote.* at byte \d+$/);
      }
      for (let n = 0; n < input.signature.length; n++) {
        expect(userErrorOf(() => verifyQuote({ ...input, signature: input.signature.subarray(0, n) })).code, `signature cut to ${n}`).toBe('LAMA_E_ATTEST_TRUNCATED');
      }
      const tpmt = parseAkPublic(ak.public).tpmt;
      for (let n = 0; n < tpmt.length; n++) {
        expect(userErrorOf(() => parseAkPublic(tpmt.subarray(0, n))).code, `key cut to ${n}`).toBe('LAMA_E_ATTEST_TRUNCATED');
      }
    }
    const e = userErrorOf(() => parseQuote(made.ecdsa.input.quote.subarray(0, 40)));
    // qualifiedSigner is a 34-byte name (nameAlg + SHA-256) starting at byte 8.
    expect(e.line()).toBe('quote at byte 8: qualifiedSigner needs 34 bytes, only 32 left [LAMA_E_ATTEST_TRUNCATED]');
  });

  it('refuses structures that are not what they claim, each with its code', () => {
    const { input } = made.ecdsa;
    const extra = Buffer.concat([input.quote, Buffer.from([0])]);
    expect(userErrorOf(() => parseQuote(extra)).code).toBe('LAMA_E_ATTEST_FORMAT');
    const notQuote = Buffer.from(input.quote);
    notQuote.writeUInt16BE(0x8017, 4);
    expect(userErrorOf(() => parseQuote(notQuote)).message).toMatch(/time structure, not a quote/);
    const sig = Buffer.from(input.signature);
    sig.writeUInt16BE(0x001c, 0);
    expect(userErrorOf(() => parseSignature(sig)).code).toBe('LAMA_E_ATTEST_FORMAT');
    // An EK is a decryption key, not a restricted signing key: refused as an AK.
    const tpmt = Buffer.from(parseAkPublic(made.rsassa.ak.public).tpmt);
    tpmt.writeUInt32BE(tpmt.readUInt32BE(4) & ~(1 << 18), 4);
    expect(userErrorOf(() => parseAkPublic(tpmt)).message).toMatch(/not an attestation key: .* lack sign/);
  });
});
