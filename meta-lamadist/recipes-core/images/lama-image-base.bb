SUMMARY = "LamaDist base image: immutable, verified, encrypted A/B root for a homelab node"
DESCRIPTION = "EROFS root in dm-verity with its hash tree and root hash, one UKI per slot carrying \
the root hash, the split A/B wic disk, systemd with networkd/resolved/timesyncd, SELinux \
(targeted, enforcing), IMA/EVM, LUKS2/TPM2 tooling, RAUC with the post-boot health check, and k3s."
LICENSE = "MIT"

inherit core-image lamadist-image
# Build-time SELinux labels: the EROFS root cannot be relabelled on the device.
inherit ${@bb.utils.contains('BBFILE_COLLECTIONS', 'selinux', 'selinux-image', '', d)}

IMAGE_FEATURES += "ssh-server-openssh"
IMAGE_LINGUAS = ""

IMAGE_INSTALL = " \
    packagegroup-core-boot \
    packagegroup-lamadist-base \
    packagegroup-lamadist-security \
    packagegroup-lamadist-update \
    packagegroup-lamadist-k3s \
    ${CORE_IMAGE_EXTRA_INSTALL} \
"

# The /etc overlay needs its lower directory and the mount points of the mutable partitions.
create_lamadist_mountpoints () {
    install -d -m 0755 ${IMAGE_ROOTFS}/var ${IMAGE_ROOTFS}/boot
}
ROOTFS_POSTPROCESS_COMMAND += "create_lamadist_mountpoints"
