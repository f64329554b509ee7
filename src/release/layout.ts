/** Directory of the per-host files in a release bundle's payload: `hosts/<machine-id>/`. */
export const HOSTS_DIR = 'hosts';
