SUMMARY = "LamaDist initramfs: LUKS2/TPM2 unlock, dm-verity root, /var and /etc overlay, switch_root"
DESCRIPTION = "Built into every UKI. Its /init is lamadist-init from lamadist-boot."
LICENSE = "MIT"

PACKAGE_INSTALL = "lamadist-boot ${VIRTUAL-RUNTIME_base-utils} base-passwd ${ROOTFS_BOOTSTRAP_INSTALL}"

# No package manager, no locales, no SELinux labelling and no image features in an initramfs.
IMAGE_FEATURES = ""
IMAGE_LINGUAS = ""
NO_RECOMMENDATIONS = "1"
IMAGE_FSTYPES = "${INITRAMFS_FSTYPES}"
IMAGE_NAME_SUFFIX ?= ""
IMAGE_ROOTFS_SIZE = "8192"
IMAGE_ROOTFS_EXTRA_SPACE = "0"
# Kernel modules for the boot path come with the kernel image's own initramfs hooks only where
# they are not built in; linux-yocto builds dm, erofs, overlay and vfat into the kernel.
PACKAGE_INSTALL:append = " ${@' '.join('kernel-module-' + m for m in d.getVar('LAMADIST_INITRAMFS_MODULES').split())}"
LAMADIST_INITRAMFS_MODULES ?= ""

inherit core-image

# The UKI class reads the initramfs through this link name.
IMAGE_LINK_NAME = "${INITRAMFS_IMAGE}-${MACHINE}"
