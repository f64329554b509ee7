SUMMARY = "LamaDist RAUC update bundle (verity format, adaptive block-hash-index)"
DESCRIPTION = "Updates the inactive slot: the EROFS root (to /dev/mapper/rootfs_<x>), its dm-verity \
hash tree (verity_<x>) and its UKI on the ESP. Signed with the RAUC code-signing key of the key \
directory; `lamadist bundle encrypt` turns it into a crypt bundle per device."
LICENSE = "MIT"

inherit bundle

SRC_URI += "file://lamadist-bundle-hook"

RAUC_BUNDLE_COMPATIBLE = "${RAUC_COMPATIBLE}"
RAUC_BUNDLE_VERSION = "${DISTRO_VERSION}"
RAUC_BUNDLE_DESCRIPTION = "${DISTRO_NAME} ${DISTRO_VERSION} for ${MACHINE}"
RAUC_BUNDLE_FORMAT = "verity"

RAUC_BUNDLE_HOOKS[file] = "lamadist-bundle-hook"

RAUC_BUNDLE_SLOTS = "rootfs verity efi"

RAUC_SLOT_rootfs = "lama-image-base"
RAUC_SLOT_rootfs[fstype] = "${LAMADIST_EROFS_TYPE}"
RAUC_SLOT_rootfs[adaptive] = "${LAMADIST_RAUC_ADAPTIVE}"

RAUC_SLOT_verity = "lama-image-base"
RAUC_SLOT_verity[fstype] = "verity"
RAUC_SLOT_verity[adaptive] = "${LAMADIST_RAUC_ADAPTIVE}"

RAUC_SLOT_efi = "lama-image-base"
RAUC_SLOT_efi[fstype] = "ukis.tar"
RAUC_SLOT_efi[hooks] = "install"

LAMADIST_EROFS_TYPE ?= "erofs-lz4hc"
LAMADIST_RAUC_ADAPTIVE ?= "block-hash-index"

# Signed with the RAUC code-signing key of the key directory (`lamadist keys init`).
RAUC_KEY_FILE = "${LAMADIST_SIGNING_DIR}/rauc-signing.key"
RAUC_CERT_FILE = "${LAMADIST_SIGNING_DIR}/rauc-signing.crt"
RAUC_KEYRING_FILE = "${LAMADIST_SIGNING_DIR}/rauc-ca.crt"
LAMADIST_SIGNING_DIR ??= ""

inherit lamadist-signing
do_bundle[prefuncs] += "lamadist_require_signing_dir"
