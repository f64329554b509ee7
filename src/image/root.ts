import path from 'node:path';
import { buildErofs, stageTree, treeFileContexts, type ErofsSuperblock } from '../erofs/index.js';
import { IMA_CERT_PATH, checkTreeIma, installImaCert, signTree, type ImaSigner } from '../ima/index.js';

export interface RootErofsOptions {
  /** The operator's root tree: read, never modified. */
  tree: string;
  out: string;
  uuid: string;
  timestamp: number;
  /** SELinux file_contexts (default: the one the tree's own policy selects, if any). */
  fileContexts?: string;
  /** Sign executables, ELF objects and kernel modules (`security.ima`) on a private copy. */
  ima?: ImaSigner;
  /** A private directory for the signed copy. */
  work: string;
  onStep?: (step: string) => void;
}

/**
 * The root EROFS image of a tree, labelled and signed when asked; a signed image also carries the
 * certificate at /etc/keys/x509_ima.der. Without a policy in the tree and without either option it
 * is exactly `buildErofs` of the tree.
 */
export async function buildRootErofs(o: RootErofsOptions): Promise<ErofsSuperblock> {
  const step = o.onStep ?? (() => undefined);
  const fileContexts = o.fileContexts ?? (await treeFileContexts(o.tree));
  await checkTreeIma(o.tree, o.ima);
  let source = o.tree;
  if (o.ima) {
    source = path.join(o.work, 'signed-root');
    await stageTree(o.tree, source);
    await installImaCert(source, o.ima);
    step(`IMA signatures (${(await signTree(source, o.ima)).length} files) and ${IMA_CERT_PATH}`);
  }
  if (fileContexts) step(`SELinux labels from ${fileContexts}`);
  return buildErofs({ source, out: o.out, uuid: o.uuid, timestamp: o.timestamp, fileContexts });
}
