import { createHash } from 'node:crypto';

/**
 * A device simulator written from the hawkBit DDI API description (base poll with `_links`,
 * configData PUT, deploymentBase with chunks and artifacts, feedback with status.execution and
 * status.result.finished, cancelAction, artifact download with HTTP ranges) — not from LamaDist's
 * server code. Every success of the protocol is HTTP 200, as rauc-hawkbit-updater requires, so any
 * other status is an error here.
 */

export interface DdiLinks {
  deploymentBase?: { href: string };
  configData?: { href: string };
  cancelAction?: { href: string };
}

export interface DdiArtifact {
  filename: string;
  size: number;
  hashes: { sha1: string; md5: string; sha256: string };
  _links: { download?: { href: string }; 'download-http'?: { href: string } };
}

export interface DdiDeployment {
  id: string;
  deployment: {
    download: string;
    update: string;
    maintenanceWindow?: string;
    chunks: { part: string; version: string; name: string; artifacts: DdiArtifact[] }[];
  };
}

export class DdiError extends Error {
  constructor(
    readonly status: number,
    readonly body: string,
    what: string,
  ) {
    super(`${what}: HTTP ${status} ${body.slice(0, 200)}`);
  }
}

export class SimDevice {
  /** Requests made, for assertions about what a flow cost. */
  requests = 0;

  constructor(
    readonly server: string,
    readonly tenant: string,
    readonly controllerId: string,
    private credential: { scheme: 'TargetToken' | 'GatewayToken'; token: string },
  ) {}

  get base(): string {
    return `${this.server}/${this.tenant}/controller/v1/${this.controllerId}`;
  }

  private async call(method: string, url: string, body?: unknown, headers: Record<string, string> = {}): Promise<Response> {
    this.requests++;
    return fetch(url, {
      method,
      headers: {
        Authorization: `${this.credential.scheme} ${this.credential.token}`,
        Accept: 'application/hal+json',
        ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}),
        ...headers,
      },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    });
  }

  private async json<T>(method: string, url: string, body?: unknown): Promise<T> {
    const res = await this.call(method, url, body);
    const text = await res.text();
    if (res.status !== 200) throw new DdiError(res.status, text, `${method} ${url}`);
    return (text ? JSON.parse(text) : {}) as T;
  }

  /** Base poll: `{ config.polling.sleep, _links }`. */
  async poll(): Promise<{ sleep: string; links: DdiLinks }> {
    const r = await this.json<{ config: { polling: { sleep: string } }; _links?: DdiLinks }>('GET', this.base);
    return { sleep: r.config.polling.sleep, links: r._links ?? {} };
  }

  /** PUT configData (mode merge by default) to the href the server offered. */
  async putConfig(href: string, data: Record<string, string>, mode: 'merge' | 'replace' | 'remove' = 'merge'): Promise<void> {
    await this.json('PUT', href, { mode, data });
  }

  /** GET deploymentBase from the poll's link. */
  async deployment(href: string): Promise<DdiDeployment> {
    return this.json<DdiDeployment>('GET', href);
  }

  /** POST feedback for a deployment action. */
  async feedback(actionId: string, execution: string, finished: string, details: string[] = []): Promise<void> {
    await this.json('POST', `${this.base}/deploymentBase/${actionId}/feedback`, { status: { execution, result: { finished }, details } });
  }

  /** GET cancelAction; returns the stopId. */
  async cancelAction(href: string): Promise<string> {
    const r = await this.json<{ id: string; cancelAction: { stopId: string } }>('GET', href);
    return r.cancelAction.stopId;
  }

  /** POST feedback for a cancel action. */
  async cancelFeedback(actionId: string, execution: string, finished: string): Promise<void> {
    await this.json('POST', `${this.base}/cancelAction/${actionId}/feedback`, { status: { execution, result: { finished } } });
  }

  /** Raw GET of an artifact URL with optional headers (ranges); the caller checks the status. */
  async get(url: string, headers: Record<string, string> = {}, method = 'GET'): Promise<Response> {
    return this.call(method, url, undefined, headers);
  }

  /** Download the whole artifact and check its size and SHA-1, as the DDI artifact record lists them. */
  async downloadVerified(a: DdiArtifact): Promise<Buffer> {
    const href = a._links.download?.href ?? a._links['download-http']?.href;
    if (!href) throw new Error('artifact has no download link');
    const res = await this.get(href);
    if (res.status !== 200) throw new DdiError(res.status, await res.text(), `GET ${href}`);
    const data = Buffer.from(await res.arrayBuffer());
    if (data.length !== a.size) throw new Error(`artifact size ${data.length} != ${a.size}`);
    const sha1 = createHash('sha1').update(data).digest('hex');
    if (sha1 !== a.hashes.sha1) throw new Error(`artifact sha1 ${sha1} != ${a.hashes.sha1}`);
    return data;
  }

  /**
   * Read an artifact the way RAUC's streaming install does: `bytes=0-3` to learn the total size
   * from Content-Range, the 8-byte signature-size trailer at the end, then the rest in `chunk`-sized
   * ranges. Returns the reassembled bytes and the number of range requests.
   */
  async streamLikeRauc(a: DdiArtifact, chunk = 128 * 1024): Promise<{ data: Buffer; requests: number }> {
    const href = a._links.download?.href ?? a._links['download-http']?.href;
    if (!href) throw new Error('artifact has no download link');
    let requests = 0;
    const range = async (start: number, end: number): Promise<{ body: Buffer; total: number }> => {
      requests++;
      const res = await this.get(href, { Range: `bytes=${start}-${end}` });
      if (res.status !== 206) throw new DdiError(res.status, await res.text(), `range ${start}-${end}`);
      const cr = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(res.headers.get('content-range') ?? '');
      if (!cr || Number(cr[1]) !== start) throw new Error(`bad Content-Range '${res.headers.get('content-range')}' for ${start}-${end}`);
      const body = Buffer.from(await res.arrayBuffer());
      if (body.length !== Number(cr[2]) - start + 1) throw new Error(`range body ${body.length} bytes does not match ${cr[0]}`);
      return { body, total: Number(cr[3]) };
    };
    const { body: magic, total } = await range(0, 3);
    if (magic.length !== 4) throw new Error('bytes=0-3 did not return 4 bytes');
    const { body: trailer } = await range(total - 8, total - 1);
    const sigSize = Number(trailer.readBigUInt64BE(0));
    if (sigSize <= 0 || sigSize > total - 8) throw new Error(`implausible signature size ${sigSize}`);
    const out = Buffer.alloc(total);
    magic.copy(out, 0);
    trailer.copy(out, total - 8);
    for (let off = 4; off < total - 8; off += chunk) {
      const end = Math.min(off + chunk, total - 8) - 1;
      (await range(off, end)).body.copy(out, off);
    }
    return { data: out, requests };
  }
}
