/** Debian 12's OVMF builds (package ovmf). */
export const OVMF = {
  /** Secure Boot capable code (needs SMM; runQemu turns it on). */
  secbootCode: '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd',
  code: '/usr/share/OVMF/OVMF_CODE_4M.fd',
  /** Empty variable store (Secure Boot not enrolled). */
  vars: '/usr/share/OVMF/OVMF_VARS_4M.fd',
  /** Variable store with Microsoft's keys enrolled (Secure Boot on, our keys refused). */
  msVars: '/usr/share/OVMF/OVMF_VARS_4M.ms.fd',
} as const;

/** Kernel arguments that put the console on the VM's serial port (what runQemu streams). */
export const SERIAL_CONSOLE = 'console=ttyS0,115200';
