import { expect } from 'vitest';
import { parseSlots } from '../../src/vm/index.js';

/**
 * What a boot of the fixture reports under SELinux (issue 16 A), read from the first slot report
 * in `serial`: enforcing with Debian's refpolicy and meta-lamadist's modules, the root's labels
 * from the image, /var's and the /etc overlay's from lamadist-init and lamadist-relabel, and no
 * AVC denial in the audit log since the device's first boot (the report lists the denials it
 * found, which the failure shows) but the probe's: the update client's domain reads the device's
 * token and is denied the bundle key, which only RAUC reads. lamadist_k3s is in the loaded policy.
 */
export function expectEnforcing(serial: string, what: string): void {
  const f = parseSlots(serial)?.facts ?? {};
  const end = serial.indexOf('LAMADIST-SLOTS-END');
  const denials = (end < 0 ? serial : serial.slice(0, end)).match(/LAMADIST-AVC .*/g) ?? [];
  expect(f, `${what}:\n${denials.join('\n')}`).toMatchObject({
    selinux: 'Enforcing',
    avc_denials: '0',
    label_root: 'system_u:object_r:root_t:s0',
    label_rauc: 'system_u:object_r:lamadist_rauc_exec_t:s0',
    label_var: 'system_u:object_r:var_t:s0',
    label_bundle_key: 'system_u:object_r:lamadist_bundle_key_t:s0',
    label_etc: 'system_u:object_r:etc_t:s0',
    label_machine_id: 'system_u:object_r:etc_t:s0',
    probe_token: 'read',
    probe_bundle_key: expect.stringMatching(/ cannot open \/var\/lib\/rauc\/encryption\/device\.key\.pem: Permission denied$/),
    k3s_storage: 'system_u:object_r:container_file_t:s0',
    k3s_label: 'system_u:object_r:container_file_t:s0',
  });
  expect(Number(f.probe_denials), `${what}: the probe's denial is logged`).toBeGreaterThan(0);
}
