import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** Test PKI made with the real openssl CLI: a CA, a code-signing cert, and two RSA device certs. */
export interface Pki {
  dir: string;
  caPem: string;
  ca: string;
  caKey: string;
  otherCa: string;
  cert: string;
  key: string;
  device: string;
  deviceKey: string;
  device2: string;
  device2Key: string;
  /** system.conf for `rauc info --conf` (check-purpose=codesign, as our signer cert has EKU codeSigning). */
  conf: string;
  otherConf: string;
}

function openssl(dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

function leaf(dir: string, name: string, ca: string, eku: string): void {
  openssl(dir, ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`]);
  writeFileSync(path.join(dir, `${name}.ext`), `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=${eku}\n`);
  openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '3650', '-extfile', `${name}.ext`]);
}

function makeCa(dir: string, name: string): void {
  openssl(dir, ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.pem`, '-days', '3650', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
}

export function makePki(): Pki {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lamadist-rauc-pki-'));
  makeCa(dir, 'ca');
  makeCa(dir, 'other-ca');
  leaf(dir, 'signer', 'ca', 'critical,codeSigning');
  leaf(dir, 'device', 'ca', 'clientAuth');
  leaf(dir, 'device2', 'ca', 'clientAuth');
  const conf = (ca: string): string =>
    `[system]\ncompatible=lamadist-x86-64\nbootloader=noop\n[keyring]\npath=${path.join(dir, ca)}\ncheck-purpose=codesign\n[slot.rootfs.0]\ndevice=/dev/null\n`;
  writeFileSync(path.join(dir, 'system.conf'), conf('ca.pem'));
  writeFileSync(path.join(dir, 'other.conf'), conf('other-ca.pem'));
  const p = (f: string): string => path.join(dir, f);
  return {
    dir,
    caPem: readFileSync(p('ca.pem'), 'utf8'),
    ca: p('ca.pem'),
    caKey: p('ca.key'),
    otherCa: p('other-ca.pem'),
    cert: p('signer.pem'),
    key: p('signer.key'),
    device: p('device.pem'),
    deviceKey: p('device.key'),
    device2: p('device2.pem'),
    device2Key: p('device2.key'),
    conf: p('system.conf'),
    otherConf: p('other.conf'),
  };
}

/** More signers and devices for the rauc-made corpus: a CA chain, an EC signer and EC devices. */
export interface PkiExtras {
  /** Intermediate CA under ca, and a second one under it. */
  int: string;
  int2: string;
  /** Code-signing certs issued by int and int2. */
  intSigner: string;
  intSignerKey: string;
  int2Signer: string;
  int2SignerKey: string;
  /** P-256 code-signing cert issued by ca. */
  ecSigner: string;
  ecSignerKey: string;
  /** P-256 device certs (keyAgreement) issued by ca. */
  ecDevice: string;
  ecDeviceKey: string;
  ecDevice2: string;
  ecDevice2Key: string;
  /** Code-signing cert issued by other-ca (for `rauc resign` across CAs). */
  otherSigner: string;
  otherSignerKey: string;
}

function issue(dir: string, name: string, ca: string, ext: string, keyArgs: string[]): void {
  openssl(dir, ['req', '-new', ...keyArgs, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`]);
  writeFileSync(path.join(dir, `${name}.ext`), ext);
  openssl(dir, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '3650', '-extfile', `${name}.ext`]);
}

export function addPkiExtras(pki: Pki): PkiExtras {
  const dir = pki.dir;
  const rsa = ['-newkey', 'rsa:2048', '-nodes'];
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  const caExt = 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n';
  const signExt = 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,codeSigning\n';
  const ecDevExt = 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n';
  issue(dir, 'int', 'ca', caExt, rsa);
  issue(dir, 'int2', 'int', caExt, rsa);
  issue(dir, 'int-signer', 'int', signExt, rsa);
  issue(dir, 'int2-signer', 'int2', signExt, rsa);
  issue(dir, 'ec-signer', 'ca', signExt, ec);
  issue(dir, 'ec-device', 'ca', ecDevExt, ec);
  issue(dir, 'ec-device2', 'ca', ecDevExt, ec);
  issue(dir, 'other-signer', 'other-ca', signExt, rsa);
  const p = (f: string): string => path.join(dir, f);
  return {
    int: p('int.pem'),
    int2: p('int2.pem'),
    intSigner: p('int-signer.pem'),
    intSignerKey: p('int-signer.key'),
    int2Signer: p('int2-signer.pem'),
    int2SignerKey: p('int2-signer.key'),
    ecSigner: p('ec-signer.pem'),
    ecSignerKey: p('ec-signer.key'),
    ecDevice: p('ec-device.pem'),
    ecDeviceKey: p('ec-device.key'),
    ecDevice2: p('ec-device2.pem'),
    ecDevice2Key: p('ec-device2.key'),
    otherSigner: p('other-signer.pem'),
    otherSignerKey: p('other-signer.key'),
  };
}
