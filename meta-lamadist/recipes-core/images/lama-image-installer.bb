SUMMARY = "LamaDist debug USB installer: writes the unsealed lama-image-base disk to the internal drive"
DESCRIPTION = "A small live system booted from USB for the lamadist-debug distro. lamadist-install \
--image writes the unsealed lama-image-base wic to the target drive, lets /var take the rest of it, \
creates the UEFI boot entry A and powers off. Fleet hosts are not installed with this image: \
`lamadist provision --installer` makes their stick from a release bundle, and that stick boots the \
release itself, whose lamadist-install seals the disk with keys made on the device."
LICENSE = "MIT"

inherit core-image

IMAGE_FEATURES:remove = "read-only-rootfs"
IMAGE_INSTALL = "packagegroup-core-boot lamadist-installer-wic"
IMAGE_LINGUAS = ""
IMAGE_FSTYPES = "wic.zst wic.bmap"
WKS_FILE = "lamadist-installer.wks.in"
# The installer boots a plain kernel with systemd-boot; it carries no verity root of its own.
INITRAMFS_IMAGE = ""

LAMADIST_INSTALL_PAYLOAD = "lama-image-base-${MACHINE}.rootfs.wic.zst"
do_rootfs[depends] += "lama-image-base:do_image_complete"

# An unsealed disk has no place on a fleet host: the image is built for the debug distro only
# (it still parses everywhere, so layer checks and task graphs keep resolving it).
python lamadist_debug_only () {
    if d.getVar('DISTRO') != 'lamadist-debug':
        bb.fatal("lama-image-installer writes an unsealed disk and is built with the lamadist-debug distro only; "
                 "fleet hosts are installed with `lamadist provision --installer`")
}
do_rootfs[prefuncs] += "lamadist_debug_only"

install_lamadist_payload () {
    install -d ${IMAGE_ROOTFS}${datadir}/lamadist
    install -m 0644 ${DEPLOY_DIR_IMAGE}/${LAMADIST_INSTALL_PAYLOAD} ${IMAGE_ROOTFS}${datadir}/lamadist/lama-image-base.wic.zst
}
ROOTFS_POSTPROCESS_COMMAND += "install_lamadist_payload"
