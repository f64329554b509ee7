SUMMARY = "LamaDist USB installer: writes the A/B disk of lama-image-base to the internal drive"
DESCRIPTION = "A small live system booted from USB. lamadist-install writes the lama-image-base \
disk to the target drive, extends the /var partition to the end of the drive, creates the UEFI \
boot entry A for the slot-A UKI and powers off. Enrollment (TPM2, provisioning key) happens on the \
installed system's first boot, not here."
LICENSE = "MIT"

inherit core-image

IMAGE_FEATURES:remove = "read-only-rootfs"
IMAGE_INSTALL = "packagegroup-core-boot lamadist-installer"
IMAGE_LINGUAS = ""
IMAGE_FSTYPES = "wic.zst wic.bmap"
WKS_FILE = "lamadist-installer.wks.in"
# The installer boots a plain kernel with systemd-boot; it carries no verity root of its own.
INITRAMFS_IMAGE = ""

LAMADIST_INSTALL_PAYLOAD = "lama-image-base-${MACHINE}.rootfs.wic.zst"
do_rootfs[depends] += "lama-image-base:do_image_complete"

install_lamadist_payload () {
    install -d ${IMAGE_ROOTFS}${datadir}/lamadist
    install -m 0644 ${DEPLOY_DIR_IMAGE}/${LAMADIST_INSTALL_PAYLOAD} ${IMAGE_ROOTFS}${datadir}/lamadist/lama-image-base.wic.zst
}
ROOTFS_POSTPROCESS_COMMAND += "install_lamadist_payload"
