SUMMARY = "SELinux policy module: domains for LamaDist's services, types for the bundle key and the update token"
DESCRIPTION = "The health check, UEFI boot entries, /var growth, attestation agent and update client \
run confined in domains of their own; RAUC, its bundle hook and the installer get domains with \
unconfined rights. The device's RAUC bundle key (/var/lib/rauc/encryption) and the update client's \
token are authentication files that only the update path reads. Linked into the policy store when \
the image is built, because the EROFS root is read-only."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = " \
    file://lamadist.te \
    file://lamadist.fc \
    file://lamadist.if \
"
S = "${WORKDIR}"

POLICY_NAME ?= "${POLICY_TYPE}"
DEPENDS = "virtual/refpolicy checkpolicy-native semodule-utils-native m4-native gawk-native"
inherit python3native

do_configure[noexec] = "1"

do_compile() {
    oe_runmake -f ${STAGING_DATADIR}/selinux/${POLICY_NAME}/include/Makefile \
        NAME=${POLICY_NAME} SHAREDIR=${STAGING_DATADIR}/selinux \
        CHECKMODULE=checkmodule SEMOD_PKG=semodule_package M4=m4 AWK=gawk PYTHON=python3 \
        lamadist.pp
}

do_install() {
    install -D -m 0644 ${B}/lamadist.pp ${D}${datadir}/selinux/${POLICY_NAME}/lamadist.pp
}

# Link the module into the policy store of the image being built. The root image is labelled from
# the resulting file_contexts (lamadist-image.bbclass); /var, where the bundle key and the token
# live, is labelled on the device by lamadist-relabel.
PACKAGE_WRITE_DEPS += "policycoreutils-native"
pkg_postinst:${PN}() {
    if [ -n "$D" ]; then
        semodule -p $D -s ${POLICY_NAME} -n -i $D${datadir}/selinux/${POLICY_NAME}/lamadist.pp
    else
        semodule -s ${POLICY_NAME} -i ${datadir}/selinux/${POLICY_NAME}/lamadist.pp
    fi
}

FILES:${PN} = "${datadir}/selinux/${POLICY_NAME}/lamadist.pp"
RDEPENDS:${PN} = "refpolicy"
PACKAGE_ARCH = "${MACHINE_ARCH}"
