import { UserError, type ErrorCode } from '../errors.js';

/**
 * A cursor over untrusted bytes. Every read checks the bounds first and a short input becomes
 * LAMA_E_ATTEST_TRUNCATED naming the field and its byte offset, never a RangeError or a read past
 * the end. TPM structures are big-endian; the UEFI event log and the IMA list are little-endian.
 */
export class Reader {
  off = 0;

  constructor(
    readonly buf: Buffer,
    /** What is being parsed ("quote", "event log", …): the `where` of every error. */
    readonly where: string,
    private readonly le = false,
  ) {}

  get left(): number {
    return this.buf.length - this.off;
  }

  fail(code: ErrorCode, message: string, at = this.off): never {
    throw new UserError(code, message, { where: `${this.where} at byte ${at}` });
  }

  private need(n: number, field: string): number {
    if (n > this.left) this.fail('LAMA_E_ATTEST_TRUNCATED', `${field} needs ${n} bytes, only ${this.left} left`);
    const at = this.off;
    this.off += n;
    return at;
  }

  u8(field: string): number {
    return this.buf.readUInt8(this.need(1, field));
  }

  u16(field: string): number {
    const at = this.need(2, field);
    return this.le ? this.buf.readUInt16LE(at) : this.buf.readUInt16BE(at);
  }

  u32(field: string): number {
    const at = this.need(4, field);
    return this.le ? this.buf.readUInt32LE(at) : this.buf.readUInt32BE(at);
  }

  u64(field: string): bigint {
    const at = this.need(8, field);
    return this.le ? this.buf.readBigUInt64LE(at) : this.buf.readBigUInt64BE(at);
  }

  bytes(n: number, field: string): Buffer {
    const at = this.need(n, field);
    return this.buf.subarray(at, at + n);
  }

  /** A TPM2B: u16 size, then that many bytes. */
  tpm2b(field: string): Buffer {
    return this.bytes(this.u16(`${field} size`), field);
  }

  /** Refuse bytes after the structure: a signature covers exactly what was parsed. */
  end(what: string): void {
    if (this.left !== 0) this.fail('LAMA_E_ATTEST_FORMAT', `${this.left} unexpected bytes after the ${what}`);
  }
}
