SUMMARY = "SELinux policy module: what LamaDist's boot path needs beyond the reference policy"
DESCRIPTION = "The IMA keyring lamadist-init makes before the policy is loaded, and the UEFI \
variables lamadist-boot-entries writes. Linked into the policy store when the image is built, \
because the EROFS root is read-only."
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://lamadist_system.te"
S = "${WORKDIR}"

POLICY_NAME ?= "${POLICY_TYPE}"
DEPENDS = "virtual/refpolicy checkpolicy-native semodule-utils-native m4-native gawk-native"
inherit python3native

do_configure[noexec] = "1"

do_compile() {
    oe_runmake -f ${STAGING_DATADIR}/selinux/${POLICY_NAME}/include/Makefile \
        NAME=${POLICY_NAME} SHAREDIR=${STAGING_DATADIR}/selinux \
        CHECKMODULE=checkmodule SEMOD_PKG=semodule_package M4=m4 AWK=gawk PYTHON=python3 \
        lamadist_system.pp
}

do_install() {
    install -D -m 0644 ${B}/lamadist_system.pp ${D}${datadir}/selinux/${POLICY_NAME}/lamadist_system.pp
}

# Link the module into the policy store of the image being built.
PACKAGE_WRITE_DEPS += "policycoreutils-native"
pkg_postinst:${PN}() {
    if [ -n "$D" ]; then
        semodule -p $D -s ${POLICY_NAME} -n -i $D${datadir}/selinux/${POLICY_NAME}/lamadist_system.pp
    else
        semodule -s ${POLICY_NAME} -i ${datadir}/selinux/${POLICY_NAME}/lamadist_system.pp
    fi
}

FILES:${PN} = "${datadir}/selinux/${POLICY_NAME}/lamadist_system.pp"
RDEPENDS:${PN} = "refpolicy"
PACKAGE_ARCH = "${MACHINE_ARCH}"
