# lamadist-uki: Unified Kernel Images from systemd-boot's EFI stub (scarthgap has no UKI class).
#
# lamadist_build_uki(d, slot, roothash, out) writes one unsigned UKI: the stub linux<arch>.efi.stub
# (deployed by systemd-boot), the kernel, the initramfs (INITRAMFS_IMAGE), os-release of the
# image, the kernel release, the device tree on machines that boot through U-Boot, and the command
# line "roothash=<hex> lamadist.slot=<a|b> rauc.slot=<A|B> ${LAMADIST_UKI_CMDLINE} ${LAMADIST_UKI_EXTRA_CMDLINE}".
# That is a release's template UKI: no host identity; a release bundle carries it with one patch
# per host (lib/lamadist/release.py). lamadist_sign_uki(d, src, out) copies it, signed for Secure
# Boot with the db key of the key directory (LAMADIST_SIGNING_DIR/db.key, db.crt) by sbsign when
# LAMADIST_UKI_SIGN = "1". lib/lamadist/uki.py places the sections as the toolkit does, with the
# same fixed 4 KiB .cmdline area.

require conf/image-uefi.conf

LAMADIST_UKI_NAME ?= "lamadist"
LAMADIST_UKI_STUB ?= "linux${EFI_ARCH}.efi.stub"
LAMADIST_UKI_KERNEL ?= "${KERNEL_IMAGETYPE}"
LAMADIST_UKI_INITRD ?= "${INITRAMFS_IMAGE}-${MACHINE}.${@d.getVar('INITRAMFS_FSTYPES').split()[0]}"
LAMADIST_UKI_DTB ?= "${@os.path.basename(d.getVar('KERNEL_DEVICETREE').split()[0]) if d.getVar('LAMADIST_BOOT') == 'u-boot' and d.getVar('KERNEL_DEVICETREE') else ''}"
LAMADIST_UKI_SIGN ??= "0"

LAMADIST_UKI_DEPENDS = " \
    systemd-boot:do_deploy \
    virtual/kernel:do_deploy \
    ${INITRAMFS_IMAGE}:do_image_complete \
    ${@'sbsigntool-native:do_populate_sysroot' if d.getVar('LAMADIST_UKI_SIGN') == '1' else ''} \
"

def lamadist_uki_cmdline(d, slot, roothash):
    # rauc.slot= names the booted slot by its system.conf bootname, so RAUC can mark it good.
    parts = ["roothash=%s" % roothash, "lamadist.slot=%s" % slot, "rauc.slot=%s" % slot.upper(),
             d.getVar('LAMADIST_UKI_CMDLINE') or '', d.getVar('LAMADIST_UKI_EXTRA_CMDLINE') or '']
    return " ".join(" ".join(parts).split())

def lamadist_build_uki(d, slot, roothash, out):
    import os
    import lamadist.uki
    deploy = d.getVar('DEPLOY_DIR_IMAGE')
    rootfs = d.getVar('IMAGE_ROOTFS')
    osrel = os.path.join(rootfs, 'usr/lib/os-release')
    uname = None
    modules = os.path.join(rootfs, 'usr/lib/modules')
    if os.path.isdir(modules) and os.listdir(modules):
        uname = sorted(os.listdir(modules))[-1]
    dtb = d.getVar('LAMADIST_UKI_DTB')
    try:
        lamadist.uki.build(
            os.path.join(deploy, d.getVar('LAMADIST_UKI_STUB')), out,
            os.path.join(deploy, d.getVar('LAMADIST_UKI_KERNEL')),
            lamadist_uki_cmdline(d, slot, roothash),
            initrd=os.path.join(deploy, d.getVar('LAMADIST_UKI_INITRD')),
            osrel=osrel if os.path.exists(osrel) else None,
            uname=uname,
            dtb=os.path.join(deploy, dtb) if dtb else None)
    except lamadist.uki.UkiError as err:
        bb.fatal("UKI for slot %s: %s" % (slot, err))
    return out

def lamadist_sign_uki(d, src, out):
    import os
    import shutil
    import subprocess
    if d.getVar('LAMADIST_UKI_SIGN') != '1':
        shutil.copyfile(src, out)
        return out
    keydir = d.getVar('LAMADIST_SIGNING_DIR')
    subprocess.run(['sbsign', '--key', os.path.join(keydir, 'db.key'), '--cert', os.path.join(keydir, 'db.crt'),
                    '--output', out, src], check=True)
    return out

lamadist_sign_uki[vardepsexclude] += "LAMADIST_SIGNING_DIR"
