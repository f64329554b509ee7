# LamaDist U-Boot boot script (boot.scr on the ESP): A/B slot choice with the variables RAUC's
# uboot backend maintains. BOOT_ORDER lists the slots by priority; BOOT_<slot>_LEFT counts the
# remaining attempts of a slot. Each attempt costs one before the UKI starts; `rauc status
# mark-good` (lamadist-health) refills it after a healthy boot, so a slot that keeps failing runs
# out of attempts and the next slot in BOOT_ORDER boots instead.
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv lamadist_slot
for s in ${BOOT_ORDER}; do
    if test "x${lamadist_slot}" = "x"; then
        if test "${s}" = "A" && test ${BOOT_A_LEFT} -gt 0; then
            setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
            setenv lamadist_slot a
        elif test "${s}" = "B" && test ${BOOT_B_LEFT} -gt 0; then
            setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
            setenv lamadist_slot b
        fi
    fi
done

if test "x${lamadist_slot}" = "x"; then
    echo "LamaDist: no slot has boot attempts left; resetting the counters and rebooting"
    setenv BOOT_A_LEFT 3
    setenv BOOT_B_LEFT 3
    saveenv
    reset
fi

saveenv
echo "LamaDist: booting slot ${lamadist_slot}"
# The UKI carries kernel, initramfs, command line (roothash=, lamadist.slot=) and device tree;
# U-Boot's UEFI loader starts systemd's EFI stub inside it.
load ${devtype} ${devnum}:1 ${kernel_addr_r} EFI/Linux/lamadist-${lamadist_slot}.efi
bootefi ${kernel_addr_r} ${fdtcontroladdr}
echo "LamaDist: slot ${lamadist_slot} did not start; rebooting"
reset
