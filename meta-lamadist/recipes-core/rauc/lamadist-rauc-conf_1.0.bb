SUMMARY = "RAUC system configuration and bundle keyring of LamaDist"
DESCRIPTION = "system.conf of the machine's RAUC family (efi or uboot) with the machine's \
compatible, the RAUC CA certificate as keyring, and for U-Boot machines the libubootenv \
configuration pointing at uboot.env on the ESP, and for streamed bundles (dm-verity over HTTP) \
no hash-tree prefetch clusters, no udev probing and one squashfs block of read-ahead."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# The keyring is the RAUC CA of the key directory `lamadist keys init` created; its path comes
# from the build environment (LAMADIST_SIGNING_DIR), never from git.
LAMADIST_RAUC_KEYRING ?= "${LAMADIST_SIGNING_DIR}/rauc-ca.crt"
LAMADIST_SIGNING_DIR ??= ""
# Set by every LamaDist machine; the defaults keep the recipe parseable for any other machine.
LAMADIST_RAUC_FAMILY ??= "efi"
RAUC_COMPATIBLE ??= "${MACHINE}"

SRC_URI = " \
    file://${LAMADIST_RAUC_FAMILY}/system.conf \
    file://fw_env.config \
    file://lamadist-verity.conf \
    file://lamadist-verity-modprobe.conf \
    file://lamadist-rauc-stream.rules \
"
S = "${WORKDIR}"

inherit lamadist-signing

do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    install -d ${D}${sysconfdir}/rauc
    sed -e 's/^compatible=.*/compatible=${RAUC_COMPATIBLE}/' \
        ${S}/${LAMADIST_RAUC_FAMILY}/system.conf >${D}${sysconfdir}/rauc/system.conf
    install -m 0644 ${LAMADIST_RAUC_KEYRING} ${D}${sysconfdir}/rauc/keyring.pem
    if [ "${LAMADIST_RAUC_FAMILY}" = "uboot" ]; then
        install -m 0644 ${S}/fw_env.config ${D}${sysconfdir}/fw_env.config
    fi
    install -d -m 0700 ${D}${localstatedir}/lib/rauc
    # Streamed bundles are dm-verity devices over HTTP: no hash-tree prefetch clusters.
    install -D -m 0644 ${S}/lamadist-verity.conf ${D}${nonarch_libdir}/tmpfiles.d/lamadist-verity.conf
    install -D -m 0644 ${S}/lamadist-verity-modprobe.conf ${D}${nonarch_libdir}/modprobe.d/lamadist-verity.conf
    # ... and no udev probing or long read-ahead on the devices RAUC streams a bundle through.
    install -D -m 0644 ${S}/lamadist-rauc-stream.rules ${D}${nonarch_base_libdir}/udev/rules.d/59-lamadist-rauc-stream.rules
}

# A new CA certificate reinstalls the keyring (the key directory is outside the layer).
do_install[file-checksums] += "${LAMADIST_RAUC_KEYRING}:${@os.path.exists(d.getVar('LAMADIST_RAUC_KEYRING'))}"
do_install[vardeps] += "RAUC_COMPATIBLE LAMADIST_RAUC_FAMILY"

PACKAGE_ARCH = "${MACHINE_ARCH}"
RPROVIDES:${PN} += "virtual-rauc-conf"
FILES:${PN} = "${sysconfdir} ${localstatedir}/lib/rauc ${nonarch_libdir}/tmpfiles.d ${nonarch_libdir}/modprobe.d ${nonarch_base_libdir}/udev/rules.d"
