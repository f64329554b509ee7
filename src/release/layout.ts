/** Directory of the per-host files in a release bundle's payload: `hosts/<machine-id>/`. */
export const HOSTS_DIR = 'hosts';

/**
 * Directory of the template UKIs' block indexes: `uki-blocks/lamadist-<slot>.blocks`, the SHA-256
 * of each 16 KiB block (the last one zero-padded), which the bundle hook compares with the running
 * UKI's blocks to read only the ones that differ.
 */
export const UKI_BLOCKS_DIR = 'uki-blocks';
