/**
 * What a kas local_conf_header may set: properties of the build host (download and shared-state
 * directories, disk monitoring, parallelism, mirrors) and opt-in reports (CVE check, extra SBOM
 * detail). Everything else is distribution or machine policy, which belongs in meta-lamadist's
 * distro includes or meta-lamadist-bsp's machine files.
 */
const ALLOWED_VARS = [
  /^CONF_VERSION$/,
  /^DL_DIR$/,
  /^SSTATE_DIR$/,
  /^TMPDIR$/,
  /^SSTATE_MIRRORS$/,
  /^PREMIRRORS$/,
  /^MIRRORS$/,
  /^BB_[A-Z_]+$/,
  /^PARALLEL_MAKE$/,
  /^CVE_CHECK_[A-Z_]+$/,
  /^SPDX_(INCLUDE_[A-Z_]+|PRETTY)$/,
];
const ALLOWED_CLASSES = new Set(['rm_work', 'cve-check', 'buildstats', 'buildhistory']);

/** Problems with one local_conf_header entry, one string per offending assignment. */
export function localConfPolicyViolations(text: string): string[] {
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const m = /^\s*(?:export\s+)?([A-Za-z0-9_\-/${}.]+)((?::[A-Za-z0-9_\-${}]+)*)\s*(\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*(.*)$/.exec(line);
    if (!m || line.trimStart().startsWith('#')) continue;
    const [, name = '', overrides = '', , value = ''] = m;
    const shown = `${name}${overrides}`;
    if (name === 'INHERIT') {
      for (const cls of value.replace(/^["']|["']\s*$/g, '').split(/\s+/).filter(Boolean)) {
        if (!ALLOWED_CLASSES.has(cls)) out.push(`${shown}: class '${cls}' is policy`);
      }
      continue;
    }
    if (!ALLOWED_VARS.some((re) => re.test(name))) out.push(`${shown}: '${name}' is policy`);
  }
  return out;
}
